"""One way from a :class:`Config` to what every command needs: the tokenizer, the prompt
format, the tokenized data and the base model.

``train``, ``evaluate``, ``summarize``, ``search``, ``compare``, ``export`` and the benchmarks
all build these here, so they cannot drift apart (a search trial of a k-bit method gets the
same quantized base as ``peftune train`` of that method; ``summarize`` sees the prompt that
training saw). Commands differ only in what they do afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import datasets
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from peftune import devices, models
from peftune.config import Config
from peftune.data import Collator, PromptFormat, load_splits, tokenize
from peftune.methods import get_method

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Tokenizer, prompt format and tokenized splits: built once, shared by every trial."""

    tokenizer: PreTrainedTokenizerBase
    fmt: PromptFormat
    splits: dict[str, datasets.Dataset]

    @property
    def collator(self) -> Collator:
        return Collator(pad_id=self.tokenizer.pad_token_id, pad_to_multiple_of=8)


def precision(cfg: Config) -> str:
    """The precision this run trains and generates in (``train.precision``, resolved)."""
    return devices.resolve_precision(cfg.train.precision)


def prompt_format(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
    return PromptFormat.for_tokenizer(tokenizer, cfg.data.instruction,
                                      seq2seq=models.is_seq2seq(cfg.model))


def prepare(cfg: Config, tokenizer: PreTrainedTokenizerBase | None = None, *,
            roles: tuple[str, ...] = ("train", "validation")) -> Prepared:
    """Load ``cfg.data`` and tokenize the splits named in ``roles`` with the prompt format."""
    tokenizer = tokenizer or models.load_tokenizer(cfg.model)
    fmt = prompt_format(cfg, tokenizer)
    raw = load_splits(cfg.data)
    splits = {role: tokenize(ds, tokenizer, fmt, cfg.data.max_source_tokens)
              for role, ds in raw.items() if role in roles}
    return Prepared(tokenizer=tokenizer, fmt=fmt, splits=splits)


def load_base(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The base model as ``cfg.method`` needs it (quantized for the k-bit methods), its
    weights in the dtype the run computes in (see :func:`devices.weights_dtype`)."""
    method = get_method(cfg.method)
    method.check_sharding(devices.sharding(), model_dtype=cfg.model.dtype)
    return models.load_model(cfg.model, pad_token_id=tokenizer.pad_token_id,
                             extra=method.load_kwargs(cfg.method_options),
                             precision=precision(cfg))


def base_key(cfg: Config) -> tuple[Any, ...]:
    """Configurations with equal keys can share one loaded base model; others cannot."""
    method = get_method(cfg.method)
    return method.base_key(cfg.method_options)


class Bases:
    """Base models by load configuration, each loaded once.

    Trials of a k-bit method get their own quantized base (prepared for k-bit training
    once), and never see or change the plain base that other methods' trials share.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._bases: dict[tuple[Any, ...], PreTrainedModel] = {}

    def get(self, cfg: Config) -> PreTrainedModel:
        key = base_key(cfg)
        if key not in self._bases:
            log.info("loading the base model for %s", cfg.method)
            # on the GPU now: the zero-shot baseline generates with it before any training
            self._bases[key] = devices.place(load_base(cfg, self.tokenizer))
        return self._bases[key]

    def put(self, cfg: Config, base: PreTrainedModel) -> None:
        """Hand back the base of ``cfg`` once its adapter is removed."""
        self._bases[base_key(cfg)] = base

    def add(self, cfg: Config, base: PreTrainedModel) -> None:
        self._bases.setdefault(base_key(cfg), base)
