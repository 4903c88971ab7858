"""Is the search worth its compute: the seed's protocol against peftune's search, one run.

    python benchmarks/search_compute.py           # ~1 hour on 2 CPU cores
    python benchmarks/search_compute.py --quick   # a few minutes: 3 + 3 trials, a smoke run
    python benchmarks/search_compute.py --report  # the last run's tables and plot again
    python benchmarks/search_compute.py --arms peftune  # rerun one arm against the saved other

Both arms run on the embedded SmolLM2-135M and ACLSum through the same training and
generation code, so what differs is the protocol alone:
  seed     20 trials of TPE over learning rate (log 1e-6..1e-4) and batch size
           {4, 8, 16, 32}, every trial a full training (all 100 training papers), weight
           decay 0.01, the seed's LoRA (r 16, alpha 32, dropout 0.05 on q,v), no pruning;
           then the best configuration retrained.
  peftune  the shipped demo search (configs/aclsum-smollm2-search.yaml): a wider space,
           Hyperband pruning on validation loss, trials on 40 training papers; then the
           best configuration retrained on all 100.
Both rank trials by ROUGE-L on the same validation papers and score their final model on
the same 48 test papers. Compute is counted per trial as training tokens (forward and
backward) and the process's CPU seconds (robust to other jobs sharing the machine); wall
seconds are reported too. Writes search_compute.json and search_compute.png.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = Path("/tmp/peftune-search-compute")
TEST_PAPERS = 48
SEED_TRIALS = 20
SEED_EPOCHS = 1  # the seed trains 4 epochs per trial; see BENCHMARKS.md


def arm_config(arm: str, *, trials: int | None = None) -> Any:
    from peftune.config import config_from_dict, load_yaml

    data = load_yaml(ROOT / "configs" / "aclsum-smollm2-search.yaml")
    data["output_dir"] = str(OUT / arm)
    data["data"]["max_eval_examples"] = TEST_PAPERS
    search = data["search"]
    search["baselines"] = arm == "peftune"  # zero-shot and default, once, for context
    if arm == "seed":
        search.update(n_trials=SEED_TRIALS, pruner="none", train_examples=None,
                      tune_method_options=False)
        data["lora"] = {"r": 16, "alpha": 32, "dropout": 0.05}  # the seed's LoraConfig
        search["space"] = {"learning_rate": [1e-6, 1e-4], "batch_size": [4, 8, 16, 32],
                           "epochs": [SEED_EPOCHS], "warmup_ratio": [0.0, 0.0],
                           "weight_decay": [0.01, 0.01]}
        data["train"]["epochs"] = SEED_EPOCHS
    if trials:  # a smoke run: few trials on few papers
        search.update(n_trials=trials, eval_examples=4, train_examples=None)
        data["data"].update(max_train_examples=12, max_eval_examples=6)
        data["eval"]["max_new_tokens"] = 24
    return config_from_dict(data)


class Meter:
    """CPU seconds, wall seconds and training tokens of every training and scoring call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def wrap(self, module: Any, name: str, kind: str) -> None:
        inner = getattr(module, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            cpu, wall = time.process_time(), time.perf_counter()
            result = inner(*args, **kwargs)
            self.calls.append({
                "kind": kind,
                "dir": str(kwargs.get("output_dir") or kwargs.get("out_dir") or ""),
                "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
                "train_tokens": result.get("train_tokens", 0) if kind == "train" else 0})
            return result

        setattr(module, name, timed)


def run_arm(arm: str, trials: int | None) -> dict[str, Any]:
    from peftune import search
    from peftune import train as training

    meter = Meter()
    meter.wrap(training, "fit", "train")
    meter.wrap(search.final, "score", "score")  # where the final retrain scores
    cfg = arm_config(arm, trials=trials)
    cpu, wall = time.process_time(), time.perf_counter()
    study, final = search.run(cfg)
    total = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}
    rows = _trial_rows(study, meter.calls)
    searched = {k: sum(r[k] for r in rows) for k in ("cpu_s", "wall_s", "train_tokens")}
    return {"trials": rows, "search": searched, "total": total, "best_params": study.best_params,
            "test": final["test"], "baselines": final["baselines"]}


def _trial_rows(study: Any, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per trial in order: its state, validation ROUGE-L, and what its training and scoring
    cost (a trial's score call follows its training call)."""
    rows = []
    for trial in sorted(study.trials, key=lambda t: t.number):
        name = f"trial-{trial.number:04d}"
        mine = [c for c in calls if name in c["dir"]]
        i = calls.index(mine[0]) if mine else None
        if i is not None and i + 1 < len(calls) and calls[i + 1]["kind"] == "score" \
                and not calls[i + 1]["dir"]:
            mine.append(calls[i + 1])  # a trial's scoring writes no files
        rows.append({"number": trial.number, "state": trial.state.name,
                     "rougeL": trial.value if trial.state.name == "COMPLETE" else None,
                     "params": trial.params,
                     **{k: sum(c[k] for c in mine) for k in ("cpu_s", "wall_s",
                                                              "train_tokens")}})
    return rows


def curve(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Cumulative compute after each trial, and the best validation ROUGE-L reached."""
    xs, ys, spent, best = [], [], 0.0, -math.inf
    for row in rows:
        spent += row[key]
        if row["rougeL"] is not None:
            best = max(best, row["rougeL"])
        if best > -math.inf:
            xs.append(spent)
            ys.append(best)
    return xs, ys


def test_comparison() -> dict[str, Any]:
    from peftune.metrics import compare_predictions, document_rouge, read_predictions

    out: dict[str, Any] = {}
    for arm in ("seed", "peftune"):
        rows = read_predictions(OUT / arm / "final" / "predictions.jsonl")
        scores = np.array(document_rouge([r["prediction"] for r in rows],
                                         [r["reference"] for r in rows])["rougeL"])
        rng = np.random.default_rng(0)
        means = rng.choice(scores, (2000, len(scores))).mean(axis=1)
        out[arm] = [float(scores.mean()), *map(float, np.percentile(means, [2.5, 97.5]))]
    paired = compare_predictions(OUT / "peftune" / "final" / "predictions.jsonl",
                                 {"seed": OUT / "seed" / "final" / "predictions.jsonl"})
    out["peftune - seed"] = paired["best - seed"]["rougeL"]
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in ((axes[0], "cpu_s", "cumulative CPU hours of the search"),
                           (axes[1], "train_tokens", "cumulative training tokens (millions)")):
        scale = 3600 if key == "cpu_s" else 1e6
        for arm, style in (("seed", "o-"), ("peftune", "s-")):
            xs, ys = curve(results[arm]["trials"], key)
            ax.step([x / scale for x in xs], ys, style, where="post", label=arm,
                    markersize=4)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best validation ROUGE-L so far")
    axes[0].legend()
    fig.suptitle("ACLSum, SmolLM2-135M: the seed's 20 full trials vs peftune's search")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary(results: dict[str, Any]) -> str:
    """Markdown: each arm's trials with their cost, then compute and test side by side."""
    lines = []
    for arm in ("seed", "peftune"):
        lines += ["", f"{arm}:", "",
                  "| trial | learning rate | batch | state | validation ROUGE-L | training "
                  "tokens | CPU s | wall s |", "|---|---|---|---|---|---|---|---|"]
        for row in results[arm]["trials"]:
            value = f"{row['rougeL']:.2f}" if row["rougeL"] is not None else "-"
            lines.append(f"| {row['number']} | {row['params']['learning_rate']:.2e} | "
                         f"{row['params']['batch_size']} | {row['state'].lower()} | {value} | "
                         f"{row['train_tokens']:,} | {row['cpu_s']:.0f} | {row['wall_s']:.0f} |")
    test = results["test"]
    lines += ["", "| | seed | peftune | peftune/seed |", "|---|---|---|---|"]
    for key, name, fmt in (("train_tokens", "search training tokens", "{:,.0f}"),
                           ("cpu_s", "search CPU seconds", "{:,.0f}"),
                           ("wall_s", "search wall seconds", "{:,.0f}")):
        a, b = results["seed"]["search"][key], results["peftune"]["search"][key]
        lines.append(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.2f} |")
    best = {arm: max((r["rougeL"] for r in results[arm]["trials"] if r["rougeL"] is not None),
                     default=math.nan) for arm in ("seed", "peftune")}
    lines.append(f"| best validation ROUGE-L | {best['seed']:.2f} | {best['peftune']:.2f} | |")
    lines.append("| test ROUGE-L of the final model [95% interval] | "
                 + " | ".join(f"{test[arm][0]:.2f} [{test[arm][1]:.2f}, {test[arm][2]:.2f}]"
                              for arm in ("seed", "peftune")) + " | |")
    d = test["peftune - seed"]
    lines.append(f"| peftune - seed, test ROUGE-L, paired [95% interval] | | "
                 f"{d['difference']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 trials an arm (smoke run)")
    parser.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "search_compute.png")
    parser.add_argument("--arms", default="seed,peftune",
                        help="arms to run; any other arm's results are the last run's")
    parser.add_argument("--report", action="store_true",
                        help="only print the tables and draw the plot of the last run's results")
    args = parser.parse_args()
    saved = OUT / "search_compute.json"
    if args.report:
        results = json.loads(saved.read_text())
    else:
        from peftune.logs import setup_logging

        setup_logging(False)
        results = json.loads(saved.read_text()) if saved.is_file() else {}
        for arm in args.arms.split(","):  # the others' results are the last run's
            shutil.rmtree(OUT / arm, ignore_errors=True)
            results[arm] = run_arm(arm, 3 if args.quick else None)
        results["test"] = test_comparison()
        saved.write_text(json.dumps(results, indent=1, default=str))
    plot(results, args.png if not args.quick else OUT / "search_compute.png")
    print(summary(results))


if __name__ == "__main__":
    main()
