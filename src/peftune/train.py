"""One training run: base model + PEFT method + tokenized data -> HF Trainer -> adapter.

Run it with ``peftune train --config configs/aclsum-smollm2-lora.yaml``.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate.utils.memory import should_reduce_batch_size
from peft import PeftModel, get_peft_model
from transformers import (
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from peftune import card, models
from peftune.assembly import Prepared, load_base, prepare
from peftune.config import Config, save_yaml
from peftune.data import IGNORE_INDEX, LengthGroupedSampler
from peftune.devices import resolve_precision
from peftune.errors import ConfigError, Diverged, Interrupted, PeftuneError
from peftune.methods import get_method
from peftune.rundir import update_metrics

log = logging.getLogger(__name__)


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
        prediction_loss_only=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",  # for tokens/s in `peftune compare`
    )


# Decoder-only families whose forward is body -> final norm -> lm_head, nothing after.
SUMMARY_LOSS_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def summary_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder body, LM head) when logits can be computed at label positions only."""
    if not isinstance(model, PeftModel) or model.active_peft_config.is_prompt_learning:
        return None
    base = model.get_base_model()
    if base.config.model_type not in SUMMARY_LOSS_TYPES or not hasattr(base, "model"):
        return None
    return base.model, base.get_output_embeddings()


class PeftuneTrainer(Trainer):
    """HF Trainer with two speed-ups that leave results unchanged.

    - ``summary_loss``: the LM head runs only where there is a label. The prompt is most of
      each sequence, and the vocabulary projection (28M of SmolLM2's 135M parameters) on
      prompt positions is pure waste; the loss equals the model's own (a test checks).
      Other models and prompt-learning methods take the standard path.
    - ``group_by_length``: micro-batches of similar length (less padding), in an order
      fixed by (seed, epoch) so that resuming replays it.
    """

    def __init__(self, *args: Any, summary_loss: bool, group_by_length: bool,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.summary_loss, self.group_by_length = summary_loss, group_by_length

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if folder.is_dir() and self.args.should_save:
            # written last: a checkpoint without it was cut short and is never resumed from
            (folder / COMPLETE_MARKER).write_text(str(self.state.global_step))

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_length:
            return super()._get_train_sampler(train_dataset)
        lengths = [len(ids) for ids in dataset["input_ids"]]
        return LengthGroupedSampler(lengths, self.args.per_device_train_batch_size,
                                    seed=self.args.data_seed or self.args.seed)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        head = summary_head(model) if self.summary_loss else None
        if head is None or "labels" not in inputs:
            self.loss_is_scaled_for_ga = None
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        body, lm_head = head
        targets = inputs["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        # the inner modules bypass the forward that accelerate wrapped in autocast
        with self.accelerator.autocast():
            hidden = body(input_ids=inputs["input_ids"],
                          attention_mask=inputs["attention_mask"]).last_hidden_state
            logits = lm_head(hidden[:, :-1][keep]).float()
        loss = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
        # normalised like the model's own loss: over the whole accumulated batch when known
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is None:
            loss = loss / keep.sum().clamp(min=1)
        else:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss


def build_trainer(cfg: Config, model: PeftModel, data: Prepared, *, output_dir: Path,
                  callbacks: list[Any] | None = None) -> Trainer:
    method = get_method(cfg.method)
    columns = ["input_ids", "labels"]
    train_ds = data.splits["train"].select_columns(columns)
    eval_ds = data.splits.get("validation")
    args = training_args(cfg, output_dir=output_dir, has_eval=eval_ds is not None)
    return PeftuneTrainer(
        model=model,
        summary_loss=cfg.train.summary_loss,
        group_by_length=cfg.train.group_by_length,
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


COMPLETE_MARKER = "peftune-complete"




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


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose save finished (see ``COMPLETE_MARKER``)."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and (p / COMPLETE_MARKER).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


class StopOnSignal(TrainerCallback):
    """SIGTERM / SIGINT: finish the current step, save a checkpoint, stop."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.signal(sig, self._handle)
                    for sig in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.signal is not None:
            control.should_save = args.save_strategy != "no"
            control.should_training_stop = True


def fit(cfg: Config, model: PeftModel, data: Prepared, *, output_dir: Path,
        callbacks: list[Any] | None = None, resume: bool = False,
        save_to: Path | None = None) -> dict[str, Any]:
    """Train an already wrapped model; return the Trainer's metrics plus the last eval loss.

    With ``save_to``, the adapter (PEFT format) and tokenizer are saved there through the
    Trainer, which gathers FSDP/DeepSpeed shards and writes from the main process only.
    Out of memory, the micro-batch is halved (accumulation doubles, so the effective batch
    stays) and training restarts from the last checkpoint, or from the initial adapter.
    """
    initial = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    while True:
        try:
            return _fit_once(cfg, model, data, output_dir=output_dir, callbacks=callbacks,
                             resume=resume, save_to=save_to)
        except RuntimeError as err:
            micro = cfg.train.micro_batch_size
            if not should_reduce_batch_size(err) or micro == 1:
                raise
            log.warning("out of memory with micro-batch %d: retrying with %d (gradient "
                        "accumulation keeps the batch size at %d)", micro, micro // 2,
                        cfg.train.batch_size)
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(
                cfg.train, micro_batch_size=micro // 2))
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in initial:
                        param.copy_(initial[name])
            model.zero_grad(set_to_none=True)
            resume = True


def _fit_once(cfg: Config, model: PeftModel, data: Prepared, *, output_dir: Path,
              callbacks: list[Any] | None, resume: bool,
              save_to: Path | None) -> dict[str, Any]:
    guard, stop = StopOnDivergence(), StopOnSignal()
    trainer = build_trainer(cfg, model, data, output_dir=output_dir,
                            callbacks=[guard, stop, *(callbacks or [])])
    checkpoint = last_complete_checkpoint(output_dir) if resume else None
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    restore = stop.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        last = last_complete_checkpoint(output_dir)
        raise PeftuneError(f"disk full while writing to {output_dir}; the last complete "
                           f"checkpoint ({last.name if last else 'none'}) is kept; free space "
                           "and rerun the same command") from None
    finally:
        restore()
    if stop.signal is not None:
        raise Interrupted(f"stopped by signal {stop.signal} at step {trainer.state.global_step}"
                          f"; checkpoint saved in {output_dir}; rerun the same command to "
                          "resume")
    metrics: dict[str, Any] = dict(result.metrics)
    if guard.reason or not math.isfinite(metrics.get("train_loss", 0.0)):
        raise Diverged(f"training diverged ({guard.reason or 'non-finite loss'}); lower "
                       "train.learning_rate; no adapter was saved")
    metrics["trainable_parameters"] = model.get_nb_trainable_parameters()[0]
    metrics["train_tokens"] = int(trainer.state.num_input_tokens_seen)
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
        data = prepare(cfg)
    if base is None:
        base = load_base(cfg, data.tokenizer)
    model = wrap(base, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("%s: %s trainable parameters of %s (%.3f%%)", cfg.method, f"{trainable:,}",
             f"{total:,}", 100 * trainable / total)
    adapter_dir = out / "adapter"
    metrics = fit(cfg, model, data, output_dir=out / "checkpoints", callbacks=callbacks,
                  resume=cfg.train.resume, save_to=adapter_dir)
    if is_main_process():
        save_yaml(cfg, adapter_dir / "peftune.yaml")
        card.write_for_run(adapter_dir, cfg, data.tokenizer, data.splits)
        update_metrics(out, "train", metrics)
    return TrainResult(model=model, adapter_dir=adapter_dir, metrics=metrics)
