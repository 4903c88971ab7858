"""Batched generation from prompt-only, left-padded, length-sorted batches, scored with ROUGE.

ROUGE-1/2/L/Lsum come from ``rouge_score`` with the Porter stemmer, on a 0-100 scale;
ROUGE-Lsum sees one sentence per line, as it was defined. ``loop_rate`` is the share of
predictions that loop (:func:`loops`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedTokenizerBase

from peftune import devices, resumable
from peftune.config import EvalConfig
from peftune.data import Collator
from peftune.errors import PeftuneError
from peftune.fast_generation import (
    GeneratedNoRepeatNGram,
    growing_cache,
    half_precision,
    prefilled_cache,
)
from peftune.logs import show_progress
from peftune.rundir import atomic_write, update_metrics

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
log = logging.getLogger(__name__)
_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


LOOP_NGRAM = 4
LOOP_TIMES = 3


def loops(text: str, *, n: int = LOOP_NGRAM, times: int = LOOP_TIMES) -> bool:
    """Whether ``text`` loops: some run of ``n`` words (lowercased, punctuation dropped)
    occurs ``times`` times or more in it. A summary that says one thing once passes; one
    that repeats a phrase or sentence until ``max_new_tokens`` does not.

    >>> loops("We train it. We train it. We train it. We train it.")
    True
    >>> loops("we train it, then we test it, then we ship it")
    False
    """
    words = _WORD.findall(text.lower())
    seen: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        seen[gram] = seen.get(gram, 0) + 1
        if seen[gram] >= times:
            return True
    return False


def loop_rate(predictions: Sequence[str]) -> float:
    """The share (0-1) of ``predictions`` that :func:`loops`."""
    return round(sum(map(loops, predictions)) / max(1, len(predictions)), 4)


def split_sentences(text: str) -> str:
    return "\n".join(s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip())


def document_rouge(predictions: Sequence[str], references: Sequence[str]
                   ) -> dict[str, list[float]]:
    """ROUGE-1/2/L/Lsum F1 x 100 of each prediction against its reference."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    per_doc: dict[str, list[float]] = {key: [] for key in ROUGE_KEYS}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(split_sentences(ref), split_sentences(pred))
        for key in ROUGE_KEYS:
            per_doc[key].append(100 * scores[key].fmeasure)
    return per_doc


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean F1 of ROUGE-1/2/L/Lsum x 100."""
    n = max(1, len(predictions))
    return {key: round(sum(scores) / n, 4)
            for key, scores in document_rouge(predictions, references).items()}


def text_scores(predictions: Sequence[str], references: Sequence[str]
                ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The metrics of a split's predictions (mean ROUGE, count, mean words, loop rate), and
    the ROUGE of each prediction (what bootstrap intervals resample)."""
    per_doc = document_rouge(predictions, references)
    n = max(1, len(predictions))
    metrics: dict[str, float] = {key: round(sum(v) / n, 4) for key, v in per_doc.items()}
    metrics["num_examples"] = len(predictions)
    metrics["mean_prediction_words"] = round(
        sum(len(p.split()) for p in predictions) / n, 2)
    metrics["loop_rate"] = loop_rate(predictions)
    return metrics, per_doc


def paired_bootstrap(scores_a: Sequence[float], scores_b: Sequence[float], *,
                     resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired items, and its percentile bootstrap 95% interval.

    The items (test documents, scored by two systems) are resampled with replacement
    ``resamples`` times; the interval holds the middle 95% of the resampled means.

    >>> paired_bootstrap([30.0, 50.0], [30.0, 30.0], resamples=1000, seed=0)
    (10.0, 0.0, 20.0)
    """
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired_bootstrap needs two equally long, non-empty lists of scores "
                         f"(got {len(a)} and {len(b)})")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1 (got {resamples})")
    diff = a - b
    rows = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[rows].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def mean_interval(scores: Sequence[float], *, resamples: int = 2000, seed: int = 0
                  ) -> tuple[float, float, float]:
    """Mean of ``scores`` (one per document) and its percentile bootstrap 95% interval.

    >>> mean_interval([20.0, 20.0, 20.0])
    (20.0, 20.0, 20.0)
    """
    return paired_bootstrap(scores, [0.0] * len(scores), resamples=resamples, seed=seed)


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The rows ``write_outputs`` wrote: id, prediction and reference of each document."""
    if not path.is_file():
        raise PeftuneError(f"no predictions at {path}: score that model first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def compare_predictions(best: Path, others: dict[str, Path], *, resamples: int = 2000,
                        seed: int = 0) -> dict[str, Any]:
    """Per-document ROUGE of ``best`` against each of ``others`` on the same documents.

    Returns the mean scores of every system, and for each other system ``"best - NAME"``:
    per ROUGE key the mean difference in points with its paired bootstrap 95% interval.
    """
    rows = {"best": read_predictions(best)}
    rows.update((name, read_predictions(path)) for name, path in others.items())
    ids = [r["id"] for r in rows["best"]]
    for name, got in rows.items():
        if [r["id"] for r in got] != ids:
            raise PeftuneError(f"{name}: its predictions are not of the same documents, in the "
                             f"same order, as {best}")
    scores = {name: document_rouge([r["prediction"] for r in got],
                                   [r["reference"] for r in got])
              for name, got in rows.items()}
    out: dict[str, Any] = {
        "documents": len(ids), "resamples": resamples, "seed": seed, "interval": 0.95,
        "test": {name: {k: round(sum(v) / max(1, len(v)), 4) for k, v in s.items()}
                 for name, s in scores.items()}}
    for name in others:
        out[f"best - {name}"] = {key: _interval(scores["best"][key], scores[name][key],
                                                resamples=resamples, seed=seed)
                                 for key in ROUGE_KEYS}
    return out


def _interval(a: list[float], b: list[float], *, resamples: int, seed: int
              ) -> dict[str, float]:
    diff, low, high = paired_bootstrap(a, b, resamples=resamples, seed=seed)
    return {"difference": round(diff, 4), "low": round(low, 4), "high": round(high, 4)}


def write_examples(path: Path, documents: Sequence[str], predictions: dict[str, Path]) -> None:
    """``path`` (JSON lines): each of ``documents`` with its reference and each named
    system's summary, for the first ``len(documents)`` rows of the predictions files."""
    systems = {name: read_predictions(p)[:len(documents)] for name, p in predictions.items()}
    lines = []
    for i, document in enumerate(documents):
        first = next(iter(systems.values()))[i]
        row = {"id": first["id"], "document": document, "reference": first["reference"]}
        row.update((name, got[i]["prediction"]) for name, got in systems.items())
        lines.append(json.dumps(row) + "\n")
    atomic_write(path, "".join(lines))


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
    name = "predictions.jsonl" if tag == "test" else f"predictions_{tag}.jsonl"
    lines = [json.dumps({"id": i, "prediction": p, "reference": r}) + "\n"
             for i, p, r in zip(ds["id"], preds, ds["summary"], strict=False)]
    atomic_write(out_dir / name, "".join(lines))
    update_metrics(out_dir, tag, metrics)
