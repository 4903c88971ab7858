"""The run directory: where each stage writes, and atomic writes so a crash never leaves
half a file behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def record_metrics(run_dir: Path, key: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Set ``metrics.json[key]``, keeping what other stages wrote there."""
    path = run_dir / "metrics.json"
    current = json.loads(path.read_text()) if path.is_file() else {}
    current[key] = metrics
    atomic_write(path, json.dumps(current, indent=2, default=float))
    return current
