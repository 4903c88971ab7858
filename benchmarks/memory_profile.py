"""Where a ``peftune train`` run's resident memory goes, phase by phase and step by step.

    python benchmarks/memory_profile.py FILE.yaml [KEY=VALUE ...]

Runs what ``peftune train`` runs (data, plan, model load, adapter, Trainer) in this process
while a thread samples the resident set size every 20 ms, and prints the peak of each phase
and of each optimizer step with the tokens of its longest row. Delete the converted model
cache (``~/.cache/peftune/models``) first to include the GGUF conversion.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from transformers import TrainerCallback

MB = 2**20


class Sampler(threading.Thread):
    """The highest RSS seen since the last :meth:`take`."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process()
        self.peak = 0

    def run(self) -> None:
        while True:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def take(self) -> float:
        peak = max(self.peak, self.process.memory_info().rss)
        self.peak = 0
        return peak / MB


class StepPeaks(TrainerCallback):
    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.rows: list[str] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.sampler.take()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rows.append(f"step {state.global_step:>3}: peak {self.sampler.take():7.0f} MB")


def main(argv: list[str]) -> None:
    import json

    from peftune import config_from_dict, plan, train
    from peftune.assembly import load_base, prepare, wrap
    from peftune.config import load_yaml, set_dotted

    sampler = Sampler()
    sampler.start()
    settings = load_yaml(argv[0])
    for item in argv[1:]:
        key, value = item.split("=", 1)
        set_dotted(settings, key, json.loads(value) if value[:1] in "[{0123456789tf" else value)
    cfg = config_from_dict(settings)
    phases = []
    data = prepare(cfg)
    phases.append(("tokenizer (and GGUF conversion), data", sampler.take()))
    memory_plan = plan.make(cfg, data=data)
    cfg = plan.with_micro_batch(cfg, memory_plan)
    phases.append((f"plan (micro-batch {cfg.train.micro_batch_size})", sampler.take()))
    model = wrap(load_base(cfg, data.tokenizer), cfg)
    phases.append(("model load and adapter", sampler.take()))
    steps = StepPeaks(sampler)
    train.fit(cfg, model, data, output_dir=Path(cfg.output_dir) / "checkpoints",
              callbacks=[steps], memory_plan=memory_plan)
    phases.append(("training", sampler.take()))
    for name, peak in phases:
        print(f"{name:<45} peak {peak:7.0f} MB")
    print("\n".join(steps.rows))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process peak (ru_maxrss): {peak:.0f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
