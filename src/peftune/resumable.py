"""Predictions kept as they are generated, so a killed evaluation finishes only the rest.

The partial file is one JSON line per prediction (``{"index": i, "prediction": text}``),
appended and flushed after every batch. Its name carries a fingerprint of everything the
predictions depend on (model and adapter weights, decoding settings, precision, split tag,
row ids and prompts), so a different evaluation never picks up another's lines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from peftune.rundir import RunDir


def fingerprint(model: Any, settings: Any, *, precision: str, tag: str, ids: list[Any],
                prompts: list[list[int]]) -> str:
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update(json.dumps({
        "model": str(getattr(config, "_name_or_path", "")), "settings":
        dataclasses.asdict(settings), "precision": precision, "tag": tag,
        "ids": [str(i) for i in ids]}, sort_keys=True).encode())
    for ids_ in prompts:
        digest.update(torch.tensor(ids_, dtype=torch.int64).numpy().tobytes())
        digest.update(b"|")
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        from peft import get_peft_model_state_dict

        digest.update(json.dumps({k: v.to_dict() for k, v in peft_config.items()},
                                 sort_keys=True, default=str).encode())
        for name, tensor in sorted(get_peft_model_state_dict(model).items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def partial_file(out_dir: Path, tag: str, key: str) -> Path:
    return RunDir(out_dir).partial_predictions(tag, key)


def read(path: Path) -> dict[int, str]:
    """Predictions by row index; a last line cut short by the kill is ignored."""
    done: dict[int, str] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            done[int(row["index"])] = str(row["prediction"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return done


class Appender:
    """Appends a batch of predictions, flushed to disk, each time it is called."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Appender:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a", encoding="utf-8")
        return self

    def __call__(self, outputs: dict[int, str]) -> None:
        self.file.write("".join(json.dumps({"index": i, "prediction": text}) + "\n"
                                for i, text in outputs.items()))
        self.file.flush()
        os.fsync(self.file.fileno())

    def __exit__(self, *exc: Any) -> None:
        self.file.close()
