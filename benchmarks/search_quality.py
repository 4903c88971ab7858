"""Does the search find a better model than the defaults, on tasks nobody tuned it for?

    python benchmarks/search_quality.py                               # 3 tasks x 3 seeds
    python benchmarks/search_quality.py --tasks titles --seeds 1      # one cell
    python benchmarks/search_quality.py --table_only                  # the table so far

Three small summarization-style tasks made from the packaged ACLSum papers (same 250 papers
and splits, three different targets):

- ``aclsum``: the embedded default (abstract -> its challenge, approach and outcome sentences);
- ``titles``: abstract -> the paper's title (one line, extreme summarization);
- ``outcome``: the paper's conclusion -> its one-sentence outcome summary.

For each task and search seed, ``configs/aclsum-smollm2-search.yaml`` runs unchanged but for the
data source and the seed: zero-shot, the default configuration, and the best of the demo's 6
trials (its first the default configuration), all on the same 48 test documents. Then the
same study is topped up to 12 trials (a 2x larger search: its first 6 trials are the
demo-sized search's) and its best scored on the same documents.
Every difference carries a paired bootstrap 95% interval over the test documents. Each cell
resumes: a finished search is not rerun, so the command can be stopped and started again.
Writes ``WORK/table.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

DEMO = ROOT / "configs" / "aclsum-smollm2-search.yaml"
TASKS = ("aclsum", "titles", "outcome")
TEST_DOCUMENTS = 48
TRIALS = 6


def _papers(split: str) -> list[dict]:
    root = Path(__import__("aclsum").__file__).parent / "dataset"
    return [json.loads(line) for line in
            (root / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def write_task(task: str, work: Path) -> str:
    """The task's data source: ``aclsum`` itself, or a folder of JSONL splits."""
    if task == "aclsum":
        return "aclsum"
    from peftune.data import _detok

    out = work / "data" / task
    for split, role in (("train", "train"), ("val", "validation"), ("test", "test")):
        rows = []
        for paper in _papers(split):
            if task == "titles":
                document, summary = paper["sentences"]["abstract"], paper["title"].strip()
            else:
                document, summary = paper["sentences"]["conclusion"], paper["summary"]["outcome"]
            rows.append({"id": paper["id"], "summary": summary,
                         "document": " ".join(map(_detok, document))})
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{role}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows),
                                           encoding="utf-8")
    return str(out)


def search(source: str, seed: int, out: Path, *, trials: int, baselines: bool,
           study: str, extra: list[str], config: Path = DEMO) -> None:
    if (out / "final" / "metrics.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "peftune", "search", "--config", str(config),
                    "--data.source", source, "--seed", str(seed), "--output_dir", str(out),
                    "--data.max_eval_examples", str(TEST_DOCUMENTS),
                    "--search.n_trials", str(trials), "--search.study_name", study,
                    "--search.baselines", str(baselines).lower(), *extra], check=True)


def cell(task: str, seed: int, work: Path, *, trials: int, extra: list[str],
         stages: tuple[str, ...] = ("x1", "x2")) -> None:
    """The demo-sized search with its baselines, then the same study topped up to 2x."""
    source = write_task(task, work)
    demo, double = work / task / f"seed{seed}" / "x1", work / task / f"seed{seed}" / "x2"
    study = f"{task}-seed{seed}"
    if "x1" in stages:
        search(source, seed, demo, trials=trials, baselines=True, study=study, extra=extra)
    if "x2" not in stages:
        return
    if not (double / "final" / "metrics.json").is_file() and not (double / "study.db").exists():
        double.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo / "study.db", double / "study.db")
        if (demo / "trials").is_dir():  # kept adapters: a winner among them is not retrained
            shutil.copytree(demo / "trials", double / "trials")
    # the larger search asks the same question: the settings the demo-sized one saved
    search(source, seed, double, trials=2 * trials, baselines=False, study=study, extra=extra,
           config=demo / "config.yaml")


def compare(task: str, seed: int, work: Path) -> dict | None:
    from peftune.metrics import compare_predictions

    demo, double = work / task / f"seed{seed}" / "x1", work / task / f"seed{seed}" / "x2"
    if not (demo / "final" / "predictions.jsonl").is_file():
        return None
    others = {"zero-shot": demo / "zero-shot" / "predictions.jsonl",
              "default": demo / "default" / "predictions.jsonl",
              "x1": demo / "final" / "predictions.jsonl"}
    x1 = compare_predictions(others["x1"], {k: v for k, v in others.items() if k != "x1"},
                             seed=seed)
    if not (double / "final" / "predictions.jsonl").is_file():
        return {"x1": x1, "x2": None}  # the 2x search has not run yet
    x2 = compare_predictions(double / "final" / "predictions.jsonl", others, seed=seed)
    return {"x1": x1, "x2": x2}


def _diff(d: dict) -> str:
    r = d["rougeL"]
    return f"{r['difference']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]"


def _verdict(d: dict) -> int:
    """+1 beyond noise above, -1 beyond noise below, 0 within noise."""
    r = d["rougeL"]
    return 1 if r["low"] > 0 else -1 if r["high"] < 0 else 0


def table(work: Path, tasks: list[str], seeds: list[int]) -> str:
    lines = [f"Test ROUGE-L on {TEST_DOCUMENTS} test documents; differences with paired "
             "bootstrap 95% intervals (2,000 resamples).", "",
             "| task | seed | zero-shot | default | demo-sized search | 2x search | "
             "demo-sized - default | 2x - default | demo-sized - zero-shot |",
             "|---|---|---|---|---|---|---|---|---|"]
    verdicts: dict[str, list[int]] = {}
    for task in tasks:
        for seed in seeds:
            got = compare(task, seed, work)
            if got is None:
                continue
            test, x2 = got["x1"]["test"], got["x2"]
            double = f"{x2['test']['best']['rougeL']:.2f}" if x2 else "-"
            lines.append(
                f"| {task} | {seed} | {test['zero-shot']['rougeL']:.2f} | "
                f"{test['default']['rougeL']:.2f} | {test['best']['rougeL']:.2f} | "
                f"{double} | "
                f"{_diff(got['x1']['best - default'])} | "
                f"{_diff(x2['best - default']) if x2 else '-'} | "
                f"{_diff(got['x1']['best - zero-shot'])} |")
            verdicts.setdefault(task, []).append(_verdict(got["x1"]["best - default"]))
    lines.append("")
    for task, v in verdicts.items():
        lines.append(f"- {task}: the demo-sized search beats the default beyond noise in "
                     f"{v.count(1)}/{len(v)} seeds, is worse beyond noise in "
                     f"{v.count(-1)}/{len(v)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--work", type=Path, default=Path("/tmp/peftune-search-quality"))
    parser.add_argument("--table_only", action="store_true")
    parser.add_argument("--stages", default="x1,x2",
                        help="x1: the demo-sized search and baselines; x2: its 2x top-up")
    parser.add_argument("--trials", type=int, default=TRIALS,
                        help="trials of the demo-sized search (the larger one runs twice as many)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further peftune search flags, e.g. a smaller model for a smoke run")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"--tasks: unknown {', '.join(unknown)} (known: {', '.join(TASKS)})")
    if not args.table_only:
        for seed in seeds:
            for task in tasks:
                cell(task, seed, args.work, trials=args.trials, extra=args.extra,
                     stages=tuple(args.stages.split(",")))
    text = table(args.work, tasks, seeds)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "table.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
