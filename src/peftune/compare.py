"""Side-by-side comparison of PEFT methods: same data, budget and seed; one table.

    peftune compare --config configs/aclsum-smollm2-lora.yaml --train.max_steps 8

Each method trains and is scored in its own process, so its peak memory is its own and one
method's failure (say, llama-adapter on a non-LLaMA model) becomes a row, not a crash. Each
uses its suggested learning rate (``peftune methods``) unless ``--shared-lr`` is given.
Writes ``compare.md``, ``compare.csv`` and ``compare.png`` to ``output_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from peftune.atomic import atomic_write
from peftune.config import Config, config_from_dict, load_yaml, save_yaml
from peftune.errors import PeftuneError
from peftune.logs import setup_libraries, setup_logging
from peftune.methods import registry
from peftune.report import write_compare

log = logging.getLogger(__name__)

def run(cfg: Config, *, methods: list[str] | None = None, split: str = "test",
        shared_lr: bool = False, quiet: bool = False) -> list[dict[str, Any]]:
    """Train and score every method in ``methods`` (default: all); write the table."""
    names = methods or list(registry())
    unknown = sorted(set(names) - set(registry()))
    if unknown:
        raise PeftuneError(f"--methods: unknown {', '.join(unknown)} (valid: "
                           f"{', '.join(registry())})")
    out = Path(cfg.output_dir)
    rows = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}", file=sys.stderr, flush=True)
        rows.append(_run_one(_method_config(cfg, name, shared_lr), split=split, quiet=quiet))
    write_compare(rows, out, title=f"{cfg.model.name} on {cfg.data.source} ({split} split)")
    return rows


def _method_config(cfg: Config, name: str, shared_lr: bool) -> Config:
    data = cfg.to_dict()
    data.update(method=name, output_dir=str(Path(cfg.output_dir) / name))
    data["train"]["resume"] = False  # a comparison measures a whole run
    if not shared_lr:
        data["train"]["learning_rate"] = registry()[name].learning_rate
    return config_from_dict(data)


def _run_one(cfg: Config, *, split: str, quiet: bool) -> dict[str, Any]:
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, run_dir / "compare-config.yaml")
    result = run_dir / "compare.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "peftune.compare", str(run_dir), split, *(["-q"] * quiet)]
    code = subprocess.call(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.is_file():
        return json.loads(result.read_text())
    return {"method": cfg.method, "learning_rate": cfg.train.learning_rate,
            "error": f"failed with exit status {code}"}


def measure(run_dir: Path, split: str) -> dict[str, Any]:
    """Train and score one method (in this process); the row of the table."""
    import torch

    from peftune import assembly, models, train
    from peftune.generation import score

    cfg = config_from_dict(load_yaml(run_dir / "compare-config.yaml"))
    row: dict[str, Any] = {"method": cfg.method, "learning_rate": cfg.train.learning_rate}
    start = time.perf_counter()
    data = assembly.prepare(cfg, roles=("train", "validation", split))
    result = train.run(cfg, data=data)
    scores = score(result.model, data.tokenizer, data.splits[split], cfg.eval, out_dir=run_dir,
                   tag=split, precision=models.precision(cfg))
    m = result.metrics
    adapter_bytes = sum(f.stat().st_size for f in result.adapter_dir.glob("adapter_model.*"))
    row.update({key: scores[key] for key in ("rouge1", "rouge2", "rougeL")})
    row.update(
        trainable_parameters=m["trainable_parameters"],
        adapter_mib=adapter_bytes / 2**20,
        train_tokens_per_s=m["train_tokens"] / max(m["train_runtime"], 1e-9),
        peak_memory_mib=_peak_memory_mib(torch),
        wall_s=time.perf_counter() - start,
    )
    return row


def _peak_memory_mib(torch: Any) -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _worker(argv: list[str]) -> int:
    run_dir, split = Path(argv[0]), argv[1]
    setup_logging("-q" in argv)
    setup_libraries("-q" in argv)
    try:
        row = measure(run_dir, split)
    except PeftuneError as err:
        row = {"method": run_dir.name, "error": str(err),
               "learning_rate": config_from_dict(load_yaml(run_dir / "compare-config.yaml"))
               .train.learning_rate}
        print(f"peftune: error: {err}", file=sys.stderr)
    atomic_write(run_dir / "compare.json", json.dumps(row, indent=2))
    return 2 if "error" in row else 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
