"""Experiment tracking through the Trainer's own integrations, chosen with ``train.report_to``.

``--train.report_to tensorboard`` writes event files under ``OUTPUT_DIR/checkpoints/runs/``;
``--train.report_to mlflow`` logs to ``MLFLOW_TRACKING_URI`` (``./mlruns`` when unset). Both
get the Trainer's metrics (loss, learning rate, eval loss) and the run's arguments, and
:class:`RunParams` adds what runs are compared on: the method and its options, the data
source and sizes, the model, and a search trial's parameters (MLflow params, TensorBoard
hparams).

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
from dataclasses import fields, replace
from typing import Any

from transformers import TrainerCallback

from peftune.config import Config, TrainConfig

STUDY_TAG = "optuna.study_name"
TRIAL_TAG = "optuna.trial_number"


def trial_run_name(study_name: str, trial_number: int) -> str:
    return f"{study_name}-trial-{trial_number:04d}"


def trial_tags(study_name: str, trial_number: int) -> dict[str, str]:
    return {STUDY_TAG: study_name, TRIAL_TAG: str(trial_number)}


_trial_params: dict[str, Any] = {}
"""The parameters of the search trial being trained (set by :func:`trial_run`)."""


@contextmanager
def trial_run(train: TrainConfig, study_name: str, trial_number: int, *,
              params: dict[str, Any] | None = None) -> Iterator[TrainConfig]:
    """Yield ``train`` renamed for this trial; inside, MLflow files the run under an
    experiment named after the study (unless ``MLFLOW_EXPERIMENT_NAME`` says otherwise) with
    the study and trial tags, and the trial's ``params`` are logged as ``trial.NAME``.

    The Trainer's MLflow integration reads these variables when training starts, so they
    are set only around the trial and restored afterwards.
    """
    env = {"MLFLOW_TAGS": json.dumps(trial_tags(study_name, trial_number)),
           "MLFLOW_EXPERIMENT_NAME": os.environ.get("MLFLOW_EXPERIMENT_NAME", study_name)}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    _trial_params.update(params or {})
    try:
        yield replace(train, run_name=trial_run_name(study_name, trial_number))
    finally:
        _trial_params.clear()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _loggable(value: Any) -> str | int | float | bool:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "default"
    return value if isinstance(value, (str, int, float, bool)) else str(value)


def run_params(cfg: Config, sizes: dict[str, int]) -> dict[str, str | int | float | bool]:
    """What runs are compared on, flat: ``method``, ``lora.r``, ``data.train_examples``,
    ``trial.learning_rate``, ... (the Trainer logs its own arguments besides)."""
    options = cfg.method_options
    params: dict[str, Any] = {"method": cfg.method, "model.name": cfg.model.name,
                              "data.source": cfg.data.source}
    params.update({f"{cfg.method}.{f.name}": getattr(options, f.name) for f in fields(options)})
    params.update({f"data.{split}_examples": n for split, n in sizes.items()})
    params.update({f"trial.{name}": value for name, value in _trial_params.items()})
    return {key: _loggable(value) for key, value in params.items()}


class RunParams(TrainerCallback):
    """Logs :func:`run_params` to the trackers in ``train.report_to`` when training starts,
    after the Trainer's own integrations have opened their runs."""

    def __init__(self, params: dict[str, Any], callbacks: list[Any]) -> None:
        self.params, self.callbacks = params, callbacks

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if "mlflow" in args.report_to:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_params(self.params)
        for callback in self.callbacks:
            writer = getattr(callback, "tb_writer", None)
            if writer is not None and hasattr(writer, "_get_file_writer"):
                from torch.utils.tensorboard.summary import hparams

                # into the run's own event file (SummaryWriter.add_hparams opens another)
                for summary in hparams(self.params, {}):
                    writer._get_file_writer().add_summary(summary)
