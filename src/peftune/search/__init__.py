"""Optuna search over PEFT methods and hyperparameters, then a final retrain of the best.

Run it with ``peftune search --config configs/aclsum-smollm2-search.yaml``. The base model
and the tokenized data are loaded once per worker; each trial wraps the base with a fresh
adapter and removes it afterwards. The study lives in ``OUTPUT_DIR/study.db`` (SQLite) unless
``search.storage`` names another Optuna storage; running the command again resumes the
study and tops it up to ``search.n_trials``.

The parts: :mod:`~peftune.search.study` (storage, sampler, pruner, heartbeats, who owns a
trial), :mod:`~peftune.search.objective` (one trial), :mod:`~peftune.search.workers` (running
trials here and in worker processes) and :mod:`~peftune.search.final` (the best configuration
retrained, scored and compared with the baselines).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import optuna

from peftune import lock, plan
from peftune.config import Config, save_yaml
from peftune.rundir import RunDir
from peftune.search.final import best_config, finalize
from peftune.search.objective import (
    Objective,
    ReportToTrial,
    default_params,
    load_for_search,
    queue_default,
    signal_metric,
    suggest,
)
from peftune.search.ranking import RESCORED, within_noise
from peftune.search.study import (
    DEFAULT_ATTR,
    FINISHED,
    WORKER_ENV,
    count,
    create_study,
    directions,
    me,
    owner_gone,
    owner_of,
    pruner_name,
    sampler_seed,
    storage_for,
)
from peftune.search.workers import PARENT_ENV, WaitingLog, optimize, orphaned, spawn_workers

__all__ = [
    "DEFAULT_ATTR", "FINISHED", "PARENT_ENV", "RESCORED", "WORKER_ENV", "Objective",
    "ReportToTrial", "WaitingLog", "best_config", "count", "create_study", "default_params",
    "directions", "finalize", "load_for_search", "me", "optimize", "orphaned", "owner_gone",
    "owner_of", "pruner_name", "queue_default", "run", "sampler_seed", "signal_metric",
    "spawn_workers", "storage_for", "suggest", "within_noise",
]

log = logging.getLogger(__name__)


def run(cfg: Config, *, argv: list[str] | None = None) -> tuple[optuna.Study, dict | None]:
    """The whole search: trials (here or in ``search.workers`` processes), then the final
    model. Returns the study and the final model's summary (None when ``search.final`` is
    off)."""
    with _private_lock(cfg):
        return _run(cfg, argv=argv)


def _private_lock(cfg: Config) -> contextlib.AbstractContextManager:
    """The output directory's lock for a search on its own SQLite study; none for a worker
    (its parent search holds it) or for a shared storage, where processes join on purpose."""
    if cfg.search.storage or WORKER_ENV in os.environ:
        return contextlib.nullcontext()
    return lock.hold(Path(cfg.output_dir), what="search")


def _run(cfg: Config, *, argv: list[str] | None) -> tuple[optuna.Study, dict | None]:
    save_yaml(cfg, RunDir.of(cfg).config_file)
    study = create_study(cfg)
    if cfg.search.start_from_default:
        queue_default(study, cfg)
    if cfg.search.workers > 1 and argv is not None:
        spawn_workers(argv, cfg.search.workers)
    if count(study, FINISHED) >= cfg.search.n_trials and not cfg.search.final:
        return study, None
    bases, data = load_for_search(cfg)
    log.info("%s", plan.brief(plan.make(cfg, data=data)))
    optimize(cfg, study, Objective(cfg, bases, data))
    if not cfg.search.final:
        return study, None
    return study, finalize(cfg, study, bases, data)
