"""Experiment tracking through the Trainer's own integrations, chosen with ``train.report_to``.

``--train.report_to tensorboard`` writes event files under ``OUTPUT_DIR/checkpoints/runs/``;
``--train.report_to mlflow`` logs to ``MLFLOW_TRACKING_URI`` (``./mlruns`` when unset). Both
get the Trainer's metrics (loss, learning rate, eval loss) and the run's arguments.

A search trial is one tracked run, named after the study and trial and tagged with both::

    with tracking.trial_run(cfg.train, study.study_name, trial.number) as train_cfg:
        cfg.train = train_cfg
        metrics = training.fit(cfg, model, data, output_dir=...)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from peftune.config import TrainConfig

STUDY_TAG = "optuna.study_name"
TRIAL_TAG = "optuna.trial_number"


def trial_run_name(study_name: str, trial_number: int) -> str:
    return f"{study_name}-trial-{trial_number:04d}"


def trial_tags(study_name: str, trial_number: int) -> dict[str, str]:
    return {STUDY_TAG: study_name, TRIAL_TAG: str(trial_number)}


@contextmanager
def trial_run(train: TrainConfig, study_name: str, trial_number: int) -> Iterator[TrainConfig]:
    """Yield ``train`` renamed for this trial; inside, MLflow files the run under an
    experiment named after the study (unless ``MLFLOW_EXPERIMENT_NAME`` says otherwise) with
    the study and trial tags.

    The Trainer's MLflow integration reads these variables when training starts, so they
    are set only around the trial and restored afterwards.
    """
    env = {"MLFLOW_TAGS": json.dumps(trial_tags(study_name, trial_number)),
           "MLFLOW_EXPERIMENT_NAME": os.environ.get("MLFLOW_EXPERIMENT_NAME", study_name)}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield replace(train, run_name=trial_run_name(study_name, trial_number))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
