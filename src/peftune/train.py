"""One training run: base model + PEFT method + tokenized data -> HF Trainer -> adapter.

Run it with ``peftune train --config configs/aclsum-smollm2-lora.yaml``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from peft import PeftModel, get_peft_model
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
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


def wrap(base: PreTrainedModel, cfg: Config) -> PeftModel:
    """A fresh adapter of the configured method around ``base`` (seeded)."""
    method = get_method(cfg.method)
    info = models.model_info(base)
    if info.is_encoder_decoder and not method.seq2seq:
        raise ConfigError(f"method '{method.name}' does not support encoder-decoder models")
    torch.manual_seed(cfg.seed)
    return get_peft_model(base, method.build(cfg.method_options, info))


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if models.bf16_supported():
        return "bf16"
    return "fp16" if torch.cuda.is_available() else "fp32"


def world_size() -> int:
    """Processes training together. Launchers (``accelerate launch``, ``torchrun``) set
    ``WORLD_SIZE`` before any process group exists, which is when TrainingArguments is built."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Global rank 0: the one process that writes run files and prints summaries."""
    return int(os.environ.get("RANK", "0")) == 0


def training_args(cfg: Config, *, output_dir: Path, has_eval: bool) -> TrainingArguments:
    t = cfg.train
    world = world_size()
    if t.batch_size % (t.micro_batch_size * world):
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of "
                          f"train.micro_batch_size ({t.micro_batch_size}) x {world} processes")
    accumulation = t.batch_size // (t.micro_batch_size * world)
    precision = resolve_precision(t.precision)
    save = "no" if not t.save_checkpoints else "epoch" if t.save_steps is None else "steps"
    evaluate = "no" if not has_eval else "steps" if t.eval_steps else \
        "epoch" if t.eval_each_epoch else "no"
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
        eval_strategy=evaluate,
        eval_steps=t.eval_steps,
        save_strategy=save,
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        report_to=t.report_to or "none",
        run_name=t.run_name or Path(cfg.output_dir).resolve().name,
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
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


class Diverged(PeftuneError):
    """The loss became NaN or infinite."""


class StopOnDivergence(TrainerCallback):
    """Stops training when the loss is NaN/inf or the gradient norm explodes.

    Explosion is a pre-clipping gradient norm ``EXPLODE_FACTOR`` times the first one
    logged: clipping hides it from the loss for a while, and no healthy run gets there.
    """

    EXPLODE_FACTOR = 1e4

    def __init__(self) -> None:
        self.reason: str | None = None
        self.first_grad_norm: float | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        logs = logs or {}
        for key in ("loss", "eval_loss", "grad_norm"):
            value = logs.get(key)
            if value is not None and not math.isfinite(value):
                self.reason = f"{key} became {value} at step {state.global_step}"
        norm = logs.get("grad_norm")
        if norm is not None and math.isfinite(norm):
            if self.first_grad_norm is None:
                self.first_grad_norm = max(norm, 1e-8)
            elif norm > self.EXPLODE_FACTOR * self.first_grad_norm:
                self.reason = (f"gradient norm exploded to {norm:.3g} at step "
                               f"{state.global_step} (first: {self.first_grad_norm:.3g})")
        if self.reason:
            control.should_training_stop = True


def fit(cfg: Config, model: PeftModel, data: Prepared, *, output_dir: Path,
        callbacks: list[Any] | None = None, resume: bool = False,
        save_to: Path | None = None) -> dict[str, Any]:
    """Train an already wrapped model; return the Trainer's metrics plus the last eval loss.

    With ``save_to``, the adapter (PEFT format) and tokenizer are saved there through the
    Trainer, which gathers FSDP/DeepSpeed shards and writes from the main process only.
    """
    guard = StopOnDivergence()
    trainer = build_trainer(cfg, model, data, output_dir=output_dir,
                            callbacks=[guard, *(callbacks or [])])
    checkpoint = get_last_checkpoint(str(output_dir)) if resume and output_dir.is_dir() \
        else None
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    metrics: dict[str, Any] = dict(trainer.train(resume_from_checkpoint=checkpoint).metrics)
    if guard.reason or not math.isfinite(metrics.get("train_loss", 0.0)):
        raise Diverged(f"training diverged ({guard.reason or 'non-finite loss'}); lower "
                       "train.learning_rate; no adapter was saved")
    metrics["trainable_parameters"] = model.get_nb_trainable_parameters()[0]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    if evals:
        metrics["eval_loss"] = evals[-1]
    if save_to is not None:
        trainer.save_model(str(save_to))
    return metrics


def run(cfg: Config, *, base: PreTrainedModel | None = None, data: Prepared | None = None,
        callbacks: list[Any] | None = None) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.data`` and save the adapter under ``cfg.output_dir``.

    ``adapter/`` holds the adapter in plain PEFT format, its tokenizer and the run config
    (``peftune.yaml``). Under ``accelerate launch`` every process trains; only rank 0 writes.
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_yaml(cfg, out / "config.yaml")
    if data is None:  # data first: a bad file fails before the model load
        tokenizer = models.load_tokenizer(cfg.model)
        data = prepare(cfg, tokenizer, seq2seq=models.is_seq2seq(cfg.model))
    if base is None:
        base = models.load_model(cfg.model, pad_token_id=data.tokenizer.pad_token_id)
    model = wrap(base, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("%s: %s trainable parameters of %s (%.3f%%)", cfg.method, f"{trainable:,}",
             f"{total:,}", 100 * trainable / total)
    adapter_dir = out / "adapter"
    metrics = fit(cfg, model, data, output_dir=out / "checkpoints", callbacks=callbacks,
                  resume=cfg.train.resume, save_to=adapter_dir)
    if is_main_process():
        save_yaml(cfg, adapter_dir / "peftune.yaml")
        update_metrics(out, "train", metrics)
    return TrainResult(model=model, adapter_dir=adapter_dir, metrics=metrics)
