"""Running trials until the study is full, here and in worker processes that share it."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from peftune import devices
from peftune import train as training
from peftune.config import Config
from peftune.errors import Interrupted
from peftune.search.objective import Objective
from peftune.search.study import FINISHED, WORKER_ENV, Liveness, claim, count, owner_name

log = logging.getLogger(__name__)

# Set by `spawn_workers` for each worker process: the process id of the search that
# started it.
PARENT_ENV = "PEFTUNE_SEARCH_PARENT"


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
