"""One training run: base model + PEFT method + tokenized data -> HF Trainer -> adapter.

Run it with ``peftune train --config configs/aclsum-smollm2-lora.yaml``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import torch
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from peftune import models
from peftune.config import Config, save_yaml
from peftune.data import Collator, PromptFormat, load_splits, tokenize
from peftune.errors import ConfigError, PeftuneError
from peftune.methods import get_method
from peftune.rundir import update_metrics

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


def prepare(cfg: Config, tokenizer: PreTrainedTokenizerBase, *, seq2seq: bool,
            roles: tuple[str, ...] = ("train", "validation")) -> Prepared:
    fmt = PromptFormat.for_tokenizer(tokenizer, cfg.data.instruction, seq2seq=seq2seq)
    raw = load_splits(cfg.data)
    splits = {role: tokenize(ds, tokenizer, fmt, cfg.data.max_source_tokens)
              for role, ds in raw.items() if role in roles}
    return Prepared(tokenizer=tokenizer, fmt=fmt, splits=splits)


def load_base(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The base model as ``cfg.method`` needs it (quantized for the k-bit methods)."""
    method = get_method(cfg.method)
    return models.load_model(cfg.model, pad_token_id=tokenizer.pad_token_id,
                             extra=method.load_kwargs(cfg.method_options))


def wrap(base: PreTrainedModel, cfg: Config) -> PeftModel:
    """A fresh adapter of the configured method around ``base`` (seeded)."""
    method = get_method(cfg.method)
    info = replace(models.model_info(base), instruction=cfg.data.instruction)
    if info.is_encoder_decoder and not method.seq2seq:
        raise ConfigError(f"method '{method.name}' does not support encoder-decoder models "
                          f"('{info.model_type}'); pick another --method")
    peft_config = method.build(cfg.method_options, info)
    torch.manual_seed(cfg.seed)
    return get_peft_model(method.prepare(base, cfg.method_options), peft_config)


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if models.bf16_supported():
        return "bf16"
    return "fp16" if torch.cuda.is_available() else "fp32"


def training_args(cfg: Config, *, output_dir: Path, has_eval: bool) -> TrainingArguments:
    t = cfg.train
    world = max(1, torch.distributed.get_world_size() if torch.distributed.is_initialized()
                else 1)
    accumulation = max(1, t.batch_size // (t.micro_batch_size * world))
    precision = resolve_precision(t.precision)
    per_epoch = "epoch" if t.save_steps is None else "steps"
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        eval_strategy="epoch" if (t.eval_each_epoch and has_eval) else "no",
        save_strategy=per_epoch,
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        report_to=t.report_to or "none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",  # for tokens/s in `peftune compare`
    )


def build_trainer(cfg: Config, model: PeftModel, data: Prepared, *, output_dir: Path,
                  callbacks: list[Any] | None = None) -> Trainer:
    method = get_method(cfg.method)
    columns = ["input_ids", "labels"]
    train_ds = data.splits["train"].select_columns(columns)
    eval_ds = data.splits.get("validation")
    args = training_args(cfg, output_dir=output_dir, has_eval=eval_ds is not None)
    return Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds.select_columns(columns) if eval_ds is not None else None,
        data_collator=data.collator,
        processing_class=data.tokenizer,
        callbacks=[*method.callbacks(model, cfg.method_options), *(callbacks or [])],
    )


@dataclass
class TrainResult:
    model: PeftModel
    adapter_dir: Path
    metrics: dict[str, Any]


def run(cfg: Config, *, base: PreTrainedModel | None = None, data: Prepared | None = None,
        callbacks: list[Any] | None = None) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.data`` and save the adapter under ``cfg.output_dir``."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    if data is None:  # data first: a bad file fails before the model load
        tokenizer = models.load_tokenizer(cfg.model)
        data = prepare(cfg, tokenizer, seq2seq=models.is_seq2seq(cfg.model))
    if base is None:
        base = load_base(cfg, data.tokenizer)
    model = wrap(base, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("%s: %s trainable parameters of %s (%.3f%%)", cfg.method, f"{trainable:,}",
             f"{total:,}", 100 * trainable / total)
    ckpt_dir = out / "checkpoints"
    trainer = build_trainer(cfg, model, data, output_dir=ckpt_dir, callbacks=callbacks)
    resume = get_last_checkpoint(str(ckpt_dir)) if cfg.train.resume and ckpt_dir.is_dir() \
        else None
    if resume:
        log.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    metrics: dict[str, Any] = dict(result.metrics)
    metrics["trainable_parameters"] = trainable
    metrics["train_tokens"] = int(trainer.state.num_input_tokens_seen)
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    if evals:
        metrics["eval_loss"] = evals[-1]
    if not math.isfinite(metrics.get("train_loss", 0.0)):
        raise PeftuneError(f"training diverged (loss {metrics['train_loss']}); no adapter saved")
    adapter_dir = save_adapter(model, data.tokenizer, cfg, out / "adapter")
    update_metrics(out, "train", metrics)
    return TrainResult(model=model, adapter_dir=adapter_dir, metrics=metrics)


def save_adapter(model: PeftModel, tokenizer: PreTrainedTokenizerBase, cfg: Config,
                 path: Path) -> Path:
    """Adapter in plain PEFT format, plus the tokenizer and the run config beside it."""
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    save_yaml(cfg, path / "peftune.yaml")
    return path
