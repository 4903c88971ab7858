"""Which hardware a process runs on and in which precision.

Every command asks here, so training, generation, search workers and export agree on one
policy:

- :func:`device`: the CPU; the local rank's GPU under ``accelerate launch``/``torchrun``;
  otherwise the first visible GPU, also when several are visible (one process trains on one
  GPU: :func:`one_gpu_per_process` keeps the Trainer from spreading it with
  ``nn.DataParallel``; ``accelerate launch`` uses them all).
- :func:`worker_env`: search worker ``i`` of ``n`` sees one GPU of its own, or a share of one
  (:func:`gpu_share`).
- :func:`weights_dtype`: ``model.dtype: auto`` is the 16-bit type the GPU computes in; fp32
  master weights on a CPU and under FSDP (whose mixed precision computes in 16 bits).
- :func:`sharding`: which sharded launch (FSDP, DeepSpeed) this process runs under.
- :func:`generation_batch`: as many prompts per generation batch as their KV cache leaves
  room for on the GPU.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# The one dtype table: names of ``model.dtype`` and ``export --dtype``, and what each
# ``train.precision`` computes in.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
HALF_DTYPES = {p: DTYPES[name] for p, name in PRECISION_DTYPES.items() if p != "fp32"}


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


def compute_dtype() -> torch.dtype:
    """The dtype this machine computes in under ``precision: auto``."""
    return HALF_DTYPES.get(resolve_precision("auto"), torch.float32)


def weights_dtype(name: str, precision: str, *, gpu: bool | None = None) -> torch.dtype:
    """The dtype base weights are loaded in for ``model.dtype`` = ``name``, on a GPU if
    ``gpu`` (default: whether this machine has one). Loading and ``peftune plan`` both ask here.

    ``auto`` on a GPU: the 16-bit type training autocasts to (bf16 from compute capability
    8.0, fp16 below), so frozen weights are neither twice their size nor re-cast every
    forward; trainable adapter weights are kept in fp32 (``assembly.wrap``). On a CPU, or when
    ``train.precision`` is fp32: fp32 master weights (mixed precision is the Trainer's job).
    Under FSDP: fp32 too. FSDP flattens every parameter of a wrapped unit into one tensor of
    one dtype, and (IA)^3, AdaLoRA and LLaMA-Adapter keep fp32 trainable parameters inside
    the base's units; FSDP's own mixed precision (``mixed_precision: bf16`` in the accelerate
    config) casts the gathered weights to 16 bits for compute.
    """
    if name != "auto":
        return DTYPES[name]
    if sharding() == "fsdp":
        return torch.float32
    if not (torch.cuda.is_available() if gpu is None else gpu):
        return torch.float32
    return HALF_DTYPES.get(resolve_precision(precision), torch.float32)


DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


# ---------------------------------------------------------------- placement

def launched() -> bool:
    """True under ``accelerate launch`` or ``torchrun``: they set ``LOCAL_RANK``."""
    return "LOCAL_RANK" in os.environ


def device() -> torch.device:
    """The one device this process computes on.

    No GPU: the CPU. Under a launcher: the GPU of this process's local rank. Otherwise the
    first visible GPU, however many are visible (several are used by several processes:
    ``accelerate launch``, or ``search.workers``, each with its own GPU).
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if launched():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda", 0)


def one_gpu_per_process(args: Any) -> Any:
    """Keep the Hugging Face Trainer on :func:`device` alone.

    With several GPUs visible to one process the Trainer wraps the model in
    ``nn.DataParallel``: the effective batch silently grows by the GPU count, the base is
    copied every step and our loss path is bypassed. Setting ``n_gpu`` to 1, as the Trainer
    itself does for model-parallel models, trains on the first GPU only.
    """
    if args.n_gpu > 1:
        log.warning("%d GPUs are visible to one process: training on %s only; to train on "
                    "all of them: accelerate launch --num_processes %d -m peftune train ...",
                    args.n_gpu, device(), args.n_gpu)
        args._n_gpu = 1
    return args


# Set by worker_env: how many search workers share this process's GPU.
GPU_SHARE_ENV = "PEFTUNE_GPU_SHARE"


def worker_env(index: int, workers: int) -> dict[str, str]:
    """Environment for search worker ``index`` of ``workers``: one visible GPU of its own,
    round-robin over the GPUs this process sees. More workers than GPUs share them, and each
    is told how many share its GPU (:func:`gpu_share`). Nothing to add without a GPU."""
    if not torch.cuda.is_available():
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = ([v.strip() for v in visible.split(",") if v.strip()] if visible
           else [str(i) for i in range(torch.cuda.device_count())])
    if not ids:
        return {}
    gpu = index % len(ids)
    share = sum(1 for i in range(workers) if i % len(ids) == gpu)
    return {"CUDA_VISIBLE_DEVICES": ids[gpu], GPU_SHARE_ENV: str(share)}


def gpu_share() -> int:
    """How many processes share this process's GPU (search workers on one GPU each plan for
    their part of it): 1 unless :func:`worker_env` said otherwise."""
    return max(1, int(os.environ.get(GPU_SHARE_ENV, "1") or 1))


def _env_true(key: str) -> bool:
    return os.environ.get(key, "").lower() in ("1", "true")


def sharding() -> str:
    """How ``accelerate launch`` shards this process's model: ``fsdp``, ``zero3`` (DeepSpeed
    stage 3, parameters too), ``deepspeed`` (stages 1-2, optimizer state and gradients only),
    or ``""`` (not sharded: one process, or DDP)."""
    if _env_true("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        return "zero3" if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" else \
            "deepspeed"
    return ""


def quantized_load_kwargs() -> dict[str, Any]:
    """``from_pretrained`` arguments for a k-bit base: on a GPU it is quantized onto this
    process's device. Left alone, bitsandbytes picks ``torch.cuda.current_device()``, which
    is GPU 0 in every rank when the model is loaded (before the Trainer sets the device)."""
    if not torch.cuda.is_available():
        return {}
    return {"device_map": {"": device().index}}


def place(model: torch.nn.Module) -> torch.nn.Module:
    """Move a model to :func:`device`. Quantized models, and models spread over devices by a
    ``device_map``, were placed when they were loaded and are left there."""
    placed = (getattr(model, "hf_quantizer", None) is not None
              or len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1)
    if not placed and next(model.parameters()).device != device():
        model = model.to(device())
    first = next(model.parameters())
    log.info("model on %s, weights in %s", first.device, DTYPE_NAMES.get(first.dtype, first.dtype))
    return model


def numerics() -> dict[str, Any]:
    """What, besides the seed and the settings, decides a run's digits: the device, the
    precision ``auto`` resolves to, the CPU threads and the torch build. Two machines that
    differ here can differ in ROUGE (README, "Reproducible")."""
    name = torch.cuda.get_device_name(device()) if torch.cuda.is_available() else _cpu_name()
    return {"device": name, "precision": resolve_precision("auto"),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def free_memory() -> None:
    """Give cached GPU memory back (between trials, before a retry after out-of-memory)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``); False where
    there is no glibc. Tensors between 128 KB and 32 MB come from the heap once glibc's
    mmap threshold has grown, and freed ones stay resident: after the GGUF conversion, 630 of
    the process's 1,080 MB were such pages (BENCHMARKS.md, "Memory")."""
    gc.collect()
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


# ---------------------------------------------------------------- generation memory

# Share of the GPU memory left to generation (see room_bytes) given to the KV cache; the rest
# is for activations, the logits of the last position and the allocator's fragmentation.
KV_CACHE_SHARE = 0.7


def kv_cache_bytes(config: Any, tokens: int, dtype: torch.dtype) -> int | None:
    """Bytes of KV cache one sequence of ``tokens`` tokens needs in a decoder-only model:
    keys and values, in every layer, per key-value head. None for a config without these
    fields (encoder-decoders keep a second, cross-attention cache)."""
    if getattr(config, "is_encoder_decoder", False):
        return None
    try:
        layers, heads = config.num_hidden_layers, config.num_attention_heads
    except AttributeError:
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * kv_heads * head_dim * itemsize * tokens


def generation_batch(*, cap: int, per_sequence: int | None, free: int | None) -> int:
    """Prompts per generation batch: at most ``cap`` (``eval.batch_size``), and no more than
    ``KV_CACHE_SHARE`` of ``free`` bytes holds at ``per_sequence`` bytes each; at least 1.
    Without an estimate (CPU, unknown architecture) ``cap``."""
    if not per_sequence or free is None:
        return cap
    return max(1, min(cap, int(free * KV_CACHE_SHARE) // per_sequence))


def room_bytes(where: torch.device) -> int | None:
    """GPU memory this process's tensors do not hold: the device's total less what is
    allocated (None for a CPU: the operating system decides there).

    Not the driver's free memory: that also counts the caching allocator's reserve and
    other processes, which differ from run to run; a generation batch sized from it
    regrouped the prompts, which changes padding and so greedy texts, between two runs of
    one seed. What is allocated here is the same in every run of the same program; a batch
    that still runs out of memory is halved (a warning says so)."""
    if where.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(where).total_memory
    return int(total - torch.cuda.memory_allocated(where))
