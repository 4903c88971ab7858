"""Optuna search over PEFT methods and hyperparameters, then a final retrain of the best.

Run it with ``peftune search --config configs/aclsum-smollm2-search.yaml``. The base model
and the tokenized data are loaded once per worker; each trial wraps the base with a fresh
adapter and removes it afterwards. The study lives in ``OUTPUT_DIR/study.db`` (SQLite) unless
``search.storage`` names another Optuna storage; running the command again resumes the
study and tops it up to ``search.n_trials``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
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
from transformers import PreTrainedModel, TrainerCallback

from peftune import assembly, card, devices, lock, plan, tracking
from peftune import train as training
from peftune.config import Config, SearchConfig, save_yaml
from peftune.errors import ConfigError, Diverged, Interrupted
from peftune.evaluate import (
    compare_predictions,
    generate,
    prompts_of,
    score,
    text_scores,
    write_examples,
)
from peftune.methods import get_method
from peftune.rundir import update_metrics

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
BOOTSTRAP_RESAMPLES = 2000  # seconds even for thousands of documents

# Set by `spawn_workers` for each worker process: its number (1..N; the main process is 0)
# and the process id of the search that started it.
WORKER_ENV = "PEFTUNE_SEARCH_WORKER"
PARENT_ENV = "PEFTUNE_SEARCH_PARENT"


# ---------------------------------------------------------------- search space

def suggest(trial: optuna.trial.BaseTrial, cfg: Config) -> Config:
    """Draw one configuration: shared training parameters, the method, then its own options.

    Only the chosen method's parameters are drawn, so the space is conditional.
    """
    space = cfg.search.space
    name = trial.suggest_categorical("method", cfg.search.methods)
    batch = trial.suggest_categorical("batch_size", space.batch_size)
    micro = cfg.train.micro_batch_size
    micro = micro if micro == "auto" else math.gcd(batch, micro)
    train = replace(
        cfg.train,
        learning_rate=trial.suggest_float("learning_rate", *space.learning_rate, log=True),
        batch_size=batch,
        micro_batch_size=micro,
        epochs=trial.suggest_categorical("epochs", space.epochs),
        warmup_ratio=trial.suggest_float("warmup_ratio", *space.warmup_ratio),
        weight_decay=trial.suggest_float("weight_decay", *space.weight_decay),
    )
    method = get_method(name)
    options = replace(cfg.methods[name], **method.search_space(trial)) \
        if cfg.search.tune_method_options else cfg.methods[name]
    new = copy.deepcopy(cfg)
    new.method, new.train = name, train
    new.methods[name] = options
    return new


# ---------------------------------------------------------------- study

def storage_for(cfg: Config) -> optuna.storages.BaseStorage:
    url = cfg.search.storage
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    beat = cfg.search.heartbeat_seconds
    if url == "journal":
        return JournalWithHeartbeat(JournalFileBackend(str(run_dir / "study.journal")), beat)
    url = url or f"sqlite:///{run_dir.resolve() / 'study.db'}"
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


# ---------------------------------------------------------------- one trial

def signal_metric(search: SearchConfig) -> str:
    """The evaluation metric a trial reports at each rung: the study's ROUGE key on the signal
    rows (``eval_slice_rougeL``), or the validation loss (also what a search without a pruner
    reports, at the end of each epoch)."""
    if search.prune_signal == "loss" or search.metric == "eval_loss" or \
            pruner_name(search) == "none":
        return "eval_loss"
    return f"eval_{training.SLICE_PREFIX}{search.metric}"


class ReportToTrial(TrainerCallback):
    """Sends ``metric`` (an evaluation metric, see :func:`signal_metric`) to Optuna as the
    intermediate value and stops pruned trials.

    A loss is negated when the study maximizes ROUGE, so the pruner compares in the
    direction of the objective. Every rung's validation loss and ROUGE on the signal rows
    (where computed) are also kept in the trial's user attribute ``rungs``, by step.
    """

    def __init__(self, trial: optuna.Trial, *, metric: str, sign: float) -> None:
        self.trial, self.metric, self.sign, self.pruned_at = trial, metric, sign, None
        self.rungs: dict[str, dict[str, float]] = {}

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None,
                    **kwargs: Any) -> None:
        metrics = metrics or {}
        self.rungs[str(state.global_step)] = {
            key: value for key, value in metrics.items()
            if key == "eval_loss" or key.startswith(f"eval_{training.SLICE_PREFIX}")}
        self.trial.set_user_attr("rungs", self.rungs)
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        self.trial.report(self.sign * value, step=state.global_step)
        if self.trial.should_prune():
            self.pruned_at = state.global_step
            control.should_training_stop = True


def unwrap(model: Any) -> PreTrainedModel:
    """Remove the adapter, returning the untouched base model for the next trial."""
    inner = model.base_model
    return inner.unload() if hasattr(inner, "unload") else model.get_base_model()


class Objective:
    """Trains and scores one configuration on a base model loaded once per worker (one per
    load configuration: k-bit methods get their own quantized base)."""

    def __init__(self, cfg: Config, bases: assembly.Bases, data: assembly.Prepared) -> None:
        self.cfg, self.bases = cfg, bases
        self.keys: dict[tuple, set[str]] = {}
        # trials see a fixed subset: validation rows for ROUGE and the pruner's loss, and
        # optionally fewer training rows (a cheaper fidelity than the final model's)
        val = data.splits["validation"]
        self.eval_ds = val.select(range(min(cfg.search.eval_examples, len(val))))
        train = data.splits["train"]
        n = cfg.search.train_examples
        if n and n < len(train):
            train = train.shuffle(seed=cfg.seed).select(range(n))
        self.data = dataclasses.replace(data, splits={**data.splits, "train": train,
                                                      "validation": self.eval_ds})

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        cfg = suggest(trial, self.cfg)
        cfg.output_dir = str(Path(self.cfg.output_dir) / "trials" / f"trial-{trial.number:04d}")
        # the pruner's signal at intermediate steps; without a pruner, a trial's only
        # validation loss is the one at the end of each epoch. Pruning is a search's early
        # stopping: trials do not stop on train.early_stopping too.
        pruning = pruner_name(self.cfg.search) != "none"
        cfg.train = replace(cfg.train, save_checkpoints=False, early_stopping=0,
                            eval_steps=self.cfg.search.intermediate_steps if pruning else None,
                            report_to=self.cfg.train.report_to)
        trial.set_user_attr("config", cfg.to_dict())
        base = self.bases.get(cfg)
        keys = self.keys.setdefault(assembly.base_key(cfg), set(base.state_dict()))
        model = training.wrap(base, cfg)
        try:
            return self._train_and_score(trial, cfg, model)
        finally:
            base = unwrap(model)
            self.bases.put(cfg, base)
            devices.free_memory()  # the trial's optimizer state and activations
            if set(base.state_dict()) != keys:
                raise RuntimeError("adapter removal left modules behind in the base model")

    def _reporter(self, trial: optuna.Trial,
                  cfg: Config) -> tuple[ReportToTrial, training.RougeSignal | None]:
        """What reports to the pruner, and the ROUGE signal it reads (None for the loss)."""
        search = self.cfg.search
        metric = signal_metric(search)
        if metric == "eval_loss":
            return ReportToTrial(trial, metric=metric, sign=-1.0 if directions(search)[0] ==
                                 "maximize" else 1.0), None
        return ReportToTrial(trial, metric=metric, sign=1.0), \
            training.RougeSignal.of(cfg, self.data, search.signal_examples)

    def _train_and_score(self, trial: optuna.Trial, cfg: Config, model: Any) -> Any:
        search = self.cfg.search
        reporter, signal = self._reporter(trial, cfg)
        start = time.perf_counter()
        try:
            with tracking.trial_run(cfg.train, trial.study.study_name, trial.number,
                                    params=trial.params) as tracked:
                cfg.train = tracked  # one tracked run per trial, tagged with study and number
                metrics = training.fit(cfg, model, self.data, output_dir=Path(cfg.output_dir),
                                       callbacks=[] if search.second_objective else [reporter],
                                       signal=signal)
        except Diverged as err:
            trial.set_user_attr("reason", str(err))
            raise optuna.TrialPruned(str(err)) from None
        except Interrupted:
            # trials keep no checkpoints: queue the same parameters to run again
            trial.set_user_attr("reason", "interrupted by a signal; queued again")
            trial.study.enqueue_trial(trial.params, skip_if_exists=False)
            raise
        if reporter.pruned_at is not None:
            reason = (f"pruned by {self.cfg.search.pruner} at step {reporter.pruned_at} "
                      f"({reporter.metric})")
            trial.set_user_attr("reason", reason)
            raise optuna.TrialPruned(reason)
        generating = time.perf_counter()
        preds = generate(model, self.data.tokenizer, prompts_of(self.eval_ds), cfg.eval,
                         precision=assembly.precision(cfg))
        seconds = time.perf_counter() - generating
        rouge, per_doc = text_scores(preds, self.eval_ds["summary"])
        values = {**rouge, "eval_loss": metrics.get("eval_loss", math.nan),
                  "trainable_params": metrics["trainable_parameters"],
                  "train_time": time.perf_counter() - start,  # training and scoring
                  "generation_seconds_per_document": seconds / max(1, len(preds))}
        if search.metric in per_doc:  # for noise-aware ranking (report.within_noise)
            values["document_scores"] = [round(v, 4) for v in per_doc[search.metric]]
        for key, value in values.items():
            trial.set_user_attr(key, value)
        first = values[search.metric]
        return (first, values[search.second_objective]) if search.second_objective else first


# ---------------------------------------------------------------- driver

def optimize(cfg: Config, study: optuna.Study, objective: Objective) -> None:
    """Run trials until the study holds ``n_trials`` finished ones, sharing with other workers.

    A trial still RUNNING elsewhere counts; if its worker died, its heartbeat stops (or its
    process is seen gone, on this host), it is marked failed and the retry callback queues
    it again. (Optuna's ``MaxTrialsCallback`` stops a worker once enough trials exist,
    counting running ones, but cannot wait for them and top the study up when one of them
    dies.)
    """
    target = cfg.search.n_trials
    waiting = WaitingLog()
    while True:
        if orphaned():
            log.warning("the search that started this worker is gone: no new trial")
            return
        optuna.storages.fail_stale_trials(study)
        finished = count(study, FINISHED)
        running = count(study, (TrialState.RUNNING,))
        if finished >= target:
            return
        if finished + running >= target:
            # others are running the last trials: wait for them to finish or go stale
            waiting.report(study)
            time.sleep(cfg.search.heartbeat_seconds)
            continue
        study.optimize(_claimed(objective), n_trials=1, gc_after_trial=True)


def _claimed(objective: Objective) -> Any:
    def run(trial: optuna.Trial) -> Any:
        claim(trial)
        return objective(trial)
    return run


class WaitingLog:
    """Says, at most every ``every`` seconds, which trials a search waits for, whose they
    are and when each counts as stale: a search never waits in silence."""

    def __init__(self, every: float = 30.0) -> None:
        self.every, self.last = every, -math.inf

    def report(self, study: optuna.Study) -> None:
        if time.monotonic() - self.last < self.every:
            return
        self.last = time.monotonic()
        storage = _liveness(study)
        if storage is None:
            return
        trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        silent = storage.silent_for(trials)
        log.info("waiting for %d trial(s) running elsewhere: %s", len(trials), "; ".join(
            f"trial {t.number} ({owner_name(t)}), stale in "
            f"{max(0.0, storage.grace - silent.get(t._trial_id, 0.0)):.0f} s if its heartbeat "
            "stops" for t in trials))


def _liveness(study: optuna.Study) -> Liveness | None:
    """The study's storage, seen through Optuna's cache around RDB storages."""
    for storage in (study._storage, getattr(study._storage, "_backend", None)):
        if isinstance(storage, Liveness):
            return storage
    return None


def load_for_search(cfg: Config) -> tuple[assembly.Bases, assembly.Prepared]:
    """The tokenized splits, and the base models (loaded when a trial first needs them)."""
    data = assembly.prepare(cfg, roles=("train", "validation", "test"))
    return assembly.Bases(data.tokenizer), data


def best_config(cfg: Config, study: optuna.Study) -> Config:
    trials = study.best_trials if cfg.search.second_objective else [study.best_trial]
    primary = directions(cfg.search)[0]
    best = (max if primary == "maximize" else min)(trials, key=lambda t: t.values[0])
    chosen = suggest(optuna.trial.FixedTrial(best.params), cfg)
    chosen.output_dir = str(Path(cfg.output_dir) / "final")
    chosen.train = replace(chosen.train, eval_steps=None)
    return chosen


def orphaned() -> bool:
    """True in a worker whose parent search has died (it was re-parented, so getppid()
    changed): it finishes its trial but takes no new one."""
    parent = os.environ.get(PARENT_ENV)
    return parent is not None and os.getppid() != int(parent)


def spawn_workers(argv: list[str], n: int) -> list[int]:
    """Run ``n`` local processes of the same search against the same study; their exit codes.

    A worker that dies is not fatal: the parent tops the study up afterwards. SIGTERM or
    SIGINT (Ctrl-C) here is passed on to every worker, which stops its trial and queues it
    again; then this raises :class:`Interrupted`.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n)),
           PARENT_ENV: str(os.getpid())}
    # Own process groups: a terminal's Ctrl-C reaches the workers once, forwarded from here,
    # not twice (a second SIGINT stops a worker at once, without queueing its trial again).
    procs = [subprocess.Popen([sys.executable, "-m", "peftune", *argv, "--search.workers", "1",
                               "--search.final", "false"],
                              env={**env, **devices.worker_env(i, n), WORKER_ENV: str(i + 1)},
                              process_group=0) for i in range(n)]
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    restore = training.handle_signals(forward)
    try:
        codes = [p.wait() for p in procs]
    finally:
        restore()
    if received:
        raise Interrupted(f"stopped by signal {received[0]}; the workers' running trials are "
                          "queued again; rerun the same command to resume")
    if any(codes):
        log.warning("search workers exited with %s; finishing the study here", codes)
    return codes


def _test_score(cfg: Config, model: Any, data: assembly.Prepared, out_dir: Path,
                tag: str = "test") -> dict[str, float]:
    return score(model, data.tokenizer, data.splits["test"], cfg.eval, out_dir=out_dir,
                 tag=tag, precision=assembly.precision(cfg))


def _train_and_test(cfg: Config, bases: assembly.Bases,
                    data: assembly.Prepared) -> tuple[dict[str, float], Path]:
    """Train on the final data and score on test; return the metrics and adapter dir."""
    result = training.run(cfg, base=bases.get(cfg), data=data)
    metrics = _test_score(cfg, result.model, data, Path(cfg.output_dir))
    card.update_metrics(result.adapter_dir, metrics, cfg=cfg, tokenizer=data.tokenizer)
    bases.put(cfg, unwrap(result.model))
    return metrics, result.adapter_dir


def finalize(cfg: Config, study: optuna.Study, bases: assembly.Bases,
             data: assembly.Prepared) -> dict[str, Any]:
    """Retrain the best configuration, score it once on the test split, write best.yaml.

    With ``search.baselines`` the zero-shot model and the default configuration are scored
    on the same test rows, the default trained on the same data as the final model.
    """
    run_dir = Path(cfg.output_dir)
    final = best_config(cfg, study)
    save_yaml(final, run_dir / "best.yaml")
    if cfg.search.final_on == "train+validation":
        import datasets

        joined = datasets.concatenate_datasets([data.splits["train"], data.splits["validation"]])
        data = replace(data, splits={**data.splits, "train": joined})
    out: dict[str, Any] = {"config": final, "baselines": {}}
    if cfg.search.baselines:
        out["baselines"]["zero-shot"] = _test_score(cfg, bases.get(cfg), data,
                                                    run_dir / "zero-shot")
        default = copy.deepcopy(cfg)
        default.output_dir = str(run_dir / "default")
        out["baselines"]["default"], _ = _train_and_test(default, bases, data)
    out["test"], out["adapter"] = _train_and_test(final, bases, data)
    out["trial"] = study.best_trials[0].number if cfg.search.second_objective \
        else study.best_trial.number
    out["comparison"] = _compare(run_dir, data.splits["test"], baselines=list(out["baselines"]),
                                 seed=cfg.seed)
    update_metrics(run_dir / "final", "numerics", devices.numerics())
    return out


EXAMPLES = 5  # test documents shown with every system's summary in the report


def _compare(run_dir: Path, test: Any, *, baselines: list[str], seed: int) -> dict | None:
    """The final model against each baseline, per test document, with bootstrap intervals
    (``final/metrics.json`` key ``comparison``); and a few examples for the report."""
    final_dir = run_dir / "final"
    preds = {name: run_dir / name / "predictions.jsonl" for name in baselines}
    documents = list(test.select(range(min(EXAMPLES, len(test))))["document"])
    write_examples(final_dir / "examples.jsonl", documents,
                   {**preds, "best": final_dir / "predictions.jsonl"})
    if not baselines:
        return None
    comparison = compare_predictions(final_dir / "predictions.jsonl", preds,
                                     resamples=BOOTSTRAP_RESAMPLES, seed=seed)
    update_metrics(final_dir, "comparison", comparison)
    return comparison


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
    save_yaml(cfg, Path(cfg.output_dir) / "config.yaml")
    study = create_study(cfg)
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
