"""Which intermediate signal predicts a trial's final validation ROUGE: loss or ROUGE on a slice?

    # processes sharing one study, one thread each (a trial: ~19 min wall on a busy 2-core host)
    for w in 0 1 2 3; do PYTHONPATH=src OMP_NUM_THREADS=1 \
        python benchmarks/pruning_signal.py --trials 20 --worker $w & done; wait

Runs the demo search (configs/aclsum-smollm2-search.yaml: SmolLM2-135M, ACLSum, LoRA) with a
random sampler and no pruning, on ``--train_examples`` training papers per trial (the demo:
40) and ROUGE-L on ``--eval_examples`` validation papers (the demo: 24), and evaluates every
``--intermediate_steps`` steps: the validation loss and the ROUGE of summaries
generated for the first ``--signal_examples`` validation papers (what ``search.prune_signal``
rouge reports). Then, per rung (optimizer step) and signal, the Spearman rank correlation of
the signal with the trial's final validation score, with a bootstrap 95% interval over
trials. Trials are kept in an Optuna study under ``--out``: a rerun resumes it, and the table
is printed after every trial, so a partial run still gives one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import optuna

from peftune import search
from peftune.config import Config, config_from_dict, load_yaml, set_dotted

ROOT = Path(__file__).resolve().parent.parent
RESAMPLES = 2000


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank."""
    order = values.argsort(kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        out[tied] = out[tied].mean()
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def spearman_interval(a: np.ndarray, b: np.ndarray, *, seed: int = 0
                      ) -> tuple[float, float, float]:
    """rho and the percentile bootstrap 95% interval, resampling trials."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(a), size=(RESAMPLES, len(a)))
    boot = np.array([spearman(a[r], b[r]) for r in rows])
    low, high = np.nanpercentile(boot, [2.5, 97.5])
    return spearman(a, b), float(low), float(high)


def table(study: optuna.Study, metric: str, *, min_trials: int) -> str:
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    lines = [f"{len(trials)} complete trials; final = validation {metric} on all validation "
             "rows of a trial", "",
             "| rung (step) | trials | signal | Spearman rho vs final [95% interval] |",
             "|---|---|---|---|"]
    trials = [t for t in trials if t.user_attrs.get("rungs")]
    steps = sorted({int(s) for t in trials for s in t.user_attrs["rungs"]})
    # each trial's evaluations by rung; "last" is the end of its training, whatever its step
    rungs = {str(step): {t.number: t.user_attrs["rungs"].get(str(step)) for t in trials}
             for step in steps}
    rungs["last"] = {t.number: t.user_attrs["rungs"][max(t.user_attrs["rungs"], key=int)]
                     for t in trials}
    signals = {"validation loss (negated)": ("eval_loss", -1.0),
               f"{metric} on the signal slice": (f"eval_slice_{metric}", 1.0)}
    for rung, by_trial in rungs.items():
        at = [t for t in trials if by_trial[t.number] is not None]
        if len(at) < min_trials:
            continue
        final = np.array([t.value for t in at])
        for name, (key, sign) in signals.items():
            got = np.array([sign * by_trial[t.number][key] for t in at])
            rho, low, high = spearman_interval(got, final)
            lines.append(f"| {rung} | {len(at)} | {name} | {rho:+.2f} [{low:+.2f}, {high:+.2f}] |")
    return "\n".join(lines)


def config(args: argparse.Namespace) -> Config:
    data = load_yaml(ROOT / "configs" / "aclsum-smollm2-search.yaml")
    for key, value in {"output_dir": str(args.out), "search.pruner": "median",
                       "search.prune_signal": "rouge", "search.sampler": "random",
                       "search.n_trials": args.trials, "search.final": False,
                       "search.signal_examples": args.signal_examples,
                       "search.train_examples": args.train_examples,
                       "search.eval_examples": args.eval_examples,
                       "search.intermediate_steps": args.intermediate_steps}.items():
        set_dotted(data, key, value)
    return config_from_dict(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--signal_examples", type=int, default=8)
    parser.add_argument("--train_examples", type=int, default=24)
    parser.add_argument("--eval_examples", type=int, default=16)
    parser.add_argument("--worker", type=int, default=0,
                        help="processes sharing the study draw from their own seeds")
    parser.add_argument("--intermediate_steps", type=int, default=2)
    parser.add_argument("--min_trials", type=int, default=8,
                        help="rungs reached by fewer trials are left out of the table")
    parser.add_argument("--out", type=Path, default=Path("/tmp/peftune-pruning-signal"))
    parser.add_argument("--table_only", action="store_true",
                        help="print the table of the trials in --out, run none")
    args = parser.parse_args()
    cfg = config(args)
    args.out.mkdir(parents=True, exist_ok=True)
    # the objective evaluates at every rung as for a median pruner; the study itself never
    # prunes, so every trial runs to its final score
    study = optuna.create_study(
        study_name="pruning-signal", storage=optuna.storages.RDBStorage(
            f"sqlite:///{args.out.resolve() / 'study.db'}",
            engine_kwargs={"connect_args": {"timeout": 60}}),
        sampler=optuna.samplers.RandomSampler(seed=search.sampler_seed(cfg.seed, args.worker)),
        pruner=optuna.pruners.NopPruner(),
        direction="maximize", load_if_exists=True)
    if args.table_only:
        print(table(study, cfg.search.metric, min_trials=args.min_trials))
        return
    bases, data = search.load_for_search(cfg)
    objective = search.Objective(cfg, bases, data)
    while len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) < args.trials:
        study.optimize(objective, n_trials=1, gc_after_trial=True)
        text = table(study, cfg.search.metric, min_trials=args.min_trials)
        (args.out / "table.md").write_text(text + "\n")
        (args.out / "trials.json").write_text(json.dumps(
            [{"number": t.number, "params": t.params, "final": t.value,
              "rungs": t.user_attrs.get("rungs")} for t in study.trials], indent=1))
        print(text, flush=True)


if __name__ == "__main__":
    main()
