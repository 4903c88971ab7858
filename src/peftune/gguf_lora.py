"""A LoRA adapter as a GGUF adapter file, the layout llama.cpp's ``--lora`` flag and its
server's ``/lora-adapters`` endpoint load on top of a GGUF base.

The keys follow llama.cpp's ``convert_lora_to_gguf.py``: ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``, and per adapted weight two tensors named
after the base tensor, ``blk.N.attn_q.weight.lora_a`` (rank x in) and ``.lora_b``
(out x rank). llama.cpp scales the product by ``alpha / rank`` (rank read from the tensor),
or by 1 when alpha is 0: an adapter whose scale is not one ``alpha / r`` for every module
(rsLoRA, per-module ranks or alphas) has its scale folded into ``lora_b`` and alpha 0.
Q and K rows are permuted as in the base (:func:`peftune.export.permute_qk`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import load_file

from peftune.errors import ModelError

# llama.cpp applies LoRA to the linear weights of its graph; these peft keys have no
# lora_a/lora_b pair there (embedding LoRA is gathered differently, the LM head of a tied
# model is the embedding).
UNSUPPORTED_TARGETS = ("embed_tokens", "lm_head")


def check(adapter: Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` if llama.cpp can load it as a GGUF LoRA;
    otherwise one line saying why not."""
    meta = json.loads((adapter / "adapter_config.json").read_text())
    kind = meta.get("peft_type")
    if kind != "LORA":
        raise ModelError(f"--format gguf-lora takes LoRA adapters; {adapter} is {kind}: "
                         "export --format gguf (merged) instead")
    if meta.get("use_dora"):
        raise ModelError(f"{adapter} is a DoRA adapter: llama.cpp applies plain LoRA only; "
                         "export --format gguf (merged) instead")
    if meta.get("modules_to_save"):
        raise ModelError(f"{adapter} also trains whole modules ({meta['modules_to_save']}): "
                         "a llama.cpp LoRA holds only low-rank pairs; export --format gguf")
    targets = meta.get("target_modules") or []
    named = [t for t in ([targets] if isinstance(targets, str) else targets)
             if t in UNSUPPORTED_TARGETS]
    if named:
        raise ModelError(f"{adapter} adapts {', '.join(named)}: llama.cpp takes LoRA on "
                         "linear layers only; export --format gguf (merged) instead")
    return meta


def scale(meta: dict[str, Any], module: str) -> tuple[float, int]:
    """peft's scale for ``module`` and its rank (rank_pattern/alpha_pattern keys match
    the module path's end)."""
    def pick(pattern: dict[str, Any], default: Any) -> Any:
        hits = [v for k, v in (pattern or {}).items() if module.endswith(k)]
        return hits[0] if hits else default
    r = pick(meta.get("rank_pattern"), meta["r"])
    alpha = pick(meta.get("alpha_pattern"), meta["lora_alpha"])
    return (alpha / math.sqrt(r) if meta.get("use_rslora") else alpha / r), r


def pairs(adapter: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """HF module path -> (A, B) in float32, from ``adapter_model.safetensors``."""
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, value in weights.items():
        for part in ("lora_A", "lora_B"):
            if f".{part}." in key:
                module = key.removeprefix("base_model.model.").split(f".{part}.")[0]
                found.setdefault(module, {})[part] = value.astype(np.float32)
                break
        else:
            raise ModelError(f"{adapter}: tensor '{key}' is not a LoRA pair; llama.cpp cannot "
                             "load it as an adapter")
    return {module: (ab["lora_A"], ab["lora_B"]) for module, ab in found.items()}


def write(adapter: Path, path: Path, config: Any, *, qtype: gguf.GGMLQuantizationType,
          ) -> Path:
    """Write ``adapter`` (a peft LoRA folder on a LLaMA ``config``) to ``path``."""
    from peftune.export import permute_qk

    meta = check(adapter)
    found = pairs(adapter)
    scales = {module: scale(meta, module) for module in found}
    uniform = not meta.get("use_rslora") and len({s for s, _ in scales.values()}) == 1 and \
        len({r for _, r in scales.values()}) == 1
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA,
                       float(meta["lora_alpha"]) if uniform else 0.0)
    for module, (a, b) in sorted(found.items()):
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise ModelError(f"gguf-lora: no LLaMA GGUF name for '{module}'")
        if not uniform:
            b = b * scales[module][0]
        if ".attn_q." in name:
            b = permute_qk(b, config.num_attention_heads)
        elif ".attn_k." in name:
            b = permute_qk(b, config.num_key_value_heads)
        for suffix, data in (("lora_a", a), ("lora_b", b)):
            writer.add_tensor(f"{name}.{suffix}", gguf.quants.quantize(data, qtype),
                              raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


__all__ = ["check", "write"]
