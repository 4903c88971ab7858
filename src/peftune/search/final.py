"""The search's end: retrain the best configuration (and the baselines), score each once on
the test split, and compare them document by document."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna

from peftune import assembly, card, checkpoints, devices, models
from peftune import train as training
from peftune.config import Config, save_yaml
from peftune.generation import score
from peftune.metrics import compare_predictions, write_examples
from peftune.rundir import RunDir
from peftune.search import ranking
from peftune.search.objective import suggest
from peftune.search.study import DEFAULT_ATTR, KEPT_ATTR, directions, kept_adapter

log = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 2000  # seconds even for thousands of documents


def best_trial(cfg: Config, study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The best trial: the one re-scoring chose (:mod:`~peftune.search.ranking`), else the
    best by its validation score; of a Pareto front, the one best on the first objective."""
    if (number := ranking.chosen(study)) is not None:
        return study.trials[number]
    trials = study.best_trials if cfg.search.second_objective else [study.best_trial]
    primary = directions(cfg.search)[0]
    return (max if primary == "maximize" else min)(trials, key=lambda t: t.values[0])


def best_config(cfg: Config, study: optuna.Study) -> Config:
    chosen = suggest(optuna.trial.FixedTrial(best_trial(cfg, study).params), cfg)
    chosen.output_dir = str(RunDir.of(cfg).final.path)
    chosen.train = replace(chosen.train, eval_steps=None)
    return chosen


def _test_score(cfg: Config, model: Any, data: assembly.Prepared, out_dir: Path,
                tag: str = "test") -> dict[str, float]:
    return score(model, data.tokenizer, data.splits["test"], cfg.eval, out_dir=out_dir,
                 tag=tag, precision=models.precision(cfg))


def _train_and_test(cfg: Config, bases: assembly.Bases, data: assembly.Prepared,
                    trial: optuna.trial.FrozenTrial | None = None,
                    run: RunDir | None = None) -> tuple[dict[str, float], Path]:
    """Train on the final data and score on test; return the metrics and adapter dir. A
    ``trial`` of the search in ``run`` whose kept adapter was trained exactly so (its
    training fingerprint) is that model: it is copied, not trained again."""
    kept = kept_adapter(run, trial) if trial is not None and run is not None else None
    if kept and trial.user_attrs[KEPT_ATTR] == checkpoints.fingerprint(  # type: ignore[union-attr]
            cfg, len(data.splits["train"])):
        log.info("%s: the adapter of %s, trained on the same data with the same settings",
                 cfg.output_dir, kept.parent.name)
        metrics = json.loads(RunDir(kept.parent).metrics_file.read_text())["train"]
        result = training.adopt(cfg, kept, base=bases.get(cfg), data=data, metrics=metrics)
    else:
        result = training.run(cfg, base=bases.get(cfg), data=data)
    metrics = _test_score(cfg, result.model, data, Path(cfg.output_dir))
    card.update_metrics(result.adapter_dir, metrics, cfg=cfg, tokenizer=data.tokenizer)
    bases.put(cfg, assembly.unwrap(result.model))
    return metrics, result.adapter_dir


def finalize(cfg: Config, study: optuna.Study, bases: assembly.Bases,
             data: assembly.Prepared) -> dict[str, Any]:
    """Retrain the best configuration, score it once on the test split, write best.yaml. A
    trial that trained on the same data with the same settings (every training row, no
    ``final_on: train+validation``) is the final model as it is, not trained again.

    With ``search.baselines`` the zero-shot model and the default configuration are scored
    on the same test rows, the default trained on the same data as the final model.
    """
    run_dir = RunDir.of(cfg)
    ranking.rescore(cfg, study, bases, data)
    final = best_config(cfg, study)
    save_yaml(final, run_dir.best_config)
    if cfg.search.final_on == "train+validation":
        import datasets

        joined = datasets.concatenate_datasets([data.splits["train"], data.splits["validation"]])
        data = replace(data, splits={**data.splits, "train": joined})
    out: dict[str, Any] = {"config": final, "baselines": {}}
    best = best_trial(cfg, study)
    if cfg.search.baselines:
        out["baselines"]["zero-shot"] = _test_score(cfg, bases.get(cfg), data,
                                                    run_dir.baseline("zero-shot").path)
        default = copy.deepcopy(cfg)
        default.output_dir = str(run_dir.baseline("default").path)
        out["baselines"]["default"], _ = _train_and_test(default, bases, data,
                                                         _marked(study, DEFAULT_ATTR), run_dir)
    out["test"], out["adapter"] = _train_and_test(final, bases, data, best, run_dir)
    out["trial"] = best.number
    out["comparison"] = _compare(run_dir, data.splits["test"], baselines=list(out["baselines"]),
                                 seed=cfg.seed)
    run_dir.final.record_metrics("numerics", devices.numerics())
    return out


def _marked(study: optuna.Study, attr: str) -> optuna.trial.FrozenTrial | None:
    """The complete trial marked with user attribute ``attr``."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return next((trial for trial in complete if trial.user_attrs.get(attr)), None)


EXAMPLES = 5  # test documents shown with every system's summary in the report


def _compare(run: RunDir, test: Any, *, baselines: list[str], seed: int) -> dict | None:
    """The final model against each baseline, per test document, with bootstrap intervals
    (``final/metrics.json`` key ``comparison``); and a few examples for the report."""
    final = run.final
    preds = {name: run.baseline(name).predictions() for name in baselines}
    documents = list(test.select(range(min(EXAMPLES, len(test))))["document"])
    write_examples(final.examples, documents, {**preds, "best": final.predictions()})
    if not baselines:
        return None
    comparison = compare_predictions(final.predictions(), preds,
                                     resamples=BOOTSTRAP_RESAMPLES, seed=seed)
    final.record_metrics("comparison", comparison)
    return comparison

