"""Fast 16-bit generation: weights cast once, CPU matmul weights packed once, a KV cache that
grows in place; and a no-repeat rule over the generated tokens only.

Each piece is numerically neutral against the plain 16-bit model (tests compare logits and
texts): packing changes the memory layout of the weights, not the arithmetic, and the cache
returns the same keys and values ``torch.cat`` would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessor, NoRepeatNGramLogitsProcessor
from transformers.cache_utils import DynamicLayer

from peftune.devices import HALF_DTYPES


@contextlib.contextmanager
def half_precision(model: torch.nn.Module, precision: str, *,
                   restore: bool = True) -> Iterator[None]:
    """Run the model in 16 bits for a while, as inference engines do.

    Every fp32 parameter is cast once (tied weights stay tied; buffers such as the rotary
    frequencies stay fp32), so activations and the KV cache are 16-bit too: no per-call
    weight casts as under autocast, half the cache traffic. On a CPU the bf16 linear
    weights are also packed once for oneDNN, which makes the small matrix products of
    decoding about 1.7x faster with identical results. The original parameters (shared with
    an optimizer) are put back afterwards, unless ``restore`` is false: then a model that
    will only generate from now on keeps the 16-bit ones and its fp32 weights are freed.
    """
    if precision not in HALF_DTYPES:
        yield
        return
    dtype = HALF_DTYPES[precision]
    swapped = _cast_parameters(model, dtype)
    if not restore:
        swapped.clear()  # frees the fp32 weights before packing makes a third copy
    packed = _pack_linears(model) if dtype == torch.bfloat16 else []
    try:
        yield
    finally:
        for module in packed:
            del module.forward
        for module, name, param in swapped:
            module._parameters[name] = param


def _cast_parameters(model: torch.nn.Module,
                     dtype: torch.dtype) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    casts: dict[int, torch.nn.Parameter] = {}
    swapped = []
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None or param.dtype != torch.float32:
                continue
            if id(param) not in casts:
                casts[id(param)] = torch.nn.Parameter(param.detach().to(dtype),
                                                      requires_grad=False)
            swapped.append((module, name, param))
            module._parameters[name] = casts[id(param)]
    return swapped


def _pack_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Give every plain bf16 CPU ``nn.Linear`` a forward over a oneDNN-packed weight."""
    if not (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return []
    packed = []
    for module in model.modules():
        if (type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16
                and module.weight.device.type == "cpu"):
            try:
                module.forward = _packed_forward(module)
            except RuntimeError:  # oneDNN without bf16 support on this build
                return packed
            packed.append(module)
    return packed


def _packed_forward(module: torch.nn.Linear) -> Any:
    packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach())
    plain = type(module).forward.__get__(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or torch.is_grad_enabled():
            return plain(x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")

    return forward


class GrowingLayer(DynamicLayer):
    """A dynamic cache layer that writes new keys and values into spare room.

    The default layer concatenates the whole cache with every new token, which copies it
    once per step and layer; this one copies only when its room runs out (rarely: room for
    a quarter more, at least 128 tokens), and hands attention a view of the filled part.
    After any operation that replaces the tensors (crop, beam reordering, reset) it starts
    a new buffer from them.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        new = old + key_states.shape[-2]
        if not self._fits(new):
            room = new + max(128, new // 4)
            self._keys = _grown(self.keys, key_states, old, room)
            self._values = _grown(self.values, value_states, old, room)
        self._keys[:, :, old:new] = key_states
        self._values[:, :, old:new] = value_states
        self.keys, self.values = self._keys[:, :, :new], self._values[:, :, :new]
        return self.keys, self.values

    def _fits(self, length: int) -> bool:
        buffers = getattr(self, "_keys", None), getattr(self, "_values", None)
        return all(buf is not None and buf.shape[-2] >= length and view.dim() == 4
                   and view.data_ptr() == buf.data_ptr() and view.shape[:2] == buf.shape[:2]
                   for view, buf in zip((self.keys, self.values), buffers, strict=True))


def _grown(filled: torch.Tensor, new: torch.Tensor, length: int, room: int) -> torch.Tensor:
    batch, heads, _, dim = new.shape
    buffer = new.new_empty(batch, heads, room, dim)
    if length:
        buffer[:, :, :length] = filled
    return buffer


def growing_cache() -> DynamicCache:
    """A ``DynamicCache`` whose layers are ``GrowingLayer``s."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache


def prefilled_cache(model: Any, prompts: list[torch.Tensor], width: int) -> DynamicCache | None:
    """The KV cache of each prompt but its last token, laid out as a left-padded batch.

    Each prompt is run alone: no padding to compute and a plain causal mask, which on a CPU
    is about 1.7x faster than one padded batch of mixed lengths. Positions start at 0 for
    every prompt, as ``generate`` numbers them from the attention mask, so ``generate`` given
    this cache and the padded prompts (``width`` columns) only has the last tokens to run.
    None when some prompt has a single token (nothing to prefill).
    """
    if min(len(ids) for ids in prompts) < 2:
        return None
    caches = []
    for ids in prompts:
        cache = DynamicCache()
        model(input_ids=ids[None, :-1], cache=cache, use_cache=True, logits_to_keep=1)
        caches.append(cache)
    merged = growing_cache()
    for index, layers in enumerate(zip(*(cache.layers for cache in caches), strict=True)):
        merged.update(_left_padded([layer.keys for layer in layers], width - 1),
                      _left_padded([layer.values for layer in layers], width - 1), index)
        for layer in layers:  # one copy of the cache at a time
            layer.keys = layer.values = None
    return merged


def _left_padded(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    _, heads, _, dim = rows[0].shape
    out = rows[0].new_zeros(len(rows), heads, length, dim)
    for i, row in enumerate(rows):
        out[i, :, length - row.shape[-2]:] = row[0]
    return out


class GeneratedNoRepeatNGram(LogitsProcessor):
    """transformers' no-repeat n-gram rule over the generated tokens only: the prompt's
    n-grams (a summary reuses the document's phrases) stay allowed, a phrase the output
    already said once is not said again.

    ``prompt_width`` is the width of the (padded) prompt batch: every row's output starts
    there. Not expressible in ``generation_config.json``: plain transformers needs this
    processor passed as ``logits_processor``, and llama.cpp has no equivalent.
    """

    def __init__(self, size: int, prompt_width: int) -> None:
        self.rule, self.start = NoRepeatNGramLogitsProcessor(size), prompt_width

    def __call__(self, input_ids: torch.LongTensor,
                 scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.rule(input_ids[:, self.start:], scores)
