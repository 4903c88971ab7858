"""Whether vLLM serves an exported adapter folder, and the ``vllm serve`` line that does.

The rules are those of vLLM's LoRA loader (``vllm/lora/peft_helper.py``,
``PEFTHelper._validate_features`` and ``validate_legal``; ``vllm/config/lora.py``): a LoRA
adapter (``lora_A``/``lora_B`` pairs), no DoRA, no ``modules_to_save``, no bias, and a rank
(the largest of ``r`` and ``rank_pattern``) no larger than ``--max-lora-rank``, which takes
one of :data:`MAX_LORA_RANKS` (default 16). rsLoRA scaling is applied as peft applies it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM's ``MaxLoRARanks``: the values ``--max-lora-rank`` accepts."""
DEFAULT_MAX_LORA_RANK = 16


def rank(meta: dict[str, Any]) -> int:
    """The largest LoRA rank in an ``adapter_config.json``."""
    return max([int(meta.get("r") or 0), *(int(r) for r in (meta.get("rank_pattern") or {})
                                          .values())])


def problems(meta: dict[str, Any]) -> list[str]:
    """Why vLLM would refuse this ``adapter_config.json`` (empty: it serves it)."""
    kind = meta.get("peft_type")
    if kind != "LORA":
        return [f"vLLM serves LoRA adapters only; this one is {kind} (export --format merged "
                "and serve the merged model instead)"]
    found = []
    if meta.get("use_dora"):
        found.append("vLLM does not support DoRA (export --format merged)")
    if meta.get("modules_to_save"):
        found.append(f"vLLM does not load modules_to_save ({meta['modules_to_save']}); "
                     "export --format merged")
    if meta.get("bias", "none") != "none":
        found.append(f"vLLM does not load LoRA bias (bias={meta['bias']!r})")
    if rank(meta) > MAX_LORA_RANKS[-1]:
        found.append(f"rank {rank(meta)} is above vLLM's largest --max-lora-rank "
                     f"{MAX_LORA_RANKS[-1]}")
    return found


def max_lora_rank(meta: dict[str, Any]) -> int:
    """The smallest ``--max-lora-rank`` value that holds the adapter's rank."""
    return next(r for r in MAX_LORA_RANKS if r >= rank(meta))


def serve_line(base: str, name: str, folder: Path) -> str | None:
    """``vllm serve`` with the adapter in ``folder`` as model ``name``; None if vLLM cannot
    serve it (:func:`problems` says why)."""
    meta = json.loads((folder / "adapter_config.json").read_text())
    if problems(meta):
        return None
    return (f"vllm serve {base} --enable-lora --lora-modules {name}={folder.resolve()} "
            f"--max-lora-rank {max_lora_rank(meta)}")


__all__ = ["DEFAULT_MAX_LORA_RANK", "MAX_LORA_RANKS", "max_lora_rank", "problems", "rank",
           "serve_line"]
