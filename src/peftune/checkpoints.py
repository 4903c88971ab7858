"""Checkpoints a run can trust: finished, finite, intact and made by the same configuration.

A checkpoint folder counts only once it holds ``COMPLETE_MARKER``, written last and after the
other files reached the disk: a JSON record of each file's sha256 and of the training loss so
far. ``resume_point`` picks the newest checkpoint whose files still match that record (a
damaged one is skipped with a warning) and refuses it when its ``FINGERPRINT``, the settings
that shape training, differs from the run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftune.config import Config
from peftune.errors import ConfigError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "peftune-complete"
FINGERPRINT = "peftune-fingerprint.json"

# train.* keys that change how a run is watched, evaluated or stored, not what it learns;
# micro_batch_size only splits the same batch (the out-of-memory retry halves it)
OPERATIONAL = frozenset({"resume", "logging_steps", "report_to", "run_name", "save_total_limit",
                         "save_checkpoints", "save_steps", "micro_batch_size", "eval_steps",
                         "eval_each_epoch", "gradient_checkpointing"})
DATA_KEYS = ("source", "subset", "document_column", "summary_column", "train_split",
             "validation_split", "max_source_tokens", "max_train_examples", "instruction")
MODEL_KEYS = ("name", "gguf_file", "revision", "dtype")


def fingerprint(cfg: Config, train_examples: int) -> dict[str, Any]:
    """What shapes training, keyed by flag name (``train.learning_rate``, ``lora.r``, ...)."""
    keys: dict[str, Any] = {"method": cfg.method, "seed": cfg.seed,
                            "train_examples": train_examples}
    options = dataclasses.asdict(cfg.method_options)
    keys.update({f"{cfg.method}.{k}": v for k, v in options.items()})
    keys.update({f"train.{k}": v for k, v in dataclasses.asdict(cfg.train).items()
                 if k not in OPERATIONAL})
    keys.update({f"data.{k}": getattr(cfg.data, k) for k in DATA_KEYS})
    keys.update({f"model.{k}": getattr(cfg.model, k) for k in MODEL_KEYS})
    return json.loads(json.dumps(keys, default=str))  # as it reads back from the file


def all_finite(model: torch.nn.Module) -> bool:
    """Whether every trainable weight is finite: the rest is frozen and cannot diverge.

    In a distributed run every rank gets the same answer: under FSDP or ZeRO-3 each rank
    holds only its shard, and a rank that skipped the save while the others entered its
    collectives would leave them waiting forever.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return finite
    nccl = torch.distributed.get_backend() == "nccl"  # it reduces GPU tensors only
    flag = torch.tensor([0 if finite else 1],
                        device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return not bool(flag.item())


def mark_complete(folder: Path, *, fingerprint: dict[str, Any], loss_sum: float) -> None:
    """Write the fingerprint, then the marker with every file's checksum, each on disk first.

    ``loss_sum`` is the sum of the per-step training losses up to this checkpoint, which a
    resumed run needs for the mean over the whole run.
    """
    _write_synced(folder / FINGERPRINT, json.dumps(fingerprint, indent=1))
    files = {name: _sha256(folder / name, sync=True) for name in _files(folder)}
    _sync_dir(folder)
    _write_synced(folder / COMPLETE_MARKER, json.dumps({"loss_sum": loss_sum, "files": files}))


def problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from, or None when every file matches its record."""
    try:
        files = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
    except FileNotFoundError:
        return "its save never finished"
    except (OSError, ValueError, KeyError, TypeError):
        return "its completion record is unreadable"
    for name, digest in files.items():
        try:
            if _sha256(folder / name) != digest:
                return f"damaged: {name} does not match its checksum"
        except OSError:
            return f"damaged: {name} cannot be read"
    return None


def loss_sum(folder: Path | None) -> float:
    """The training loss summed over the steps before ``folder`` (0 for a fresh run)."""
    if folder is None:
        return 0.0
    return float(json.loads((folder / COMPLETE_MARKER).read_text()).get("loss_sum", 0.0))


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose save finished and whose files are intact."""
    return next((path for path in _newest_first(folder) if problem(path) is None), None)


def resume_point(folder: Path, fingerprint: dict[str, Any], *, resume: bool,
                 discard: bool) -> Path | None:
    """The checkpoint to resume from: the newest intact one, when it belongs to this run.

    Raises ConfigError when that checkpoint was made with other settings. With ``discard``
    (the main process), the checkpoints after it go, all of them without ``resume``: the run
    writes those steps again, and rotation must not count stale folders as recent.
    """
    chosen, later = None, []
    for path in _newest_first(folder) if resume else []:
        reason = problem(path)
        if reason is None:
            chosen = path
            break
        log.warning("not resuming from %s (%s): it is removed, and the run goes back to "
                    "the checkpoint before it (or the start)", path, reason)
        later.append(path)
    if chosen is not None:
        _check_same_run(chosen, fingerprint)
    if discard:
        for path in later if resume else _newest_first(folder):
            shutil.rmtree(path, ignore_errors=True)
    return chosen


@contextlib.contextmanager
def same_random_numbers() -> Iterator[None]:
    """Leave every random generator as it was: what runs inside draws nothing for training."""
    python, numpy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def _check_same_run(checkpoint: Path, current: dict[str, Any]) -> None:
    try:
        saved = json.loads((checkpoint / FINGERPRINT).read_text())
    except (OSError, ValueError):
        saved = {}
    changed = [f"{key} {saved.get(key, 'unset')!r} -> {current.get(key, 'unset')!r}"
               for key in sorted(saved.keys() | current.keys())
               if saved.get(key, "unset") != current.get(key, "unset")]
    if changed:
        raise ConfigError(f"{checkpoint} was trained with other settings ({', '.join(changed)});"
                          " resuming would mix the two runs: add --train.resume false to start "
                          "afresh (this removes its checkpoints) or use another output_dir")


def _newest_first(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name != COMPLETE_MARKER)


def _sha256(path: Path, *, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _sync_dir(path.parent)


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
