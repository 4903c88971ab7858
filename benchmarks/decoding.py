"""Which decoding default to ship, and how closely a merged export agrees with its adapter.

    python benchmarks/decoding.py                  # no network; 72 min on a shared 2-core CPU
    python benchmarks/decoding.py --work DIR       # where the run and exports go

1. Trains one LoRA adapter on the embedded SmolLM2-135M-Instruct and ACLSum with the
   settings of configs/aclsum-smollm2-lora.yaml (all of them: 100 training papers, two
   epochs; only checkpointing is off). A finished adapter in the work folder is reused.
2. Decoding: generates for the validation split (40 papers; never the test split) with
   settings any client can reproduce, the adapter and the zero-shot base each, in the run's
   precision: nothing (greedy), repetition_penalty 1.1 and 1.2, and the old default
   no_repeat_ngram_size 3 for reference. transformers and vLLM apply both rules over the
   prompt and the generated tokens together; llama.cpp's repeat penalty covers the last
   ``--repeat-last-n`` tokens of the context (-1: all), and it has no no-repeat n-gram
   rule. Reports ROUGE-1/2/L, mean words, and the share of outputs that ran into
   max_new_tokens (loops, or answers longer than the limit), and picks the reproducible
   setting with the best adapter ROUGE-L.
3. Precision: with that setting, ``peftune export --format merged`` at bfloat16 and at
   float32, each loaded by plain transformers (``AutoModelForCausalLM``, the chat template,
   the export's ``generation_config.json``, one document at a time, as its model card
   shows) against peftune's texts of the adapter at the same precision, on the test split:
   texts identical and the ROUGE-L difference.

Prints markdown tables and writes them, with every text, to ``WORK/decoding.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from peftune import assembly, devices, export, models
from peftune import train as training
from peftune.config import config_from_dict, load_yaml, save_yaml
from peftune.generation import generate, prompts_of
from peftune.metrics import rouge

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "aclsum-smollm2-lora.yaml"
# name -> (no_repeat_ngram_size, repetition_penalty, reproducible by a standard client)
CANDIDATES = {
    "none": (0, 1.0, True),
    "repetition_penalty 1.1": (0, 1.1, True),
    "repetition_penalty 1.2": (0, 1.2, True),
    "no_repeat_ngram_size 3": (3, 1.0, False),
}


def config(work: Path) -> Any:
    settings = load_yaml(CONFIG)
    settings["output_dir"] = str(work / "run")
    settings["train"] = {**settings.get("train", {}), "save_checkpoints": False,
                         "resume": False}
    return config_from_dict(settings)


def trained(cfg: Any) -> Path:
    adapter = Path(cfg.output_dir) / "adapter"
    if (adapter / "adapter_model.safetensors").is_file():
        print(f"reusing {adapter}")
        return adapter
    start = time.time()
    training.run(cfg)
    print(f"trained in {time.time() - start:.0f}s")
    return adapter


def summary(texts: list[str], references: list[str], tokenizer: Any,
            max_new_tokens: int) -> dict[str, float]:
    # Re-tokenized length: an output that ended on EOS is shorter than the limit by more
    # than the one or two tokens re-tokenizing the decoded text can move.
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    scores = rouge(texts, references)
    return {"rouge1": scores["rouge1"], "rouge2": scores["rouge2"], "rougeL": scores["rougeL"],
            "mean_words": round(sum(len(t.split()) for t in texts) / len(texts), 1),
            "hit_limit": round(sum(n >= max_new_tokens - 2 for n in lengths) / len(texts), 3)}


def decoding(cfg: Any, model: Any, data: Any) -> dict[str, Any]:
    ds = data.splits["validation"]
    prompts, refs = prompts_of(ds), ds["summary"]
    precision = models.precision(cfg)
    rows: dict[str, Any] = {}
    for name, (ngram, penalty, _) in CANDIDATES.items():
        settings = replace(cfg.eval, no_repeat_ngram_size=ngram, repetition_penalty=penalty)
        for who in ("adapter", "zero-shot"):
            start = time.time()
            if who == "adapter":
                texts = generate(model, data.tokenizer, prompts, settings, precision=precision)
            else:
                with model.disable_adapter():
                    texts = generate(model, data.tokenizer, prompts, settings,
                                     precision=precision)
            row = summary(texts, refs, data.tokenizer, settings.max_new_tokens)
            rows[f"{who} | {name}"] = {**row, "seconds": round(time.time() - start),
                                       "texts": texts}
            print(f"{who:>9} {name:<24} " + " ".join(f"{k} {v}" for k, v in row.items()),
                  flush=True)
    best = max((n for n, (_, _, ok) in CANDIDATES.items() if ok),
               key=lambda n: rows[f"adapter | {n}"]["rougeL"])
    return {"precision": precision, "examples": len(prompts), "rows": rows, "chosen": best}


def plain_client(folder: Path, documents: list[str], cfg: Any) -> list[str]:
    """What the export's model card does, without peftune: one document at a time."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    generation = GenerationConfig.from_pretrained(folder)
    n = cfg.data.max_source_tokens
    out = []
    for document in documents:
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        if len(ids) > n:
            document = tokenizer.decode(ids[:n])
        messages = [{"role": "user", "content": f"{cfg.data.instruction}\n\n{document}"}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            new = model.generate(**inputs, generation_config=generation)
        out.append(tokenizer.decode(new[0, inputs["input_ids"].shape[1]:],
                                    skip_special_tokens=True).strip())
    return out


def agreement(cfg: Any, adapter: Path, model: Any, data: Any, work: Path) -> dict[str, Any]:
    ds = data.splits["test"]
    refs = ds["summary"]
    rows = {}
    for precision, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
        start = time.time()
        ours = generate(model, data.tokenizer, prompts_of(ds), cfg.eval, precision=precision)
        folder = export.export(adapter, work / f"merged-{dtype}", fmt="merged",
                               dtype=dtype).path
        theirs = plain_client(folder, ds["document"], cfg)
        same = sum(a == b for a, b in zip(ours, theirs, strict=True))
        rows[precision] = {
            "identical": same, "examples": len(ours),
            "rougeL_peftune": rouge(ours, refs)["rougeL"],
            "rougeL_merged": rouge(theirs, refs)["rougeL"],
            "seconds": round(time.time() - start), "peftune": ours, "merged": theirs}
        r = rows[precision]
        print(f"{precision}: {same}/{len(ours)} identical, ROUGE-L peftune "
              f"{r['rougeL_peftune']:.2f} merged {r['rougeL_merged']:.2f}", flush=True)
    return rows


def tables(result: dict[str, Any]) -> str:
    dec = result["decoding"]
    lines = [f"validation split, {dec['examples']} papers, generated in {dec['precision']}",
             "", "| model | setting | ROUGE-1 | ROUGE-2 | ROUGE-L | mean words | hit "
             "max_new_tokens |", "|---|---|---|---|---|---|---|"]
    for key, r in dec["rows"].items():
        who, name = key.split(" | ")
        lines.append(f"| {who} | {name} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | "
                     f"{r['rougeL']:.2f} | {r['mean_words']} | {100 * r['hit_limit']:.0f}% |")
    lines += ["", f"chosen (best adapter ROUGE-L among reproducible settings): "
              f"{dec['chosen']}", "", "| test split | texts identical | ROUGE-L peftune | "
              "ROUGE-L merged (plain transformers) | difference |", "|---|---|---|---|---|"]
    for precision, r in result["agreement"].items():
        lines.append(f"| {precision} | {r['identical']}/{r['examples']} | "
                     f"{r['rougeL_peftune']:.2f} | {r['rougeL_merged']:.2f} | "
                     f"{r['rougeL_merged'] - r['rougeL_peftune']:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/peftune-decoding"))
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = config(args.work)
    start = time.time()
    adapter = trained(cfg)
    data = assembly.prepare(cfg, roles=("validation", "test"))
    base = devices.place(assembly.load_base(cfg, data.tokenizer))
    model = models.load_adapter(base, adapter)
    result: dict[str, Any] = {"decoding": decoding(cfg, model, data)}
    ngram, penalty, _ = CANDIDATES[result["decoding"]["chosen"]]
    cfg = replace(cfg, eval=replace(cfg.eval, no_repeat_ngram_size=ngram,
                                    repetition_penalty=penalty))
    # the exports read the adapter's saved settings: give it the chosen decoding
    save_yaml(cfg, adapter / "peftune.yaml")
    result["agreement"] = agreement(cfg, adapter, model, data, args.work)
    result["minutes"] = round((time.time() - start) / 60, 1)
    text = tables(result)
    (args.work / "decoding.json").write_text(json.dumps({**result, "tables": text}, indent=1))
    print("\n" + text + f"\n\n{result['minutes']} min in all")


if __name__ == "__main__":
    main()
