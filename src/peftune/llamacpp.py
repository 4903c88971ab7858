"""Greedy generation through llama.cpp (the ``llama-cpp-python`` binding, ``pip install
peftune[llamacpp]``): the parity check and the tests run GGUF exports in the runtime users
serve them with.

The prompt goes in as peftune's token ids and decoding follows the run's settings the way
llama.cpp's server applies them with ``--temp 0 --repeat-penalty P --repeat-last-n -1``:
greedy, the repetition penalty over the whole context, prompt included (llama-cpp-python's
own ``create_completion`` penalizes only its last 64 generated tokens, so it is not used
for a penalty other than 1). llama.cpp has no ``no_repeat_ngram_size`` rule.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch

from peftune.errors import PeftuneError

PACKAGE = "llama-cpp-python"


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def load(path: Path, *, lora: Path | None = None, n_ctx: int = 2048) -> object:
    """A ``llama_cpp.Llama`` on ``path`` (with the GGUF LoRA ``lora`` applied at scale 1)."""
    if not available():
        raise PeftuneError(f"llama.cpp is not installed: `pip install {PACKAGE}` (or "
                           "peftune[llamacpp])")
    from llama_cpp import Llama

    return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx,
                 n_threads=torch.get_num_threads(), n_batch=512, verbose=False)


def greedy(llm: object, prompts: Sequence[list[int]], *, max_new_tokens: int,
           repetition_penalty: float, stop: set[int]) -> list[list[int]]:
    """The new token ids of each prompt, without the stop token."""
    from llama_cpp._internals import LlamaSampler

    outputs = []
    # the context as asked for: llama.cpp may round its own up, the binding's buffers do not
    n_ctx = llm.context_params.n_ctx  # type: ignore[attr-defined]
    for prompt in prompts:
        if len(prompt) + max_new_tokens > n_ctx:
            raise PeftuneError(f"a prompt of {len(prompt)} tokens and {max_new_tokens} new "
                               f"ones do not fit llama.cpp's context of {n_ctx}")
        sampler = LlamaSampler()
        # -1 ("whole context") is resolved by llama.cpp's command-line layer, not the sampler
        sampler.add_penalties(llm.n_vocab(), n_ctx, repetition_penalty, 0.0, 0.0)  # type: ignore[attr-defined]
        sampler.add_greedy()
        for token in prompt:
            sampler.accept(token)
        llm.reset()  # type: ignore[attr-defined]
        llm.eval(prompt)  # type: ignore[attr-defined]
        new: list[int] = []
        while len(new) < max_new_tokens:
            token = sampler.sample(llm._ctx, -1)  # type: ignore[attr-defined]  # and accepts it
            if token in stop:
                break
            new.append(token)
            llm.eval([token])  # type: ignore[attr-defined]
        outputs.append(new)
    return outputs


__all__ = ["PACKAGE", "available", "greedy", "load"]
