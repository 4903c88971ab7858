"""LLaMA-Factory itself as a baseline: its own virtual environment, its SFT run on our data.

    python benchmarks/llamafactory_baseline.py setup   # the venv (~1 GB from the registry, once)

``bench.py`` calls :func:`ensure_venv`, writes the model and data with :func:`prepare` (from
peftune's environment) and runs :func:`train` in the LLaMA-Factory venv
(``VENV/bin/python benchmarks/llamafactory_baseline.py train ARGS.json``), which prints one
JSON line.

The venv is ``$PEFTUNE_LF_VENV`` or ``~/.cache/peftune-bench/lf-venv``: ``pip install
torch==2.13.0``, then ``pip install llamafactory==0.9.5 torch==2.13.0``. That pulls a
torchvision and a torchaudio built for other torch versions; on a machine without CUDA the
torchvision is uninstalled (LLaMA-Factory does not need it for text) and torchaudio's
compiled libraries are moved aside (LLaMA-Factory imports the package, never its kernels).

What LLaMA-Factory trains: the embedded SmolLM2-135M-Instruct as the plain Hugging Face folder
peftune converts it to, LoRA r 8, alpha 32, dropout 0.1 on q_proj,v_proj, its ``smollm2``
chat template (the same text as the model's own template), batch 4, bf16, its defaults
otherwise (gradient checkpointing on, bf16 weights, the LM head at every position, shuffled
rows). Documents are cut at the same 1,024 tokens as peftune's (decoded back to text) and
``cutoff_len`` leaves the rest whole, so both train on the same tokens.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VENV = Path(os.environ.get("PEFTUNE_LF_VENV",
                           Path.home() / ".cache" / "peftune-bench" / "lf-venv"))
VERSION, TORCH = "0.9.5", "2.13.0"
READY = VENV / ".peftune-ready"


def ensure_venv() -> str | None:
    """Set up the venv unless it is ready; None when it is, else why it cannot be."""
    if READY.is_file():
        return None
    python = VENV / "bin" / "python"
    steps = [[sys.executable, "-m", "venv", str(VENV)],
             [str(python), "-m", "pip", "install", "-q", f"torch=={TORCH}"],
             [str(python), "-m", "pip", "install", "-q", f"llamafactory=={VERSION}",
              f"torch=={TORCH}"]]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, text=True)
        if not _has_cuda(python):
            subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision"],
                           check=True, capture_output=True, text=True)
            _set_torchaudio_libraries_aside(python)
        subprocess.run([str(python), "-c", "import llamafactory.train.tuner"], check=True,
                       capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        return f"cannot set up LLaMA-Factory {VERSION} in {VENV}: {detail.strip()[-300:]}"
    READY.touch()
    return None


def _has_cuda(python: Path) -> bool:
    out = subprocess.run([str(python), "-c", "import torch; print(torch.cuda.is_available())"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip() == "True"


def _set_torchaudio_libraries_aside(python: Path) -> None:
    out = subprocess.run([str(python), "-c", "import importlib.util as u; "
                          "print(u.find_spec('torchaudio').submodule_search_locations[0])"],
                         check=True, capture_output=True, text=True)
    lib = Path(out.stdout.strip()) / "lib"
    aside = lib.parent / "lib-aside"
    aside.mkdir(exist_ok=True)
    for so in lib.glob("*.so"):
        so.replace(aside / so.name)


# ---------------------------------------------------------------- peftune's side

def prepare(name: str, source: str, *, max_source_tokens: int, steps: int, batch: int,
            out: Path) -> Path:
    """Model folder, data set (``dataset_info.json``) and LLaMA-Factory arguments for a run
    on the training split of ``source``; returns the arguments file."""
    from peftune import config_from_dict, models
    from peftune.data import load_splits
    from peftune.models import prompt_format

    cfg = config_from_dict({"data": {"source": source,
                                     "max_source_tokens": max_source_tokens}})
    tokenizer = models.load_tokenizer(cfg.model)
    fmt = prompt_format(cfg, tokenizer)
    rows = load_splits(cfg.data)["train"]
    documents, _ = fmt.truncate(rows["document"], max_source_tokens)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps([
        {"instruction": fmt.messages(doc)[0]["content"], "input": "", "output": summary}
        for doc, summary in zip(documents, rows["summary"], strict=True)]), encoding="utf-8")
    (out / "dataset_info.json").write_text(json.dumps({name: {"file_name": "train.json"}}),
                                           encoding="utf-8")
    args = {
        "model_name_or_path": models.resolve(cfg.model).path,
        "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": "q_proj,v_proj", "lora_rank": 8, "lora_alpha": 32,
        "lora_dropout": 0.1, "dataset": name, "dataset_dir": str(out),
        "template": "smollm2", "cutoff_len": 2 * max_source_tokens, "overwrite_cache": True,
        "output_dir": str(out / "output"), "overwrite_output_dir": True,
        "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4, "max_steps": steps, "bf16": True, "logging_steps": 1000,
        "save_strategy": "no", "report_to": "none", "seed": 42, "use_cpu": not _cuda(),
    }
    path = out / "args.json"
    path.write_text(json.dumps(args, indent=1), encoding="utf-8")
    return path


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------- LLaMA-Factory's side

def train(args_file: Path) -> dict[str, Any]:
    """``run_exp`` (what ``llamafactory-cli train`` calls) with a timer: real tokens are
    the attention mask's ones of every forward pass in training, counted from the step after
    the first (warm-up)."""
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.start: float | None = None
            self.seen = self.tokens0 = 0
            self.seconds = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                           **kwargs: Any) -> None:
            model.register_forward_pre_hook(self.count, with_kwargs=True)

        def count(self, module: Any, args: Any, kwargs: dict) -> None:
            if module.training and kwargs.get("attention_mask") is not None:
                self.seen += int(kwargs["attention_mask"].sum())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.start is None:
                self.start, self.tokens0 = time.perf_counter(), self.seen
                return
            self.seconds = time.perf_counter() - self.start

    timer = Timer()
    run_exp(json.loads(args_file.read_text(encoding="utf-8")), callbacks=[timer])
    peak = max(resource.getrusage(who).ru_maxrss
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    tokens = timer.seen - timer.tokens0
    return {"tokens_per_s": tokens / timer.seconds, "seconds": timer.seconds,
            "tokens": tokens, "peak_rss_mb": peak / 1024, "checkpointing": True,
            "micro_batch": json.loads(args_file.read_text())["per_device_train_batch_size"]}


def main() -> None:
    if sys.argv[1:2] == ["setup"]:
        problem = ensure_venv()
        print(problem or f"LLaMA-Factory {VERSION} ready in {VENV}")
        sys.exit(1 if problem else 0)
    if sys.argv[1:2] == ["train"]:
        print(json.dumps(train(Path(sys.argv[2]))))
        return
    sys.exit(__doc__)


if __name__ == "__main__":
    main()
