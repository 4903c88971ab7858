"""Batched generation from prompt-only, left-padded, length-sorted batches; scoring a split's
summaries (:mod:`peftune.metrics`) and writing its predictions file."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedTokenizerBase

from peftune import devices, resumable
from peftune.atomic import atomic_write
from peftune.config import EvalConfig
from peftune.data import Collator
from peftune.fast_generation import (
    GeneratedNoRepeatNGram,
    growing_cache,
    half_precision,
    prefilled_cache,
)
from peftune.logs import show_progress
from peftune.metrics import text_scores
from peftune.rundir import RunDir

log = logging.getLogger(__name__)


def generation_config(settings: EvalConfig, tokenizer: PreTrainedTokenizerBase
                      ) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams, do_sample=False,
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
        repetition_penalty=settings.repetition_penalty,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def output_rules(settings: EvalConfig, prompt_width: int) -> LogitsProcessorList:
    """Rules over the generated tokens only (``eval.generated_no_repeat_ngram_size``), which
    no ``GenerationConfig`` field expresses."""
    size = settings.generated_no_repeat_ngram_size
    return LogitsProcessorList([GeneratedNoRepeatNGram(size, prompt_width)] if size else [])


@contextlib.contextmanager
def kv_cache_compat(model: Any) -> Iterator[None]:
    """Let peft's prompt-learning generation find the KV cache of transformers 5.

    peft 0.21 looks for the cache under ``past_key_values``; transformers 5 calls it
    ``cache``. Unseen, prefix tuning is never put into the cache and prompt/p-tuning re-insert
    their virtual tokens at every decoding step: outputs silently differ from the model's own
    forward pass. Renaming the key on the way in is all it takes.
    """
    config = getattr(model, "active_peft_config", None)
    if config is None or not config.is_prompt_learning:
        yield
        return
    prepare = model.base_model_prepare_inputs_for_generation

    def renamed(*args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = prepare(*args, **kwargs)
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    model.base_model_prepare_inputs_for_generation = renamed
    try:
        yield
    finally:
        model.base_model_prepare_inputs_for_generation = prepare


@torch.inference_mode()
def generate(model: Any, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]],
             settings: EvalConfig | None = None, *, precision: str = "fp32",
             progress: bool | None = None, keep_fp32_weights: bool = True,
             done: dict[int, str] | None = None,
             on_batch: Callable[[dict[int, str]], None] | None = None) -> list[str]:
    """Greedy (or beam) continuations of token-id prompts, decoded without the prompt.

    In 16-bit precision the model runs with its weights cast once (``half_precision``);
    ``keep_fp32_weights=False`` leaves a model that is done training with those, which
    saves the memory of a second copy. On a GPU a batch holds at most as many prompts as
    their KV cache leaves room for (``eval.batch_size`` at most), and a batch that still runs
    out of memory is halved. ``done`` holds outputs of an earlier, interrupted call by prompt
    index: batches it covers whole are not generated again (on a CPU batches are the same in
    every call, so the outputs are too); ``on_batch`` gets each new batch's outputs. The
    progress bar (with ETA) shows unless logging is quiet (``-q``).
    """
    settings = settings or EvalConfig()
    done = done or {}
    if progress is None:
        progress = logging.getLogger("peftune").isEnabledFor(logging.INFO)
    model.eval()
    device = next(model.parameters()).device
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    # A decoder continues after the last prompt token, so prompts are left-padded; an encoder
    # reads its input as it was trained, right-padded (virtual tokens stay next to the text).
    collate = Collator(pad_id=tokenizer.pad_token_id,
                       padding_side="right" if encoder_decoder else "left")
    gen_config = generation_config(settings, tokenizer)
    outputs: list[str] = [""] * len(prompts)
    # Longest first: similar lengths share a batch (little padding) and memory peaks early.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    bar = tqdm(total=len(prompts), desc="generating", disable=not (progress and show_progress()),
               leave=False)
    with half_precision(model, precision, restore=keep_fp32_weights):
        size = batch_size(model, settings, max((len(p) for p in prompts), default=0), device)
        position = 0
        while position < len(order):
            idx = order[position:position + size]
            if all(i in done for i in idx):
                for i in idx:
                    outputs[i] = done[i]
                bar.update(len(idx))
                position += len(idx)
                continue
            try:
                batch = collate([{"input_ids": prompts[i]} for i in idx])
                batch = {k: v.to(device) for k, v in batch.items()}
                with kv_cache_compat(model):
                    cache = _cache(model, encoder_decoder, device, [prompts[i] for i in idx],
                                   width=batch["input_ids"].shape[1])
                    out = model.generate(**batch, **cache, generation_config=gen_config,
                                         logits_processor=output_rules(
                                             settings, 0 if encoder_decoder
                                             else batch["input_ids"].shape[1]))
            except torch.OutOfMemoryError:
                if size == 1:
                    raise
                size //= 2
                log.warning("out of memory generating %d prompts at once: retrying with %d",
                            len(idx), size)
                devices.free_memory()
                continue
            new = out if encoder_decoder else out[:, batch["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            for i, text in zip(idx, texts, strict=True):
                outputs[i] = text.strip()
            if on_batch is not None:
                on_batch({i: outputs[i] for i in idx})
            position += len(idx)
            bar.update(len(idx))
    bar.close()
    return outputs


def batch_size(model: Any, settings: EvalConfig, longest_prompt: int,
               device: torch.device) -> int:
    """Prompts per generation batch: ``eval.batch_size``, fewer where the KV cache of the
    longest prompt and its new tokens (times the beams) would not fit in the GPU memory the
    process's tensors leave (:func:`devices.room_bytes`: the same in every run of a seed)."""
    free = devices.room_bytes(device)
    if free is None:
        return settings.batch_size
    per_sequence = devices.kv_cache_bytes(model.config, longest_prompt + settings.max_new_tokens,
                                          model.get_input_embeddings().weight.dtype)
    chosen = devices.generation_batch(
        cap=settings.batch_size, free=free,
        per_sequence=per_sequence * settings.num_beams if per_sequence else None)
    if chosen < settings.batch_size:
        log.info("generating %d prompts at once (eval.batch_size %d): their KV cache fills "
                 "the GPU memory", chosen, settings.batch_size)
    return chosen


def _cache(model: Any, encoder_decoder: bool, device: torch.device,
           prompts: list[list[int]], width: int) -> dict[str, Any]:
    # Prompt learning builds its own cache from the virtual tokens; encoder-decoders keep two.
    config = getattr(model, "active_peft_config", None)
    if encoder_decoder or (config is not None and config.is_prompt_learning):
        return {}
    if device.type != "cpu":  # an accelerator prefills a padded batch faster than one by one
        return {"cache": growing_cache()}
    cache = prefilled_cache(model, [torch.tensor(ids) for ids in prompts], width)
    return {"cache": cache if cache is not None else growing_cache()}


def prompts_of(ds: Any) -> list[list[int]]:
    """The prompt part of each tokenized example (everything before the summary)."""
    return [ids[:n] for ids, n in zip(ds["input_ids"], ds["prompt_len"], strict=False)]


def score(model: Any, tokenizer: PreTrainedTokenizerBase, ds: Any, settings: EvalConfig, *,
          out_dir: Path | None, tag: str, precision: str = "fp32",
          keep_fp32_weights: bool = True) -> dict[str, float]:
    """Generate for every row of a tokenized split, score it, and write the outputs.

    With ``out_dir``, predictions are appended to a partial file as they are generated; a
    rerun of the same evaluation (same model and adapter, settings, precision and rows)
    generates only what is missing there, and the partial file goes once the predictions
    are written.
    """
    prompts = prompts_of(ds)
    if out_dir is None:
        preds = generate(model, tokenizer, prompts, settings, precision=precision,
                         keep_fp32_weights=keep_fp32_weights)
    else:
        partial = resumable.partial_file(out_dir, tag, resumable.fingerprint(
            model, settings, precision=precision, tag=tag, ids=ds["id"], prompts=prompts))
        done = resumable.read(partial)
        with resumable.Appender(partial) as append:
            preds = generate(model, tokenizer, prompts, settings, precision=precision,
                             keep_fp32_weights=keep_fp32_weights, done=done, on_batch=append)
    metrics, _ = text_scores(preds, ds["summary"])
    if out_dir is not None:
        write_outputs(out_dir, tag, ds, preds, metrics)
        partial.unlink(missing_ok=True)
    return metrics


def write_outputs(out_dir: Path, tag: str, ds: Any, preds: list[str],
                  metrics: dict[str, float]) -> None:
    run = RunDir(out_dir)
    lines = [json.dumps({"id": i, "prediction": p, "reference": r}) + "\n"
             for i, p, r in zip(ds["id"], preds, ds["summary"], strict=False)]
    atomic_write(run.predictions(tag), "".join(lines))
    run.record_metrics(tag, metrics)
