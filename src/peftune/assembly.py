"""One way from a :class:`Config` to what every command needs: the tokenizer, the prompt
format, the tokenized data, the base model (resolved once, :func:`resolve_base`; loaded,
:func:`load_base`) and a fresh adapter around it (:func:`wrap`).

``train``, ``evaluate``, ``summarize``, ``search``, ``compare``, ``export`` and the benchmarks
all build these here, so they cannot drift apart (a search trial of a k-bit method gets the
same quantized base as ``peftune train`` of that method; ``summarize`` sees the prompt that
training saw). Commands differ only in what they do afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import torch
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from peftune import devices, models
from peftune.config import Config
from peftune.data import Collator, PromptFormat, load_splits, tokenize
from peftune.errors import ConfigError
from peftune.methods import get_method
from peftune.models import prompt_format

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




def prepare(cfg: Config, tokenizer: PreTrainedTokenizerBase | None = None, *,
            roles: tuple[str, ...] = ("train", "validation")) -> Prepared:
    """Load ``cfg.data`` and tokenize the splits named in ``roles`` with the prompt format."""
    tokenizer = tokenizer or models.load_tokenizer(cfg.model)
    fmt = prompt_format(cfg, tokenizer)
    raw = load_splits(cfg.data)
    splits = {role: tokenize(ds, tokenizer, fmt, cfg.data.max_source_tokens)
              for role, ds in raw.items() if role in roles}
    return Prepared(tokenizer=tokenizer, fmt=fmt, splits=splits)


def resolve_base(cfg: Config, *, gpu: bool | None = None) -> models.ResolvedModel:
    """``cfg.model`` as this run loads it: quantized as ``cfg.method`` needs (the k-bit
    methods), its weights in the dtype the run computes in on a GPU if ``gpu`` (default:
    whether this machine has one; :func:`devices.weights_dtype`). ``peftune plan`` reads the
    same object that loading does."""
    load = get_method(cfg.method).load_kwargs(cfg.method_options)
    return models.resolve(cfg.model, precision=models.precision(cfg), gpu=gpu,
                          quantization=load.get("quantization_config"))


def load_base(cfg: Config, tokenizer: PreTrainedTokenizerBase, *,
              model: models.ResolvedModel | None = None) -> PreTrainedModel:
    """The base model as ``cfg.method`` needs it (:func:`resolve_base`), or as ``model`` says
    (export: the checkpoint at the export's dtype, not quantized)."""
    method = get_method(cfg.method)
    method.check_sharding(devices.sharding(), model_dtype=cfg.model.dtype)
    return models.load_model(model or resolve_base(cfg), pad_token_id=tokenizer.pad_token_id)


def load_trained(cfg: Config, tokenizer: PreTrainedTokenizerBase, adapter: Path) -> PeftModel:
    """The base on this process's device with the trained ``adapter`` on it, ready to generate
    (``summarize`` and the export's parity reference)."""
    return models.load_adapter(devices.place(load_base(cfg, tokenizer)), adapter)


def wrap(base: PreTrainedModel, cfg: Config) -> PeftModel:
    """A fresh adapter of the configured method around ``base`` (seeded). ``train``,
    ``search`` and ``peftune plan`` (on an empty, meta-device base) all wrap here."""
    method = get_method(cfg.method)
    info = replace(models.model_info(base), instruction=cfg.data.instruction)
    if info.is_encoder_decoder and not method.seq2seq:
        raise ConfigError(f"method '{method.name}' does not support encoder-decoder models "
                          f"('{info.model_type}'); pick another --method")
    peft_config = method.build(cfg.method_options, info)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(method.prepare_base(base, cfg.method_options), peft_config)
    # On a 16-bit base (model.dtype auto on a GPU) adapter weights must stay fp32: the
    # optimizer's updates would round away, and fp16 mixed precision refuses to unscale
    # 16-bit gradients. peft upcasts its tuner layers' (LoRA, AdaLoRA, IA3), not
    # LLaMA-Adapter's, which take the dtype of the attention they wrap.
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    return model


def unwrap(model: Any) -> PreTrainedModel:
    """Remove the adapter :func:`wrap` added, returning the untouched base model (a search
    re-wraps it for its next trial)."""
    inner = model.base_model
    return inner.unload() if hasattr(inner, "unload") else model.get_base_model()


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
