"""Speed and memory of peftune against two baselines, measured in the same run.

    python benchmarks/bench.py            # everything (make bench), ~25 min on 2 cores
    python benchmarks/bench.py --part train --variant peftune   # one measurement (JSON)

Baselines, on the embedded SmolLM2-135M and ACLSum:
  A  seed-faithful: sequences padded to max_length (1024 document + 128 summary), fp32,
     HF Trainer defaults (logits on every position), HF generate on prompts right-padded
     to 1024 tokens. Its search (model reloaded per trial on 1152-token rows) is not run:
     at A's training rate it alone would outlast the whole benchmark.
  B  a careful expert's script: HF Trainer + peft, prompt+summary with dynamic padding,
     fp32, model loaded once, HF generate with left padding in dataset order; its search
     is plain Optuna (same sampler and seed) around the same objective at these settings.
  B-ckpt  (part ``long``, 1,024-token documents) LLaMA-Factory's defaults: Trainer + peft on
     bf16 weights under bf16 autocast, gradient checkpointing, the LM head at every position.
  LLaMA-Factory  (parts ``anchor-abstracts`` and ``anchor-long``) LLaMA-Factory 0.9.5 itself,
     in its own venv (``llamafactory_baseline.py``; skipped with the reason when it cannot
     be set up), against peftune's defaults: ACLSum abstracts with its one ~1,400-token
     paper, and the long documents, cut at 1,024 tokens; the arms alternate.
Every part runs in its own process so peak resident memory is its own.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("A", "B", "peftune")
TRAIN_STEPS, MICRO_BATCH = 6, 4
GEN_EXAMPLES, GEN_TOKENS = 16, 64
SEARCH_TRIALS = 6
LONG_TOKENS, LONG_STEPS = 1024, 4


# ---------------------------------------------------------------- shared set-up

def _cfg(variant: str, **train: Any) -> Any:
    from peftune import config_from_dict

    fast = variant == "peftune"
    return config_from_dict({
        "output_dir": f"/tmp/peftune-bench/{variant}",
        "data": {"max_source_tokens": 384, "max_eval_examples": GEN_EXAMPLES},
        "train": {"micro_batch_size": MICRO_BATCH, "batch_size": MICRO_BATCH,
                  "max_steps": TRAIN_STEPS + 1, "precision": "auto" if fast else "fp32",
                  "summary_loss": fast, "group_by_length": fast, "save_checkpoints": False,
                  "eval_each_epoch": False, "logging_steps": 1000, **train},
        # peftune generates with its default batch size (16); the baselines with 8
        "eval": {"max_new_tokens": GEN_TOKENS, "no_repeat_ngram_size": 0,
                 **({} if fast else {"batch_size": 8})},
    })


def _data(cfg: Any, variant: str) -> Any:
    from peftune import assembly, models

    tok = models.load_tokenizer(cfg.model)
    data = assembly.prepare(cfg, tok, roles=("train", "validation", "test"))
    if variant == "A":  # the seed pads every example to 1024 + 128 tokens
        data = _PaddedTo(data, 1024 + 128)
    return data


class _PaddedTo:
    """Prepared data whose collator pads every batch to a fixed length (baseline A)."""

    def __init__(self, data: Any, length: int) -> None:
        self.__dict__.update(data.__dict__)
        self._length = length

    @property
    def collator(self) -> Any:
        from peftune.data import Collator

        return Collator(pad_id=self.tokenizer.pad_token_id, pad_to_multiple_of=self._length)


# ---------------------------------------------------------------- parts

def matmul() -> dict[str, float]:
    """The machine's limit: GFLOP/s of the model's MLP matmul in fp32 and bf16.

    The best of eight half-second windows: a shared machine only ever slows a window down.
    """
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(2048, 576, dtype=dtype)
        b = torch.randn(576, 1536, dtype=dtype)
        for _ in range(3):
            a @ b
        best = 0.0
        for _ in range(8):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < 0.5:
                a @ b
                n += 1
            best = max(best, 2 * 2048 * 576 * 1536 * n / (time.perf_counter() - start) / 1e9)
        out[str(dtype).split(".")[-1]] = best
    return out


class _StepTimer(TrainerCallback):
    """Wall time and real tokens of every optimizer step after the first (warm-up)."""

    def __init__(self) -> None:
        self.start = self.tokens0 = None
        self.seconds = self.tokens = 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.start is None:
            self.start, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen
            return
        self.seconds = time.perf_counter() - self.start
        self.tokens = state.num_input_tokens_seen - self.tokens0


def train_speed(variant: str) -> dict[str, float]:
    """The real training loop (Trainer.train), timed step by step after a warm-up step."""
    from peftune import assembly, models, train

    cfg = _cfg(variant)
    data = _data(cfg, variant)
    base = models.load_model(models.resolve(cfg.model),
                             pad_token_id=data.tokenizer.pad_token_id)
    model = assembly.wrap(base, cfg)
    timer = _StepTimer()
    trainer = train.build_trainer(cfg, model, data, output_dir=Path(cfg.output_dir),
                                  callbacks=[timer])
    padded = sum(b["input_ids"].numel() for b in
                 itertools.islice(trainer.get_train_dataloader(), 1, TRAIN_STEPS + 1))
    trainer.train()
    n_params = sum(p.numel() for p in base.parameters())
    return {"tokens_per_s": timer.tokens / timer.seconds,
            "padding_pct": 100 * (1 - timer.tokens / padded),
            "flops_per_token": 4 * n_params, "seconds": timer.seconds}


def _long_source() -> str:
    """ACLSum with long documents (abstract, introduction and conclusion: ~1,200 tokens, cut at
    1,024), as a local JSONL folder."""
    from peftune.data import _detok

    out = Path("/tmp/peftune-bench/aclsum-long")
    out.mkdir(parents=True, exist_ok=True)
    root = Path(__import__("aclsum").__file__).parent / "dataset"
    for name in ("train", "val", "test"):
        rows = []
        for line in (root / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            paper = json.loads(line)
            parts = [paper["sentences"][k] for k in ("abstract", "introduction", "conclusion")]
            rows.append(json.dumps({
                "id": paper["id"], "document": "\n\n".join(" ".join(map(_detok, p))
                                                            for p in parts),
                "summary": " ".join(paper["summary"][k]
                                    for k in ("challenge", "approach", "outcome"))}))
        (out / f"{'validation' if name == 'val' else name}.jsonl").write_text(
            "\n".join(rows) + "\n", encoding="utf-8")
    return str(out)


def long_train(variant: str, overrides: list[str]) -> dict[str, float]:
    """Training on 1,024-token documents, LoRA r=8 on q,v, batch 4, bf16.

    B-ckpt is what LLaMA-Factory does by default: Trainer + peft on bf16 weights under bf16
    autocast, gradient checkpointing on, the LM head over every position, rows in dataset
    order. peftune is its defaults (plus ``overrides``, dotted ``key=value``).
    """
    from peftune import config_from_dict
    from peftune.config import set_dotted

    fast = variant == "peftune"
    data: dict[str, Any] = {
        "output_dir": f"/tmp/peftune-bench/long-{variant}",
        "data": {"source": _long_source(), "max_source_tokens": LONG_TOKENS},
        "train": {"batch_size": MICRO_BATCH, "max_steps": LONG_STEPS + 1,
                  "save_checkpoints": False, "eval_each_epoch": False, "logging_steps": 1000,
                  "precision": "bf16"},
        "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}
    if not fast:
        data["model"] = {"dtype": "bfloat16"}
        data["train"].update(micro_batch_size=MICRO_BATCH, summary_loss=False,
                             group_by_length=False, gradient_checkpointing=True)
    for item in overrides:
        key, value = item.split("=", 1)
        set_dotted(data, key, json.loads(value) if value[:1] in "[{0123456789tf" else value)
    return _timed_fit(config_from_dict(data))


def _timed_fit(cfg: Any) -> dict[str, Any]:
    """What ``peftune train`` does for ``cfg`` (plan, micro-batch, checkpointing, Trainer),
    timed step by step after a warm-up step."""
    from peftune import assembly, plan, train

    prepared = _data(cfg, "peftune")
    memory_plan = plan.make(cfg, data=prepared)
    cfg = plan.with_micro_batch(cfg, memory_plan)
    model = assembly.wrap(assembly.load_base(cfg, prepared.tokenizer), cfg)
    timer = _StepTimer()
    train.fit(cfg, model, prepared, output_dir=Path(cfg.output_dir), callbacks=[timer],
              memory_plan=memory_plan)
    return {"tokens_per_s": timer.tokens / timer.seconds, "seconds": timer.seconds,
            "checkpointing": plan.checkpointing(cfg, memory_plan),
            "micro_batch": cfg.train.micro_batch_size,
            "longest_part": memory_plan.rows_at(memory_plan.lengths.max)}


ANCHOR = {"steps": 22, "rows": 0}
"""Optimizer steps of each anchor run, and training papers (0: all 100; else the last ones,
which hold ACLSum's one ~1,400-token abstract)."""


def _anchor_source(workload: str) -> str:
    """``abstracts``: ACLSum as shipped (one training document ~1,400 tokens, cut at 1,024;
    the rest 200-400); ``long``: every document ~1,200 tokens (:func:`_long_source`)."""
    source = "aclsum" if workload == "abstracts" else _long_source()
    if not ANCHOR["rows"]:
        return source
    from peftune.config import DataConfig
    from peftune.data import load_splits

    out = Path(f"/tmp/peftune-bench/{workload}-last{ANCHOR['rows']}")
    out.mkdir(parents=True, exist_ok=True)
    for role, ds in load_splits(DataConfig(source=source)).items():
        if role == "train":
            ds = ds.select(range(len(ds) - ANCHOR["rows"], len(ds)))
        ds.select_columns(["id", "document", "summary"]).to_json(out / f"{role}.jsonl")
    return str(out)


def anchor_train(workload: str, variant: str) -> dict[str, Any]:
    """LLaMA-Factory itself against peftune's defaults: documents cut at 1,024 tokens, LoRA
    r 8, alpha 32, dropout 0.1 on q,v, batch 4, bf16, lr 1e-4, ``ANCHOR["steps"]`` steps."""
    source = _anchor_source(workload)
    if variant == "LLaMA-Factory":
        import llamafactory_baseline as lf

        args = lf.prepare(f"aclsum_{workload}", source, max_source_tokens=LONG_TOKENS,
                          steps=ANCHOR["steps"], batch=MICRO_BATCH,
                          out=Path(f"/tmp/peftune-bench/lf-{workload}"))
        out = subprocess.run([str(lf.VENV / "bin" / "python"), lf.__file__, "train",
                              str(args)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            sys.exit(f"LLaMA-Factory failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    from peftune import config_from_dict

    return _timed_fit(config_from_dict({
        "output_dir": f"/tmp/peftune-bench/anchor-{workload}",
        "data": {"source": source, "max_source_tokens": LONG_TOKENS},
        "train": {"batch_size": MICRO_BATCH, "max_steps": ANCHOR["steps"],
                  "learning_rate": 1e-4, "precision": "bf16", "save_checkpoints": False,
                  "eval_each_epoch": False, "logging_steps": 1000},
        "lora": {"r": 8, "alpha": 32, "dropout": 0.1,
                 "target_modules": ["q_proj", "v_proj"]}}))


def generation_speed(variant: str) -> dict[str, Any]:
    from peftune import models
    from peftune.generation import generate, prompts_of
    from peftune.metrics import rouge

    cfg = _cfg(variant)
    data = _data(cfg, "B")
    model = models.load_model(models.resolve(cfg.model),
                              pad_token_id=data.tokenizer.pad_token_id)
    prompts = prompts_of(data.splits["test"])
    start = time.perf_counter()
    if variant == "peftune":  # as `peftune evaluate` does it
        from peftune.devices import resolve_precision

        texts = generate(model, data.tokenizer, prompts, cfg.eval, progress=False,
                         precision=resolve_precision(cfg.train.precision),
                         keep_fp32_weights=False)
    else:
        texts = _hf_generate(model, data.tokenizer, prompts, cfg.eval.batch_size,
                             seed_style=variant == "A")
    seconds = time.perf_counter() - start
    new = sum(len(data.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    result = {"new_tokens_per_s": new / seconds, "texts": texts, "seconds": seconds,
              "rougeL": rouge(texts, data.splits["test"]["summary"])["rougeL"],
              "peak_rss_mb": _peak_rss_mb()}
    if variant == "peftune":  # the same code path at B's precision, for the text comparison
        del model
        model = models.load_model(models.resolve(cfg.model),
                                  pad_token_id=data.tokenizer.pad_token_id)
        result["texts_fp32"] = generate(model, data.tokenizer, prompts, cfg.eval,
                                        progress=False, precision="fp32")
    return result


def _hf_generate(model: Any, tok: Any, prompts: list, batch_size: int, *,
                 seed_style: bool) -> list:
    """What a user writes by hand: dataset order, tokenizer padding, generate().

    B pads each batch on the left to its longest prompt. A does what the seed's
    preprocessing does: every prompt right-padded to 1024 tokens.
    """
    tok.padding_side = "right" if seed_style else "left"
    pad = {"padding": "max_length", "max_length": 1024} if seed_style else {}
    texts = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            batch = tok.pad({"input_ids": chunk}, return_tensors="pt", **pad)
            out = model.generate(**batch, max_new_tokens=GEN_TOKENS, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            texts += [t.strip() for t in tok.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                          skip_special_tokens=True)]
    return texts


def search_time(variant: str) -> dict[str, Any]:
    """A fixed 6-trial LoRA search on 16 training / 4 validation papers, pruning off."""
    import optuna

    from peftune import search

    cfg = _cfg(variant, max_steps=-1, epochs=1)
    cfg.data.max_train_examples, cfg.data.max_eval_examples = 16, 4
    cfg.eval.max_new_tokens = 32
    cfg.search.n_trials, cfg.search.pruner, cfg.search.eval_examples = SEARCH_TRIALS, "none", 4
    cfg.search.space.batch_size = [4, 8]
    start = time.perf_counter()
    if variant == "peftune":
        cfg.output_dir = f"/tmp/peftune-bench/search-{os.getpid()}"
        study = search.create_study(cfg)
        bases, data = search.load_for_search(cfg)
        search.optimize(cfg, study, search.Objective(cfg, bases, data))
    else:  # B: plain Optuna around the same objective, fp32, whole-sequence loss
        study = optuna.create_study(direction="maximize",
                                    sampler=optuna.samplers.TPESampler(seed=cfg.seed,
                                                                       multivariate=True,
                                                                       group=True))
        bases, data = search.load_for_search(cfg)
        study.optimize(search.Objective(cfg, bases, data), n_trials=SEARCH_TRIALS)
    return {"seconds": time.perf_counter() - start, "best_params": study.best_trial.params}


# ---------------------------------------------------------------- driver

def measure(part: str, variant: str, overrides: list[str]) -> dict[str, Any]:
    torch.manual_seed(0)
    if part == "long":
        result = long_train(variant, overrides)
    elif part.startswith("anchor-"):
        result = anchor_train(part.removeprefix("anchor-"), variant)
    else:
        result = {"matmul": lambda _: matmul(), "train": train_speed,
                  "generate": generation_speed, "search": search_time}[part](variant)
    result.setdefault("peak_rss_mb", _peak_rss_mb())
    return result


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_part(part: str, variant: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--part", part, "--variant", variant,
                          "--anchor-steps", str(ANCHOR["steps"]),
                          "--anchor-rows", str(ANCHOR["rows"])],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.exit(f"{part} {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def long_table(results: dict[str, dict]) -> str:
    """1,024-token documents: peftune's defaults against B with gradient checkpointing."""
    b, p = results["B-ckpt"], results["peftune"]
    lines = [f"1,024-token documents, LoRA r=8 on q,v, batch {MICRO_BATCH}, bf16:", "",
             "| | B-ckpt (LLaMA-Factory's defaults) | peftune defaults | peftune/B-ckpt |",
             "|---|---|---|---|"]
    for name, key, fmt in (("training real tokens/s", "tokens_per_s", "{:.1f}"),
                           ("training peak RSS (MB)", "peak_rss_mb", "{:.0f}")):
        lines.append(f"| {name} | {fmt.format(b[key])} | {fmt.format(p[key])} | "
                     f"{p[key] / b[key]:.2f}x |")
    lines.append(f"| micro-batch, checkpointing | {b['micro_batch']}, {b['checkpointing']} | "
                 f"{p['micro_batch']}, {p['checkpointing']} | |")
    return "\n".join(lines)


def anchor_table(results: dict[str, dict[str, dict]]) -> str:
    """peftune's defaults against LLaMA-Factory's, both workloads."""
    lines = [f"documents cut at {LONG_TOKENS:,} tokens, LoRA r=8 alpha 32 dropout 0.1 on q,v, "
             f"batch {MICRO_BATCH}, bf16, {ANCHOR['steps']} steps on "
             f"{ANCHOR['rows'] or 'all'} training papers (tokens/s after the first step):", "",
             "| workload | | LLaMA-Factory 0.9.5 | peftune | peftune/LLaMA-Factory |",
             "|---|---|---|---|---|"]
    for workload in ("abstracts", "long"):
        arms = results.get(f"anchor-{workload}", {})
        lf, p = arms.get("LLaMA-Factory"), arms.get("peftune")
        for name, key, fmt in (("real tokens/s", "tokens_per_s", "{:.1f}"),
                               ("peak RSS (MB)", "peak_rss_mb", "{:.0f}")):
            cells = [fmt.format(r[key]) if r else "-" for r in (lf, p)]
            ratio = f"{p[key] / lf[key]:.2f}x" if lf and p else "-"
            lines.append(f"| {workload} | {name} | {cells[0]} | {cells[1]} | {ratio} |")
        if p:
            lines.append(f"| {workload} | micro-batch, checkpointing | 4, True | "
                         f"{p['micro_batch']} ({p['longest_part']} at the longest row), "
                         f"{p['checkpointing']} | |")
    return "\n".join(lines)


def table(results: dict[str, dict[str, dict]]) -> str:
    if "matmul" not in results:
        return ""
    peak = results["matmul"]["-"]
    lines = [f"matmul peak: {peak['float32']:.0f} GFLOP/s fp32, {peak['bfloat16']:.0f} "
             "GFLOP/s bf16", "",
             "| | A (seed) | B (expert) | peftune | peftune/A | peftune/B |",
             "|---|---|---|---|---|---|"]

    def row(name: str, part: str, key: str, fmt: str = "{:.1f}") -> None:
        v = {k: results[part][k][key] for k in VARIANTS if k in results[part]}
        ratios = [f"{v['peftune'] / v[k]:.2f}x" if k in v else "-" for k in ("A", "B")]
        lines.append(f"| {name} | " + " | ".join(fmt.format(v[k]) if k in v else "-"
                                                   for k in VARIANTS)
                     + f" | {ratios[0]} | {ratios[1]} |")

    row("training real tokens/s", "train", "tokens_per_s")
    for r in results["train"].values():
        r["mfu"] = 100 * r["tokens_per_s"] * r["flops_per_token"] / 1e9 / peak["bfloat16"]
    row("training MFU vs bf16 peak (%)", "train", "mfu")
    row("training padding (%)", "train", "padding_pct")
    row("training peak RSS (MB)", "train", "peak_rss_mb", "{:.0f}")
    row("generation new tokens/s", "generate", "new_tokens_per_s")
    row("generation ROUGE-L of those texts", "generate", "rougeL", "{:.2f}")
    row("generation peak RSS (MB)", "generate", "peak_rss_mb", "{:.0f}")
    row("6-trial search wall time (s)", "search", "seconds", "{:.0f}")
    row("search peak RSS (MB)", "search", "peak_rss_mb", "{:.0f}")
    gen = results["generate"]
    same = [sum(a == b for a, b in zip(gen["B"]["texts"], gen["peftune"][key], strict=True))
            for key in ("texts", "texts_fp32")]
    best = {k: results["search"][k]["best_params"] for k in ("B", "peftune")}
    lines += ["", f"greedy texts identical to baseline B: {same[0]}/{GEN_EXAMPLES} in bf16, "
              f"{same[1]}/{GEN_EXAMPLES} with peftune's generation at fp32",
              f"same best search configuration as B: {best['B'] == best['peftune']}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("matmul", "train", "long", "generate", "search",
                                           "anchor-abstracts", "anchor-long"))
    parser.add_argument("--variant", choices=(*VARIANTS, "B-ckpt", "LLaMA-Factory", "-"),
                        default="peftune")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a peftune setting for --part long (dotted, repeatable)")
    parser.add_argument("--parts",
                        default="matmul,train,long,generate,search,anchor-abstracts,anchor-long")
    parser.add_argument("--anchor-steps", type=int, default=ANCHOR["steps"],
                        help="optimizer steps of the LLaMA-Factory comparison")
    parser.add_argument("--anchor-rows", type=int, default=ANCHOR["rows"],
                        help="training papers of the LLaMA-Factory comparison (0: all)")
    args = parser.parse_args()
    ANCHOR.update(steps=args.anchor_steps, rows=args.anchor_rows)
    if args.part:
        result = measure(args.part, args.variant, args.set)
        print(json.dumps(result, default=str))
        return
    results: dict[str, dict[str, dict]] = {}
    lf_problem = None
    if "anchor-" in args.parts:
        import llamafactory_baseline

        print("setting up LLaMA-Factory (once) ...", file=sys.stderr, flush=True)
        lf_problem = llamafactory_baseline.ensure_venv()
        if lf_problem:
            print(f"skipping the LLaMA-Factory baseline: {lf_problem}", file=sys.stderr)
    for part in args.parts.split(","):
        variants = {"matmul": ["-"], "search": ["B", "peftune"],
                    "long": ["B-ckpt", "peftune"]}.get(part, list(VARIANTS))
        if part.startswith("anchor-"):  # alternating with the other workload's pair
            variants = ["peftune"] + ([] if lf_problem else ["LLaMA-Factory"])
        for variant in variants:
            print(f"measuring {part} {variant} ...", file=sys.stderr, flush=True)
            results.setdefault(part, {})[variant] = run_part(part, variant)
    print(table(results))
    if "long" in results:
        print("\n" + long_table(results["long"]))
    if any(part.startswith("anchor-") for part in results):
        print("\n" + anchor_table(results))


if __name__ == "__main__":
    main()
