"""`peftune plan`'s memory prediction against measured peak memory, on this machine.

    python benchmarks/plan_check.py               # the table in BENCHMARKS.md (~10 min, 2 cores)
    python benchmarks/plan_check.py --calibrate   # the activation constants in peftune.plan

Each cell is its own process: a few LoRA training steps through peftune's training path
(`train.fit`, bf16 autocast where the CPU has it) on rows of exactly N tokens (the last 32
are the summary), and its peak resident memory (`ru_maxrss`) next to the plan's total at
that micro-batch and length. Models: the embedded SmolLM2-135M (fp32 weights), and a
randomly initialised TinyLlama-shaped 1.1B LLaMA built from a config in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = 32
TINYLLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
             "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000}
CELLS = [  # model, micro-batch, tokens per row, gradient checkpointing, steps
    ("smollm2", 2, 256, False, 3), ("smollm2", 2, 512, False, 3),
    ("smollm2", 4, 256, False, 3), ("smollm2", 4, 512, False, 3),
    ("smollm2", 4, 512, True, 3), ("smollm2", 1, 1024, False, 4),
    ("tinyllama", 1, 256, False, 2), ("tinyllama", 1, 512, False, 2),
    ("tinyllama", 2, 256, False, 2), ("tinyllama", 2, 512, False, 2),
]


def _config(model: str, micro: int, tmp: str, gc: bool, steps: int) -> Any:
    from peftune import config_from_dict

    return config_from_dict({
        "output_dir": tmp, "model": {"dtype": "bfloat16" if model == "tinyllama" else "auto"},
        "train": {"micro_batch_size": micro, "batch_size": micro, "max_steps": steps,
                  "save_checkpoints": False, "eval_each_epoch": False, "logging_steps": 1000,
                  "gradient_checkpointing": gc, "resume": False},
        "plan": {"use_data": False}})


def _rows(tokens: int, n: int, vocab: int) -> Any:
    import datasets

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (n, tokens), generator=gen).tolist()
    prompt = tokens - SUMMARY
    return datasets.Dataset.from_dict({
        "input_ids": ids, "labels": [[-100] * prompt + row[prompt:] for row in ids],
        "prompt_len": [prompt] * n})


def cell(model: str, micro: int, tokens: int, gc: bool, steps: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from peftune import assembly, models, plan
    from peftune import train as training

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(model, micro, tmp, gc, steps)
        tokenizer = models.load_tokenizer(cfg.model)
        if model == "tinyllama":
            model_config = LlamaConfig(**TINYLLAMA, pad_token_id=tokenizer.pad_token_id)
            torch.manual_seed(0)
            base = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
        else:
            model_config = assembly.resolve_base(cfg).config
            base = assembly.load_base(cfg, tokenizer)
        data = assembly.Prepared(tokenizer=tokenizer, fmt=None, splits={
            "train": _rows(tokens, micro * steps, model_config.vocab_size)})
        predicted = plan.make(cfg, data=data, model_config=model_config)
        memory = plan.estimate(predicted, micro_batch=micro, tokens=tokens, summary=SUMMARY,
                               checkpointing=gc)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        training.fit(cfg, assembly.wrap(base, cfg), data, output_dir=Path(tmp) / "ckpt")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"model": model, "micro_batch": micro, "tokens": tokens, "checkpointing": gc,
            "predicted_gib": memory.total / 2**30, "measured_gib": peak / 2**30,
            "before_training_gib": before / 2**30,
            "parts_gib": {k: v / 2**30 for k, v in vars(memory).items()}}


def saved_bytes(hidden: int, intermediate: int, layers: int, tokens: int, *,
                weights: torch.dtype, autocast: bool) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in a LoRA forward."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config).to(weights),
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 256, (2, tokens))
    mask = torch.ones_like(ids)
    mask[0, -tokens // 4:] = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model.get_base_model().model(input_ids=ids, attention_mask=mask)
    return sum(seen.values())


def _per_token(h: int, i: int, kw: dict[str, Any]) -> float:
    def layer(tokens: int) -> int:
        return saved_bytes(h, i, 3, tokens, **kw) - saved_bytes(h, i, 2, tokens, **kw)
    return (layer(192) - layer(64)) / (2 * 128)


def calibrate() -> None:
    """Per layer and token: difference 3- and 2-layer models at 192 and 64 tokens."""
    for name, weights, autocast in (("bf16 autocast, fp32 weights", torch.float32, True),
                                    ("bf16 autocast, bf16 weights", torch.bfloat16, True),
                                    ("fp32", torch.float32, False)):
        kw = {"weights": weights, "autocast": autocast}
        base, wide, deep = (_per_token(h, i, kw) for h, i in ((64, 128), (128, 128), (64, 512)))
        a, b = (wide - base) / 64, (deep - base) / 384
        print(f"{name}: {a:g} h + {b:g} i + {base - 64 * a - 128 * b:g} bytes per token "
              "and layer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--only", help="run the cells of this model only")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("PLAN_CHECK_THREADS", "2")))
    if args.calibrate:
        calibrate()
        return
    if args.cell:
        model, micro, tokens, gc, steps = json.loads(args.cell)
        print(json.dumps(cell(model, micro, tokens, gc, steps)))
        return
    print("| model | micro-batch | tokens/row | checkpointing | predicted GiB | measured "
          "peak RSS GiB | error |\n|---|---|---|---|---|---|---|", flush=True)
    for spec in CELLS:
        if args.only and spec[0] != args.only:
            continue
        out = subprocess.run([sys.executable, __file__, "--cell", json.dumps(spec)],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(f"| {spec} | failed: {out.stderr.strip().splitlines()[-1]} |", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        error = r["predicted_gib"] / r["measured_gib"] - 1
        print(f"| {r['model']} | {r['micro_batch']} | {r['tokens']} | "
              f"{'on' if r['checkpointing'] else 'off'} | {r['predicted_gib']:.2f} | "
              f"{r['measured_gib']:.2f} | {100 * error:+.0f}% |", flush=True)
        print(json.dumps(r), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
