"""How close each export format gets to peftune's own texts, in the client that loads it.

    python benchmarks/serving_parity.py            # no network; --work DIR, --documents N
    python benchmarks/serving_parity.py --tiny     # the tests' tiny LLaMA instead (seconds)

A seeded LoRA (r=8, q/v projections, its B matrices scaled so the base still writes
summaries the adapter visibly changes) on the embedded SmolLM2-135M-Instruct, fp32 run
settings, greedy, 64 new tokens. peftune generates for the first N ACLSum validation papers
once; each export is then run through its own client on the same prompts (the parity check
``peftune export`` prints): peft for the adapter, plain transformers for merged folders,
llama.cpp (llama-cpp-python) for GGUF files and for the GGUF LoRA on the embedded model's
own Q4_1 GGUF. ``--tiny``: the tests' tiny random LLaMA with its byte-level BPE tokenizer
and synthetic documents, a LoRA trained for one step on all linear layers, repetition
penalty 1.3 (so llama.cpp's penalty over the whole context is exercised). Prints a markdown
table and writes it to ``WORK/serving_parity.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model

from peftune import models, parity
from peftune.config import ModelConfig, config_from_dict
from peftune.export import export

# llama.cpp rows first: transformers generation is the slow part on a shared CPU
ROWS = [("gguf", "f32"), ("gguf", "q8_0"), ("gguf", "f16"), ("gguf", "bf16"),
        ("gguf-lora", "f32"), ("merged", "bfloat16"), ("merged", "float32"), ("adapter", None)]
NEW_TOKENS = 64
B_SCALE = 0.05


def adapter(work: Path) -> Path:
    folder = work / "run" / "adapter"
    tokenizer = models.load_tokenizer(ModelConfig())
    base = models.load_model(models.resolve(ModelConfig()), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16,
                                            init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(B_SCALE)
    model.save_pretrained(folder)
    cfg = config_from_dict({"output_dir": str(work / "run"), "train": {"precision": "fp32"},
                            "eval": {"max_new_tokens": NEW_TOKENS}})
    (folder / "peftune.yaml").write_text(json.dumps(cfg.to_dict()))
    return folder


def tiny_adapter(work: Path) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.conftest import (
        bpe_adapter_config,
        make_bpe_tokenizer,
        make_llama,
        make_rows,
        write_jsonl,
    )

    from peftune.train import run

    model, data = work / "model", work / "data"
    tok = make_bpe_tokenizer()
    make_llama(len(tok)).save_pretrained(model)
    tok.save_pretrained(model)
    data.mkdir(parents=True, exist_ok=True)
    rows = make_rows(28)
    for name, part in (("train", rows[:12]), ("validation", rows[12:20]), ("test", rows[20:])):
        write_jsonl(data / f"{name}.jsonl", part)
    settings = bpe_adapter_config(model, data, work)
    # one small step: the adapter changes the random model's text without yet teaching it
    # to stop at once (three steps of the tests' rate give empty summaries here)
    settings["train"].update(max_steps=1, learning_rate=1e-2)
    cfg = config_from_dict({**settings, "eval": {"max_new_tokens": 12,
                                                 "repetition_penalty": 1.3}})
    return run(cfg).adapter_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/peftune-serving"))
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny LLaMA")
    args = parser.parse_args()
    torch.set_num_threads(1 if args.tiny else 2)
    folder = tiny_adapter(args.work) if args.tiny else adapter(args.work)
    options = parity.ParityOptions(documents=args.documents)
    from peftune.export import run_config

    cfg = run_config(folder)
    start = time.time()
    ref = parity.reference(cfg, folder, options)
    print(f"peftune: {len(ref.texts)} texts in {time.time() - start:.0f} s")
    results = []
    for fmt, dtype in ROWS:
        start = time.time()
        done = export(folder, args.work / f"{fmt}-{dtype}", fmt=fmt, dtype=dtype)
        path, lora = (done.lora_base, done.path) if done.lora_base else (done.path, None)
        result = parity.run(cfg, folder, path, fmt=fmt, options=options, lora=lora, ref=ref)
        row = {"format": fmt, "dtype": dtype, **dataclasses.asdict(result),
               "seconds": round(time.time() - start)}
        print(json.dumps(row), flush=True)
        results.append(row)
    lines = ["| format | weights | client | identical texts | token agreement | "
             "ROUGE-L vs peftune | ROUGE-L delta vs references |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['format']} | {r['dtype'] or 'float32'} | {r['client']} | "
                     f"{r['identical']}/{r['documents']} | {r['token_agreement']:.1%} | "
                     f"{r['rougeL']:.2f} | {r['rougeL_delta']:+.2f} |")
    print("\n".join(lines))
    (args.work / "serving_parity.json").write_text(json.dumps(
        {"rows": results, "reference": ref.texts}, indent=1))


if __name__ == "__main__":
    main()
