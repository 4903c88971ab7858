"""One training run: base model + PEFT method + tokenized data -> HF Trainer -> adapter.

Run it with ``peftune train --config configs/aclsum-smollm2-lora.yaml``.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils.memory import should_reduce_batch_size
from peft import PeftModel
from transformers import (
    EarlyStoppingCallback,
    PreTrainedModel,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from peftune import card, checkpoints, devices, models, plan, tracking
from peftune.assembly import Prepared, load_base, prepare, wrap
from peftune.checkpoints import COMPLETE_MARKER, last_complete_checkpoint
from peftune.config import Config, EvalConfig, save_yaml
from peftune.data import IGNORE_INDEX, LengthGroupedSampler, token_lengths
from peftune.devices import resolve_precision
from peftune.errors import ConfigError, Diverged, Interrupted, PeftuneError
from peftune.generation import score
from peftune.logs import show_progress
from peftune.methods import get_method
from peftune.metrics import ROUGE_KEYS
from peftune.models import precision as run_precision
from peftune.rundir import ADAPTER_SETTINGS, RunDir

log = logging.getLogger(__name__)


def use_checkpointing(model: PeftModel, on: bool) -> None:
    """Recompute activations in the backward pass, or stop doing so (a search's shared base
    keeps what the previous trial set, so every run sets it)."""
    base = model.get_base_model()
    # enabling also makes the frozen embeddings' output require grad, with a hook that a
    # second enable would orphan: remove the last one first
    base.disable_input_require_grads()
    if on:
        base.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.activation_checkpointing_disable()


def world_size() -> int:
    """Processes training together. Launchers (``accelerate launch``, ``torchrun``) set
    ``WORLD_SIZE`` before any process group exists, which is when TrainingArguments is built."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Global rank 0: the one process that writes run files and prints summaries."""
    return int(os.environ.get("RANK", "0")) == 0


def training_args(cfg: Config, *, output_dir: Path, has_eval: bool) -> TrainingArguments:
    t = cfg.train
    if t.micro_batch_size == "auto":
        raise ValueError("train.micro_batch_size 'auto' is decided by the memory plan: pass "
                         "plan.with_micro_batch(cfg, plan.make(cfg, data=...))")
    micro, accumulation = per_process_batch(t.batch_size, t.micro_batch_size, world_size())
    precision = resolve_precision(t.precision)
    save = "no" if not t.save_checkpoints else "epoch" if t.save_steps is None else "steps"
    evaluate = "no" if not has_eval else "steps" if t.eval_steps else \
        "epoch" if t.eval_each_epoch else "no"
    return devices.one_gpu_per_process(TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a ratio; PeftuneTrainer.create_scheduler rounds it
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
        metric_for_best_model=watched(cfg) if t.early_stopping else None,
        greater_is_better=watched(cfg) != "eval_loss" if t.early_stopping else None,
        run_name=t.run_name or Path(cfg.output_dir).resolve().name,
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,
        prediction_loss_only=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",  # for tokens/s in `peftune compare`
        # the progress bar follows our quiet flag, not transformers' log level, which is
        # kept at ERROR and would turn the bar off too
        disable_tqdm=not show_progress(),
    ))


SLICE_PREFIX = "slice_"
"""Evaluation metrics ``eval_slice_rougeL`` etc.: ROUGE of the :class:`RougeSignal` rows."""


@dataclass
class RougeSignal:
    """Summaries generated for a few fixed validation rows at every evaluation, scored with
    ROUGE: the metric a run is judged by, as an intermediate signal for pruning and early
    stopping. Validation loss is cheaper but can rank models against ROUGE (BENCHMARKS.md,
    pruning signal)."""

    rows: Any
    settings: EvalConfig
    precision: str

    @classmethod
    def of(cls, cfg: Config, data: Prepared, examples: int) -> RougeSignal:
        """The first ``examples`` validation rows of ``data``, generated as ``cfg`` scores."""
        validation = data.splits.get("validation")
        if validation is None or not len(validation):
            raise ConfigError("a rouge signal (train.early_stopping_signal, search.prune_signal) "
                              "needs validation rows: set data.validation_split or use loss")
        rows = validation.select(range(min(examples, len(validation))))
        return cls(rows=rows, settings=cfg.eval, precision=run_precision(cfg))

    def metrics(self, model: Any, tokenizer: Any) -> dict[str, float]:
        # greedy generation in eval mode; the Trainer's next step puts the model back in
        # train mode and evaluate() restores the random generators around all of this
        rouge = score(model, tokenizer, self.rows, self.settings, out_dir=None, tag="signal",
                      precision=self.precision)
        return {SLICE_PREFIX + key: rouge[key] for key in ROUGE_KEYS}


def watched(cfg: Config) -> str:
    """The evaluation metric that ``train.early_stopping`` watches."""
    return "eval_loss" if cfg.train.early_stopping_signal == "loss" \
        else f"eval_{SLICE_PREFIX}rougeL"


def early_stopping(cfg: Config, data: Prepared) -> tuple[list[Any], RougeSignal | None]:
    """The callback and ROUGE signal that ``train.early_stopping`` asks for (none if off)."""
    t = cfg.train
    if not t.early_stopping:
        return [], None
    signal = RougeSignal.of(cfg, data, t.signal_examples) \
        if t.early_stopping_signal == "rouge" else None
    return [EarlyStoppingCallback(early_stopping_patience=t.early_stopping)], signal


FEW_STEPS = 10
"""Fewer optimizer steps than this and a run warns that it trains next to nothing."""


def per_process_batch(batch: int, micro: int, world: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) of each of ``world`` processes for an effective batch
    of ``batch``: the configured micro-batch, or the largest divisor of it that fits the
    process's share (``train.batch_size: 32, micro_batch_size: 8`` is micro-batch 4 on 8 GPUs).
    """
    if batch % world:
        raise ConfigError(f"train.batch_size ({batch}) must be a multiple of the number of "
                          f"processes ({world})")
    fitted = math.gcd(micro, batch // world)
    if fitted != micro:
        log.info("micro-batch %d per process: %d processes share a batch of %d", fitted,
                 world, batch)
    return fitted, batch // (fitted * world)


def summary_loss_applies(model: Any) -> bool:
    """Whether the LM head of ``model`` can run at label positions only."""
    if not isinstance(model, PeftModel) or model.active_peft_config.is_prompt_learning:
        return False
    return model.get_base_model().config.model_type in models.SUMMARY_LOSS_TYPES


def summary_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The model inputs that make its own forward compute the LM head and the loss at label
    positions only: ``logits_to_keep`` marks the positions that predict a label, and
    ``shift_labels`` holds those labels in the same (row-major) order."""
    targets = inputs["labels"][:, 1:]
    keep = torch.zeros_like(inputs["labels"], dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE_INDEX
    return {**inputs, "logits_to_keep": keep, "shift_labels": targets[keep[:, :-1]]}


class PeftuneTrainer(Trainer):
    """HF Trainer with two speed-ups that leave results unchanged.

    - ``summary_loss``: the LM head runs only where there is a label. The prompt is most of
      each sequence, and the vocabulary projection (28M of SmolLM2's 135M parameters) on
      prompt positions is pure waste; the loss equals the model's own (a test checks). The
      selection is an input of the model's forward, so it holds in whatever DDP, FSDP or
      DeepSpeed wraps the model in, and a method that adds to the model's loss in its own
      forward (AdaLoRA's orthogonality penalty) still does. Other models and
      prompt-learning methods take the standard path.
    - ``group_by_length``: micro-batches of similar length (less padding), in an order
      fixed by (seed, epoch) so that resuming replays it.
    - ``token_budget``: a micro-batch whose padded tokens exceed it trains in parts
      (:func:`split_by_tokens`), so a step with one long document does not hold the
      activations of micro-batch x that document; the step's examples and its loss
      normalisation stay the same.
    """

    def __init__(self, *args: Any, summary_loss: bool, group_by_length: bool,
                 fingerprint: dict[str, Any], token_budget: int | None = None,
                 signal: RougeSignal | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.signal = signal
        self.summary_loss = summary_loss and summary_loss_applies(self.model)
        self.group_by_length = group_by_length
        self.token_budget = token_budget
        self.fingerprint = fingerprint
        self.loss_before_resume = 0.0  # summed over the steps a resumed checkpoint holds

    def loss_sum(self) -> float:
        """The training loss summed over every step so far, resumed ones included."""
        # the Trainer keeps what it logged in _total_loss_scalar, the rest in _tr_loss
        return self.loss_before_resume + self._total_loss_scalar + self._tr_loss.item()

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if not checkpoints.all_finite(model):
            # never saved: rotation would delete the last finite checkpoint to make room
            log.warning("not saving a checkpoint at step %d: the weights are not finite",
                        self.state.global_step)
            return
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        (folder / COMPLETE_MARKER).unlink(missing_ok=True)  # from a run this one replaces
        super()._save_checkpoint(model, trial)
        if folder.is_dir() and self.args.should_save:
            # written last: a checkpoint without it was cut short and is never resumed from
            checkpoints.mark_complete(folder, fingerprint=self.fingerprint,
                                      loss_sum=self.loss_sum())

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        # evaluation draws random numbers (each DataLoader seeds itself); a checkpoint saved
        # just before the epoch-end evaluation would resume on another dropout stream
        with checkpoints.same_random_numbers():
            return super().evaluate(*args, **kwargs)

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        output = super().evaluation_loop(*args, **kwargs)
        if self.signal is not None:
            prefix = kwargs.get("metric_key_prefix", "eval")
            output.metrics.update((f"{prefix}_{key}", value) for key, value in
                                  self.signal.metrics(self.model, self.processing_class).items())
        return output

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        # warmup rounded down (transformers rounds up): one optimizer step gets no warmup
        # instead of a learning rate of 0 for the only step
        if 0 < self.args.warmup_steps < 1:
            self.args.warmup_steps = math.floor(self.args.warmup_steps * num_training_steps)
        if num_training_steps < FEW_STEPS:
            log.warning("only %d optimizer step%s: too few to train much (results will be "
                        "close to the base model's); use more data or epochs, or a smaller "
                        "train.batch_size", num_training_steps,
                        "" if num_training_steps == 1 else "s")
        return super().create_scheduler(num_training_steps, optimizer)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_length:
            return super()._get_train_sampler(train_dataset)
        lengths = token_lengths(dataset)
        # grouped by optimizer step (all processes, all micro-batches): the micro-batch size
        # splits a step's examples without changing which examples they are
        step = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps \
            * self.args.world_size
        return LengthGroupedSampler(lengths, step, seed=self.args.data_seed or self.args.seed)

    def training_step(self, model: Any, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        # parts are weighted right only when the loss is a sum over the step's label count
        # (the Trainer's num_items_in_batch); one process only, so that no collective runs
        # once per part
        if self.token_budget is None or num_items_in_batch is None or \
                not self.model_accepts_loss_kwargs or self.args.world_size > 1:
            return super().training_step(model, inputs, num_items_in_batch)
        parts = split_by_tokens(inputs, self.token_budget)
        return sum(super(PeftuneTrainer, self).training_step(model, part, num_items_in_batch)
                   for part in parts)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self.summary_loss and "labels" in inputs:
            inputs = summary_inputs(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def split_by_tokens(inputs: dict[str, torch.Tensor], budget: int) -> list[dict[str, Any]]:
    """A padded micro-batch as parts of at most ``budget`` padded tokens each (a row longer
    than that is a part of its own): rows longest first, a part closed when one more row at
    its first row's length would pass the budget, each part cut to its longest row. The
    parts hold every row once; within a part rows keep the batch's order."""
    mask = inputs["attention_mask"]
    lengths = mask.sum(1).tolist()
    if len(lengths) * mask.shape[1] <= budget or set(inputs) - set(SPLIT_KEYS):
        return [inputs]
    parts: list[list[int]] = []
    for row in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if parts and (len(parts[-1]) + 1) * lengths[parts[-1][0]] <= budget:
            parts[-1].append(row)
        else:
            parts.append([row])
    out = []
    for rows in parts:
        index = torch.tensor(sorted(rows))
        columns = mask[index].any(0)  # padding on either side
        out.append({k: v[index][:, columns] for k, v in inputs.items()})
    return out


SPLIT_KEYS = ("input_ids", "attention_mask", "labels")
"""What a training micro-batch holds (``data.Collator``); anything else is not split."""


def build_trainer(cfg: Config, model: PeftModel, data: Prepared, *, output_dir: Path,
                  callbacks: list[Any] | None = None,
                  token_budget: int | None = None,
                  signal: RougeSignal | None = None) -> Trainer:
    method = get_method(cfg.method)
    columns = ["input_ids", "labels"]
    train_ds = data.splits["train"].select_columns(columns)
    eval_ds = data.splits.get("validation")
    args = training_args(cfg, output_dir=output_dir, has_eval=eval_ds is not None)
    log.info("training on %s in %s", args.device,
             "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32")
    trainer = PeftuneTrainer(
        model=model,
        summary_loss=cfg.train.summary_loss,
        group_by_length=cfg.train.group_by_length,
        fingerprint=checkpoints.fingerprint(cfg, len(train_ds)),
        token_budget=token_budget,
        signal=signal,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds.select_columns(columns) if eval_ds is not None else None,
        data_collator=data.collator,
        processing_class=data.tokenizer,
        callbacks=[*method.callbacks(model, cfg.method_options), *(callbacks or [])],
    )
    if cfg.train.report_to:
        sizes = {role: len(ds) for role, ds in data.splits.items()}
        trainer.add_callback(tracking.RunParams(tracking.run_params(cfg, sizes),
                                                trainer.callback_handler.callbacks))
    if args.disable_tqdm:  # quiet: no bar, and no log dicts printed in its place either
        trainer.remove_callback(PrinterCallback)
    elif trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressWithLoss())
    return trainer


class ProgressWithLoss(ProgressCallback):
    """The Trainer's progress bar, with the last logged loss next to the ETA."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        super().on_log(args, state, control, logs=logs, **kwargs)
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4g}")


@dataclass
class TrainResult:
    model: PeftModel
    adapter_dir: Path
    metrics: dict[str, Any]


class StopOnDivergence(TrainerCallback):
    """Stops training when the loss is NaN/inf or the gradient norm explodes.

    Explosion is a pre-clipping gradient norm ``EXPLODE_FACTOR`` times the first one
    logged: clipping hides it from the loss for a while, and no healthy run gets there.

    Under fp16 an infinite gradient norm is an overflow that the GradScaler handles: it skips
    that step and halves its scale. Only ``MAX_OVERFLOWS`` of those logged in a row stop the
    run (the scale is then 2^-4 of its start and the weights have not moved for as long).
    """

    EXPLODE_FACTOR = 1e4
    MAX_OVERFLOWS = 20

    def __init__(self) -> None:
        self.reason: str | None = None
        self.first_grad_norm: float | None = None
        self.overflows = 0

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        logs = logs or {}
        for key in ("loss", "eval_loss", "grad_norm"):
            value = logs.get(key)
            if value is not None and not math.isfinite(value) and \
                    not (key == "grad_norm" and self._scaler_skipped(args)):
                self.reason = f"{key} became {value} at step {state.global_step}"
        norm = logs.get("grad_norm")
        if norm is not None and math.isfinite(norm):
            self.overflows = 0
            if self.first_grad_norm is None:
                self.first_grad_norm = max(norm, 1e-8)
            elif norm > self.EXPLODE_FACTOR * self.first_grad_norm:
                self.reason = (f"gradient norm exploded to {norm:.3g} at step "
                               f"{state.global_step} (first: {self.first_grad_norm:.3g})")
        if self.reason:
            control.should_training_stop = True

    def _scaler_skipped(self, args: Any) -> bool:
        """Count an fp16 overflow as a step the GradScaler skipped, until too many in a row."""
        if not getattr(args, "fp16", False):
            return False
        self.overflows += 1
        return self.overflows < self.MAX_OVERFLOWS


def handle_signals(handler: Callable[[int, Any], None]) -> Callable[[], None]:
    """Install ``handler`` for SIGTERM and SIGINT; return the function that puts the previous
    handlers back. Only the main thread can install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


class StopOnSignal(TrainerCallback):
    """SIGTERM / SIGINT: finish the current step, save a checkpoint, stop."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> Callable[[], None]:
        return handle_signals(self._handle)

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
        save_to: Path | None = None, memory_plan: plan.Plan | None = None,
        signal: RougeSignal | None = None) -> dict[str, Any]:
    """Train an already wrapped model; return the Trainer's metrics plus the last eval loss.

    With ``signal``, every evaluation also scores its rows with ROUGE (``eval_slice_rougeL``
    and the other keys), for the callbacks to act on.

    With ``save_to``, the adapter (PEFT format) and tokenizer are saved there through the
    Trainer, which gathers FSDP/DeepSpeed shards and writes from the main process only.
    Out of memory in a single process, the micro-batch is halved (accumulation doubles, so
    the effective batch stays) and training restarts from the last checkpoint, or from the
    initial adapter. (``accelerate.utils.find_executable_batch_size`` only calls again with a
    smaller batch: it would neither keep the effective batch nor put the adapter back.)
    """
    if memory_plan is None and cfg.train.micro_batch_size == "auto":
        memory_plan = plan.make(cfg, data=data)  # plan.checkpointing makes one if it needs it
    cfg = plan.with_micro_batch(cfg, memory_plan) if memory_plan else cfg
    use_checkpointing(model, plan.checkpointing(cfg, memory_plan, data=data))
    budget = memory_plan.token_budget if memory_plan else None
    initial = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    while True:
        try:
            return _fit_once(cfg, model, data, output_dir=output_dir, callbacks=callbacks,
                             resume=resume, save_to=save_to, token_budget=budget,
                             signal=signal)
        except RuntimeError as err:
            micro = cfg.train.micro_batch_size
            # other ranks of a DDP/FSDP/ZeRO-3 run would wait in a collective for this one
            if not should_reduce_batch_size(err) or micro == 1 or world_size() > 1:
                raise
            devices.free_memory()
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
              save_to: Path | None, token_budget: int | None,
              signal: RougeSignal | None) -> dict[str, Any]:
    guard, stop = StopOnDivergence(), StopOnSignal()
    trainer = build_trainer(cfg, model, data, output_dir=output_dir,
                            callbacks=[guard, stop, *(callbacks or [])],
                            token_budget=token_budget, signal=signal)
    checkpoint = checkpoints.resume_point(output_dir, trainer.fingerprint, resume=resume,
                                          discard=is_main_process())
    trainer.loss_before_resume = checkpoints.loss_sum(checkpoint)
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    restore = stop.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except Exception as err:
        if not _disk_full(err):
            raise
        raise _disk_full_error(output_dir, output_dir) from None
    finally:
        restore()
    if stop.signal is not None:
        raise Interrupted(f"stopped by signal {stop.signal} at step {trainer.state.global_step}"
                          f"; checkpoint saved in {output_dir}; rerun the same command to "
                          "resume")
    metrics: dict[str, Any] = dict(result.metrics)
    # the Trainer's train_loss averages the steps of this call only; its end added _tr_loss
    total = trainer.loss_before_resume + trainer._total_loss_scalar
    metrics["train_loss"] = total / max(trainer.state.global_step, 1)
    if guard.reason or not math.isfinite(metrics["train_loss"]) or \
            not checkpoints.all_finite(model):
        last = last_complete_checkpoint(output_dir)
        kept = f"the last finite checkpoint, {last}, is kept" if last else "no checkpoint is kept"
        reason = guard.reason or "the loss or the weights became non-finite"
        raise Diverged(f"training diverged ({reason}); {kept}; "
                       "lower train.learning_rate and add --train.resume false; no adapter "
                       "was saved")
    metrics["trainable_parameters"] = model.get_nb_trainable_parameters()[0]
    metrics["train_tokens"] = int(trainer.state.num_input_tokens_seen)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if evals:
        metrics.update((key, value) for key, value in evals[-1].items()
                       if key == "eval_loss" or key.startswith(f"eval_{SLICE_PREFIX}"))
    if trainer.state.global_step < trainer.state.max_steps:
        metrics["stopped_early_at"] = trainer.state.global_step
    if save_to is not None:
        try:
            trainer.save_model(str(save_to))
        except Exception as err:
            if not _disk_full(err):
                raise
            raise _disk_full_error(save_to, output_dir) from None
        # the Trainer's arguments as a pickle: nothing loads it, and loading one runs code
        (save_to / "training_args.bin").unlink(missing_ok=True)
    return metrics


def _disk_full(err: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain. The tokenizers library reports it as a plain
    ``Exception`` whose message is all that is left of the OS error."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "errno", None) == errno.ENOSPC or "No space left" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _disk_full_error(target: Path, checkpoints: Path) -> PeftuneError:
    last = last_complete_checkpoint(checkpoints)
    return PeftuneError(f"disk full while writing to {target}; the last complete checkpoint "
                        f"({last.name if last else 'none'}) is kept; free space and rerun the "
                        "same command")


def run(cfg: Config, *, base: PreTrainedModel | None = None, data: Prepared | None = None,
        callbacks: list[Any] | None = None) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.data`` and save the adapter under ``cfg.output_dir``.

    ``adapter/`` holds the adapter in plain PEFT format, its tokenizer and the run config
    (``peftune.yaml``). Under ``accelerate launch`` every process trains; only rank 0 writes.
    """
    run_dir = RunDir.of(cfg)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if data is None:  # data first: a bad file fails before the model load
        data = prepare(cfg)
    # a rerun with other settings stops here, leaving the run's config.yaml as it was
    settings = checkpoints.fingerprint(cfg, len(data.splits["train"]))
    checkpoints.resume_point(run_dir.checkpoints, settings, resume=cfg.train.resume,
                             discard=is_main_process())
    memory_plan = plan.make(cfg, data=data)
    cfg = plan.with_micro_batch(cfg, memory_plan)  # config.yaml says what trains
    if is_main_process():
        save_yaml(cfg, run_dir.config_file)
        log.info("%s", plan.brief(memory_plan))
    if base is None:
        base = load_base(cfg, data.tokenizer)
    model = wrap(base, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    dtype = model.get_base_model().dtype
    log.info("%s: %s trainable parameters of %s (%.3f%%); base weights in %s", cfg.method,
             f"{trainable:,}", f"{total:,}", 100 * trainable / total,
             devices.DTYPE_NAMES.get(dtype, dtype))
    adapter_dir = run_dir.adapter
    stopping, signal = early_stopping(cfg, data)
    metrics = fit(cfg, model, data, output_dir=run_dir.checkpoints,
                  callbacks=[*stopping, *(callbacks or [])], resume=cfg.train.resume,
                  save_to=adapter_dir, memory_plan=memory_plan, signal=signal)
    if is_main_process():
        record(cfg, data, metrics)
    return TrainResult(model=model, adapter_dir=adapter_dir, metrics=metrics)


def record(cfg: Config, data: Prepared, metrics: dict[str, Any]) -> None:
    """What a trained adapter gets beside its weights: the run's settings, its model card
    and the training metrics (``metrics.json`` key ``train``)."""
    run_dir = RunDir.of(cfg)
    save_yaml(cfg, run_dir.adapter / ADAPTER_SETTINGS)
    card.write_for_run(run_dir.adapter, cfg, data.tokenizer, data.splits)
    run_dir.record_metrics("train", metrics)


def adopt(cfg: Config, adapter: Path, *, base: PreTrainedModel, data: Prepared,
          metrics: dict[str, Any]) -> TrainResult:
    """The run :func:`run` would make, from an ``adapter`` already trained exactly as ``cfg``
    trains (a search trial on the same data and settings): copied, not trained again."""
    run_dir = RunDir.of(cfg)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    cfg = plan.with_micro_batch(cfg, plan.make(cfg, data=data))
    save_yaml(cfg, run_dir.config_file)
    shutil.copytree(adapter, run_dir.adapter, dirs_exist_ok=True)
    record(cfg, data, metrics)
    model = models.load_adapter(base, run_dir.adapter)
    return TrainResult(model=model, adapter_dir=run_dir.adapter, metrics=metrics)
