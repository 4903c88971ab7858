"""Repetition control over the generated tokens only, against none and the standard penalty.

    python benchmarks/repetition.py                # no network; see BENCHMARKS.md for time
    python benchmarks/repetition.py --docs 12 --steps 8 --work DIR   # what BENCHMARKS.md ran

1. Trains one LoRA adapter quickly: the demo's default configuration
   (configs/aclsum-smollm2-search.yaml as it is: r=8 on q,v, lr 1e-3, one epoch on the 100
   training papers). A finished adapter in the work folder is reused.
2. Generates for the first ``--docs`` ACLSum validation papers (never test) with the
   embedded SmolLM2-135M-Instruct, the adapter and the zero-shot base, in the run's
   precision, under each rule: none; ``eval.generated_no_repeat_ngram_size`` 3 and 4 (no
   n-gram of the output repeats, the document's may); ``repetition_penalty`` 1.1 and 1.2
   (transformers applies it to prompt and output tokens alike).
3. Scores every text against each ACLSum reference: the demo's summary (challenge, approach
   and outcome together) and each field alone. The prompt is the same abstract for all
   four, so one generation serves every field. Reports ROUGE-L and the loop rate
   (:func:`peftune.metrics.loops`: some 4 words recur 3 times or more).

Prints a markdown table and writes it, with every text, to ``WORK/repetition-MODELS.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from peftune import assembly, devices, models
from peftune import train as training
from peftune.config import config_from_dict, load_yaml
from peftune.generation import generate, prompts_of
from peftune.metrics import loop_rate, rouge

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "aclsum-smollm2-search.yaml"
FIELDS = ("challenge", "approach", "outcome")
# name -> (generated_no_repeat_ngram_size, repetition_penalty)
RULES = {
    "none": (0, 1.0),
    "generated-only no-repeat 3": (3, 1.0),
    "generated-only no-repeat 4": (4, 1.0),
    "repetition_penalty 1.1": (0, 1.1),
    "repetition_penalty 1.2": (0, 1.2),
}


def config(work: Path, steps: int) -> Any:
    settings = load_yaml(CONFIG)
    settings.pop("search", None)
    settings["output_dir"] = str(work / "run")
    settings["train"] = {**settings.get("train", {}), "save_checkpoints": False,
                         "resume": False, "max_steps": steps}
    return config_from_dict(settings)


def references(ids: list[str]) -> dict[str, list[str]]:
    """Each ACLSum reference of the validation papers ``ids``: the demo's and each field."""
    root = Path(__import__("aclsum").__file__).parent / "dataset"
    papers = {p["id"]: p for p in map(json.loads, (root / "val.jsonl").read_text(
        encoding="utf-8").splitlines())}
    refs = {"summary": [" ".join(papers[i]["summary"][f] for f in FIELDS) for i in ids]}
    refs.update((f, [papers[i]["summary"][f] for i in ids]) for f in FIELDS)
    return refs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/peftune-repetition"))
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--steps", type=int, default=-1,
                        help="optimizer steps of the adapter (-1: the config's one epoch)")
    parser.add_argument("--models", default="adapter,zero-shot",
                        help="which rows: adapter, zero-shot or both (comma-separated)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    who_runs = args.models.split(",")
    cfg = config(args.work, args.steps)
    adapter = Path(cfg.output_dir) / "adapter"
    data = assembly.prepare(cfg)
    if "adapter" in who_runs and not (adapter / "adapter_model.safetensors").is_file():
        start = time.time()
        training.run(cfg, data=data)
        print(f"trained in {time.time() - start:.0f}s", flush=True)
    from peft import PeftModel

    base = devices.place(assembly.load_base(cfg, data.tokenizer))
    model = PeftModel.from_pretrained(base, str(adapter)) if "adapter" in who_runs else base
    val = data.splits["validation"].select(range(min(args.docs, len(data.splits["validation"]))))
    prompts, refs = prompts_of(val), references(list(val["id"]))
    precision = models.precision(cfg)
    rows: dict[str, Any] = {}
    for name, (ngram, penalty) in RULES.items():
        settings = replace(cfg.eval, generated_no_repeat_ngram_size=ngram,
                           repetition_penalty=penalty)
        for who in who_runs:
            start = time.time()
            if who == "adapter" or model is base:
                texts = generate(model, data.tokenizer, prompts, settings, precision=precision)
            else:
                with model.disable_adapter():
                    texts = generate(model, data.tokenizer, prompts, settings,
                                     precision=precision)
            row = {task: rouge(texts, ref)["rougeL"] for task, ref in refs.items()}
            row.update(loop_rate=loop_rate(texts), seconds=round(time.time() - start))
            rows[f"{who} | {name}"] = {**row, "texts": texts}
            print(f"{who:>9} {name:<28} " + " ".join(f"{k} {v}" for k, v in row.items()),
                  flush=True)
    table = markdown(rows, len(prompts))
    print("\n" + table)
    (args.work / f"repetition-{'+'.join(who_runs)}.json").write_text(json.dumps(
        {"precision": precision, "documents": len(prompts), "rows": rows, "table": table},
        indent=1))


def markdown(rows: dict[str, Any], docs: int) -> str:
    head = ("| model | rule | ROUGE-L demo summary | challenge | approach | outcome | "
            "looping | seconds |\n|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {key.split(' | ')[0]} | {key.split(' | ')[1]} | {r['summary']:.2f} | "
        f"{r['challenge']:.2f} | {r['approach']:.2f} | {r['outcome']:.2f} | "
        f"{r['loop_rate']:.0%} | {r['seconds']} |\n" for key, r in rows.items())
    return head + body + f"\n{docs} ACLSum validation papers; ROUGE-L F1 x 100.\n"


if __name__ == "__main__":
    main()
