"""Same seed, same settings: do the texts change with the CPU threads, or between two runs?

    python benchmarks/reproducibility.py --threads 1 --out /tmp/t1.json
    python benchmarks/reproducibility.py --threads 1 --out /tmp/t1b.json --against /tmp/t1.json
    python benchmarks/reproducibility.py --threads 2 --out /tmp/t2.json --against /tmp/t1.json

Generates zero-shot summaries of the first ``--docs`` ACLSum validation papers with the
embedded SmolLM2-135M-Instruct and the demo's settings (configs/aclsum-smollm2-search.yaml,
its precision resolved on this machine) in ``--threads`` CPU threads, writes the texts and
their ROUGE-L to ``--out``, and with ``--against`` prints how many texts are identical to an
earlier run's and after how many words the others part.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from peftune import assembly, devices, models
from peftune.config import config_from_dict, load_yaml
from peftune.generation import generate, prompts_of
from peftune.metrics import loop_rate, rouge

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "aclsum-smollm2-search.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--against", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = load_yaml(CONFIG)
    settings.pop("search", None)
    cfg = config_from_dict(settings)
    data = assembly.prepare(cfg, roles=("validation",))
    val = data.splits["validation"].select(range(args.docs))
    base = devices.place(assembly.load_base(cfg, data.tokenizer))
    start = time.time()
    texts = generate(base, data.tokenizer, prompts_of(val), cfg.eval,
                     precision=models.precision(cfg), progress=False)
    result = {**devices.numerics(), "rougeL": rouge(texts, val["summary"])["rougeL"],
              "loop_rate": loop_rate(texts), "seconds": round(time.time() - start),
              "texts": texts}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{args.threads} threads, {result['precision']}: ROUGE-L {result['rougeL']:.2f}")
    if args.against:
        earlier = json.loads(args.against.read_text())
        parted = [_parted(a, b) for a, b in zip(texts, earlier["texts"], strict=True) if a != b]
        print(f"against {args.against} ({earlier['threads']} threads, ROUGE-L "
              f"{earlier['rougeL']:.2f}): {len(texts) - len(parted)} of {len(texts)} texts "
              f"identical; the others part after {parted} words")


def _parted(a: str, b: str) -> int:
    pairs = list(zip(a.split(), b.split(), strict=False))
    return next((i for i, (x, y) in enumerate(pairs) if x != y), len(pairs))


if __name__ == "__main__":
    main()
