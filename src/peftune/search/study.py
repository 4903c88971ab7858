"""The Optuna study: its storage (SQLite, PostgreSQL or a journal file), sampler and pruner,
the heartbeats that tell a live trial from a dead one, and which process owns each trial."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import psutil
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat  # optuna 5.0 exports it nowhere else
from optuna.storages._rdb import models as rdb_models  # the heartbeat table: no public API
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState
from sqlalchemy import func as sql_func
from sqlalchemy.exc import IntegrityError, OperationalError

from peftune.config import Config, SearchConfig
from peftune.errors import ConfigError
from peftune.rundir import RunDir

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

# The user attribute that marks the trial of the configured (default) configuration.
DEFAULT_ATTR = "default_configuration"
# The user attribute of a trial that kept its adapter: the training fingerprint
# (``checkpoints.fingerprint``) the final model must match to be that adapter.
KEPT_ATTR = "kept_adapter_fingerprint"

# Set by `workers.spawn_workers` for each worker process: its number (1..N; the main
# process is 0).
WORKER_ENV = "PEFTUNE_SEARCH_WORKER"


def storage_for(cfg: Config) -> optuna.storages.BaseStorage:
    url = cfg.search.storage
    run_dir = RunDir.of(cfg)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    beat = cfg.search.heartbeat_seconds
    if url == "journal":
        return JournalWithHeartbeat(JournalFileBackend(str(run_dir.study_journal)), beat)
    url = url or f"sqlite:///{RunDir(run_dir.path.resolve()).study_db}"
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    attempts = 3
    for attempt in range(attempts):
        try:
            return _rdb_storage(url, kwargs, beat)
        except (IntegrityError, OperationalError) as err:
            # Workers that open a fresh database at the same moment race to create its
            # schema; the loser sees the winner's tables on the next try.
            last = err
            if attempt + 1 < attempts:
                time.sleep(0.5 + attempt)
        except Exception as err:  # SQLAlchemy raises driver-specific errors
            last = err
            break
    raise ConfigError(f"search.storage: cannot open {url}: {str(last).splitlines()[0]}") \
        from None


# Heartbeats let a crashed worker's trial be marked failed and retried: a trial silent for
# this many beats is stale, and a stale trial is queued again at most twice.
STALE_AFTER_BEATS = 4


def _retry_stale() -> RetryHeartbeatStaleTrialCallback:
    return RetryHeartbeatStaleTrialCallback(max_retry=2)


def _rdb_storage(url: str, engine_kwargs: dict, beat: int) -> RDBStorage:
    return RDBWithLiveness(url, engine_kwargs=engine_kwargs, heartbeat_interval=beat,
                           grace_period=STALE_AFTER_BEATS * beat,
                           heartbeat_stale_trial_callback=_retry_stale())


# ---------------------------------------------------------------- who runs a trial

def _owner_key(trial_id: int) -> str:
    # per trial id: a retried trial inherits its predecessor's system attributes
    return f"peftune:owner:{trial_id}"


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (None when it is gone or a zombie): with the pid, it
    names one process even after the pid is reused."""
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except psutil.Error:
        return None


def me() -> dict[str, Any]:
    """This process, as a trial's owner: host, pid and the pid's start time."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": _process_start(os.getpid())}


def claim(trial: optuna.Trial) -> None:
    """Record this process as the owner of ``trial`` (a system attribute of the study)."""
    trial.storage.set_trial_system_attr(trial._trial_id, _owner_key(trial._trial_id), me())


def owner_of(trial: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    return trial.system_attrs.get(_owner_key(trial._trial_id))


def owner_gone(owner: dict[str, Any] | None) -> bool:
    """True when ``owner`` is a process on this host that no longer runs. A pid now used
    by another process (its start time differs) counts as gone; an owner on another host,
    or this very process, never does: only its heartbeat tells."""
    if not owner or owner.get("host") != socket.gethostname() or owner["pid"] == os.getpid():
        return False
    started = _process_start(owner["pid"])
    return started is None or (owner.get("started") is not None
                               and abs(started - owner["started"]) > 1.0)


def owner_name(trial: optuna.trial.FrozenTrial) -> str:
    owner = owner_of(trial)
    return f"{owner['host']}:{owner['pid']}" if owner else "unknown owner"


class Liveness:
    """What both our storages add to Optuna's heartbeat.

    Optuna fails a RUNNING trial whose heartbeat stopped, but never one that died before
    its first beat: that trial stayed RUNNING forever and a resumed search waited for it.
    Here a trial's last sign of life is its last heartbeat or, before the first, its start;
    a trial silent for the grace period is stale, and so at once is one whose owning
    process on this host is gone. Optuna's ``fail_stale_trials`` then fails it and the
    retry callback queues its parameters again.
    """

    grace: float

    def silent_for(self, running: list[optuna.trial.FrozenTrial]) -> dict[int, float]:
        """Seconds since each of the ``running`` trials' last heartbeat (or its start)."""
        raise NotImplementedError

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        trials = self.get_all_trials(study_id, deepcopy=False,  # type: ignore[attr-defined]
                                     states=(TrialState.RUNNING,))
        silent = self.silent_for(trials)
        return [t._trial_id for t in trials
                if silent.get(t._trial_id, 0.0) > self.grace or owner_gone(owner_of(t))]


def _since_start(trial: optuna.trial.FrozenTrial) -> float:
    # datetime_start is the writer's local clock, as datetime.now() is here
    assert trial.datetime_start is not None  # a RUNNING trial has started
    return (datetime.now() - trial.datetime_start).total_seconds()


class RDBWithLiveness(Liveness, RDBStorage):
    """Optuna's SQLite/PostgreSQL storage, with the stale rules of :class:`Liveness`."""

    @property
    def grace(self) -> float:  # type: ignore[override]
        return float(self.grace_period or 2 * (self.heartbeat_interval or 0))

    def silent_for(self, running: list[optuna.trial.FrozenTrial]) -> dict[int, float]:
        ids = [t._trial_id for t in running]
        beat = rdb_models.TrialHeartbeatModel
        with _create_scoped_session(self.scoped_session) as session:
            # heartbeats are written with the database's clock: compare with it
            now = session.execute(sql_func.now()).scalar().replace(tzinfo=None)
            beats = dict(session.query(beat.trial_id, beat.heartbeat)
                         .filter(beat.trial_id.in_(ids)).all())
        return {t._trial_id: (now - beats[t._trial_id]).total_seconds()
                if t._trial_id in beats else _since_start(t) for t in running}


class JournalWithHeartbeat(Liveness, JournalStorage, BaseHeartbeat):
    """Optuna's journal file with the heartbeats its RDB storages have.

    Each running trial's worker stamps the time into a system attribute named after the
    trial; Optuna's own loop then fails a trial silent for ``STALE_AFTER_BEATS`` beats and
    the retry callback queues it again, exactly as with SQLite or PostgreSQL.
    """

    def __init__(self, backend: JournalFileBackend, beat: int) -> None:
        super().__init__(backend)
        self._beat = beat
        self.grace = STALE_AFTER_BEATS * beat
        self._retry = _retry_stale()

    @staticmethod
    def _key(trial_id: int) -> str:
        # per trial id: a retried trial inherits its predecessor's system attributes
        return f"peftune:heartbeat:{trial_id}"

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, self._key(trial_id), time.time())

    def silent_for(self, running: list[optuna.trial.FrozenTrial]) -> dict[int, float]:
        now = time.time()
        return {t._trial_id: now - t.system_attrs[self._key(t._trial_id)]
                if self._key(t._trial_id) in t.system_attrs else _since_start(t)
                for t in running}

    def get_heartbeat_interval(self) -> int:
        return self._beat

    def get_heartbeat_stale_trial_callback(self) -> RetryHeartbeatStaleTrialCallback:
        return self._retry


def kept_adapter(run: RunDir, trial: optuna.trial.FrozenTrial) -> Path | None:
    """The adapter a trial kept (``search.keep_adapters``), when it is on this machine's disk."""
    folder = run.trial(trial.number).adapter
    return folder if trial.user_attrs.get(KEPT_ATTR) and folder.is_dir() else None


def directions(search: SearchConfig) -> list[str]:
    first = "minimize" if search.metric == "eval_loss" else "maximize"
    return [first] + (["minimize"] if search.second_objective else [])


def pruner_name(search: SearchConfig) -> str:
    """The pruner a study uses: none for a Pareto search (Optuna prunes single objectives
    only)."""
    return "none" if search.second_objective else search.pruner


def sampler_seed(seed: int, worker: int) -> int:
    """The sampler seed of worker ``worker`` (0: the main process keeps ``seed``). Workers
    sharing a study each draw their own stream; the same (seed, worker) draws the same one."""
    if worker == 0:
        return seed
    return int(np.random.SeedSequence([seed, worker]).generate_state(1)[0])


def create_study(cfg: Config, *, worker: int | None = None) -> optuna.Study:
    """Open (or create) the study; ``worker`` defaults to this process's worker number."""
    search = cfg.search
    if worker is None:
        worker = int(os.environ.get(WORKER_ENV, "0"))
    seed = sampler_seed(cfg.seed, worker)
    if search.sampler == "tpe":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, n_startup_trials=min(
                5, max(1, search.n_trials // 3)))
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    pruner: optuna.pruners.BasePruner = {
        "hyperband": optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3),
        "median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
        "none": optuna.pruners.NopPruner(),
    }[pruner_name(search)]
    name = search.study_name or Path(cfg.output_dir).resolve().name
    study = optuna.create_study(study_name=name, storage=storage_for(cfg), sampler=sampler,
                                pruner=pruner, directions=directions(search),
                                load_if_exists=True)
    _check_same_question(study, cfg)
    return study


def _signature(cfg: Config) -> dict[str, Any]:
    """What makes trials comparable: a resumed study must ask the same question."""
    s = cfg.search
    return {"metric": s.metric, "second_objective": s.second_objective,
            "methods": sorted(s.methods), "space": dataclasses.asdict(s.space),
            "data": cfg.data.source, "model": cfg.model.name}


def _check_same_question(study: optuna.Study, cfg: Config) -> None:
    mine = _signature(cfg)
    stored = study.user_attrs.get("peftune")
    if stored is None:
        study.set_user_attr("peftune", mine)
        study.set_metric_names([mine["metric"]] + ([mine["second_objective"]]
                                                   if mine["second_objective"] else []))
        return
    diff = [key for key in mine if stored.get(key) != mine[key]]
    if diff:
        raise ConfigError(
            f"study '{study.study_name}' was created with a different {', '.join(diff)} "
            f"({', '.join(f'{k}={stored.get(k)!r}' for k in diff)}); use a new "
            "output_dir or search.study_name instead of mixing incomparable trials")


def count(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    return len(study.get_trials(deepcopy=False, states=states))
