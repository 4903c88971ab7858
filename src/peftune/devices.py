"""Which hardware a process runs on and in which precision.

Every command asks here, so training, generation and export agree on one policy.
"""

from __future__ import annotations

import os

import torch


def bf16_supported() -> bool:
    """bf16 arithmetic in hardware: an NVIDIA GPU of compute capability 8.0 or newer, or a CPU
    with AVX512-BF16 or AMX (``torch.cuda.is_bf16_supported`` also counts emulation)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability()[0] >= 8
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 where the hardware has it, else fp16 on a GPU, else fp32."""
    if precision != "auto":
        return precision
    if bf16_supported():
        return "bf16"
    return "fp16" if torch.cuda.is_available() else "fp32"


def device() -> torch.device:
    """This process's device: its local rank's GPU under a launcher, the first GPU alone, or
    the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def place(model: torch.nn.Module) -> torch.nn.Module:
    """Move a model that will only generate to :func:`device`. Quantized models were placed
    when they were loaded and cannot be moved."""
    if getattr(model, "hf_quantizer", None) is not None:
        return model
    target = device()
    return model if next(model.parameters()).device == target else model.to(target)
