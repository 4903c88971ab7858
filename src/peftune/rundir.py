"""The run directory: its layout, and the settings and metrics saved there.

``train`` writes ``config.yaml``, ``checkpoints/``, ``adapter/`` (with the settings it was
trained with, ``peftune.yaml``) and ``metrics.json``; ``evaluate`` adds ``predictions.jsonl``
(``predictions_TAG.jsonl`` for other splits). A search's folder holds its study
(``study.db`` or ``study.journal``), ``trials/trial-NNNN/``, ``best.yaml``, and run folders of
their own for the final model (``final/``) and its baselines (``zero-shot/``, ``default/``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftune.atomic import atomic_write
from peftune.config import Config, config_from_dict, load_yaml

log = logging.getLogger(__name__)

ADAPTER_SETTINGS = "peftune.yaml"
"""The file in an adapter folder that holds the settings it was trained with."""


def folder_settings(path: Path) -> dict[str, Any]:
    """The settings saved in a run or adapter folder (``peftune.yaml``, ``config.yaml``), as
    a mapping that command-line flags can then override.

    A folder's files are data, never permission to run code: ``model.trust_remote_code``
    is dropped here, so only the current command line can allow remote code.
    """
    data = load_yaml(path) if path.is_file() else {}
    model = data.get("model")
    if isinstance(model, dict) and model.pop("trust_remote_code", None):
        log.warning("%s asks for model.trust_remote_code; ignored (only the command line "
                    "can allow remote code: --model.trust_remote_code true)", path)
    return data


def folder_config(path: Path) -> Config:
    return config_from_dict(folder_settings(path))


@dataclass(frozen=True)
class RunDir:
    """One run folder (``output_dir``): where each stage writes and reads.

    >>> RunDir(Path("runs/demo")).final.predictions()
    PosixPath('runs/demo/final/predictions.jsonl')
    """

    path: Path

    @classmethod
    def of(cls, cfg: Config) -> RunDir:
        """The run folder of ``cfg`` (its ``output_dir``)."""
        return cls(Path(cfg.output_dir))

    @property
    def config_file(self) -> Path:
        """The run's settings, as the command that made it was given them."""
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def predictions(self, tag: str = "test") -> Path:
        """The predictions of split ``tag`` (``test``, ``validation``, ``zero_shot_test``,
        ...): id, prediction and reference per line."""
        return self.path / ("predictions.jsonl" if tag == "test" else f"predictions_{tag}.jsonl")

    def partial_predictions(self, tag: str, key: str) -> Path:
        """Predictions of an unfinished evaluation, ``key`` naming what they depend on."""
        return self.path / f"predictions_{tag}.partial-{key}.jsonl"

    @property
    def report(self) -> Path:
        """``peftune report``'s folder: ``index.html`` and its plots."""
        return self.path / "report"

    def export(self, fmt: str) -> Path:
        """Where ``peftune export`` writes format ``fmt`` by default."""
        return self.path / f"export-{fmt}"

    # a search's folder

    @property
    def study_db(self) -> Path:
        return self.path / "study.db"

    @property
    def study_journal(self) -> Path:
        return self.path / "study.journal"

    def trial(self, number: int) -> RunDir:
        return RunDir(self.path / "trials" / f"trial-{number:04d}")

    @property
    def best_config(self) -> Path:
        """The best trial's configuration, ready for ``peftune train --config``."""
        return self.path / "best.yaml"

    @property
    def final(self) -> RunDir:
        """The best configuration, retrained and scored on the test split."""
        return RunDir(self.path / "final")

    def baseline(self, name: str) -> RunDir:
        """A baseline the final model is compared with: ``zero-shot`` or ``default``."""
        return RunDir(self.path / name)

    @property
    def examples(self) -> Path:
        """A few test documents with each system's summary (the final model's folder)."""
        return self.path / "examples.jsonl"

    # what is saved there

    def settings(self) -> dict[str, Any]:
        """The saved settings (:func:`folder_settings` of ``config.yaml``); {} if none."""
        return folder_settings(self.config_file)

    def config(self) -> Config:
        return config_from_dict(self.settings())

    def metrics(self) -> dict[str, Any]:
        """``metrics.json``: what each stage recorded, by key; {} before the first."""
        path = self.metrics_file
        return json.loads(path.read_text()) if path.is_file() else {}

    def record_metrics(self, key: str, metrics: dict[str, Any]) -> dict[str, Any]:
        """Set ``metrics.json[key]``, keeping what other stages wrote there."""
        current = self.metrics()
        current[key] = metrics
        atomic_write(self.metrics_file, json.dumps(current, indent=2, default=float))
        return current
