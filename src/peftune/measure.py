"""A few real training steps, timed: ``peftune plan --plan.measure``.

The only part of planning that loads the model. One warm-up step, then
``plan.measure_steps`` optimizer steps of the configured run (its method, micro-batch,
precision and checkpointing) on its own training data; nothing is saved.
"""

from __future__ import annotations

import dataclasses
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from peftune import assembly
from peftune import train as training
from peftune.config import Config
from peftune.rundir import RunDir


class StepClock(TrainerCallback):
    """Real (non-padding) tokens and seconds between the end of the first step and the
    last."""

    def __init__(self) -> None:
        self.start: tuple[float, int] | None = None
        self.end: tuple[float, int] | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        mark = (time.perf_counter(), int(state.num_input_tokens_seen))
        if self.start is None:
            self.start = mark
        else:
            self.end = mark

    def tokens_per_s(self) -> float:
        if self.start is None or self.end is None:
            return 0.0
        return (self.end[1] - self.start[1]) / max(self.end[0] - self.start[0], 1e-9)


def peak_memory() -> float:
    """Peak bytes of this process: the GPU's allocator, or the CPU process's resident set."""
    if torch.cuda.is_available():
        return float(torch.cuda.max_memory_allocated())
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def training_speed(cfg: Config, data: assembly.Prepared) -> tuple[float, float]:
    """(real tokens per second, peak memory in bytes) of ``cfg``'s training steps."""
    train = dataclasses.replace(cfg.train, max_steps=cfg.plan.measure_steps + 1,
                                save_checkpoints=False, eval_each_epoch=False,
                                eval_steps=None, logging_steps=10**6, resume=False,
                                report_to=[])
    data = dataclasses.replace(data, splits={"train": data.splits["train"]})
    with tempfile.TemporaryDirectory(prefix="peftune-plan-") as tmp:
        timed = dataclasses.replace(cfg, train=train, output_dir=tmp)
        model = assembly.wrap(assembly.load_base(timed, data.tokenizer), timed)
        clock = StepClock()
        training.fit(timed, model, data, output_dir=RunDir(Path(tmp)).checkpoints,
                     callbacks=[clock])
    return clock.tokens_per_s(), peak_memory()
