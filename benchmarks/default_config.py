"""Which LoRA configuration the demo should start from: candidates against zero-shot, 3 seeds.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/default_config.py   # ~75 min on 2 busy CPU cores

The demo's data settings (configs/aclsum-smollm2-search.yaml: the 100 training papers,
320 source tokens, 96 new tokens), every candidate trained with `peftune train` for seeds
1, 2 and 3 and scored with `peftune evaluate` on all test papers; zero-shot once (greedy,
so deterministic). Each candidate's test ROUGE-L minus zero-shot's comes with its paired
bootstrap 95% interval over the same papers. Resumable: a run whose adapter or predictions
exist under WORK is not redone; `--candidates 1 2 --seeds 1` runs part of the grid. Prints
the table of every finished run as Markdown and writes it to WORK/table.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from peftune.evaluate import compare_predictions

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "aclsum-smollm2-search.yaml"
WORK = Path(os.environ.get("PEFTUNE_DEFAULTS_WORK", "/tmp/defaults-work"))
SEEDS = (1, 2, 3)
TEST_PAPERS = 100  # ACLSum's test split holds 100 papers: all of them
COMMON = ["--data.max_eval_examples", str(TEST_PAPERS), "--train.batch_size", "8",
          "--train.epochs", "1", "--train.save_checkpoints", "false",
          "--train.eval_each_epoch", "false"]


def lora(lr: float, r: int, alpha: int, targets: str) -> list[str]:
    return ["--method", "lora", "--train.learning_rate", str(lr), "--lora.r", str(r),
            "--lora.alpha", str(alpha), "--lora.dropout", "0.1",
            "--lora.target_modules", targets]


# the demo's default until this measurement, then the published guidance (LoRA on all linear
# layers at ~10x a full fine-tuning rate) and the demo search's winners (attention, lr ~2e-3)
CANDIDATES = {
    "r=8 alpha 32, q,v, lr 1e-3 (old default)": lora(1e-3, 8, 32, ""),
    "r=16 alpha 32, all-linear, lr 1e-3": lora(1e-3, 16, 32, "all-linear"),
    "r=16 alpha 32, attention, lr 2e-3": lora(2e-3, 16, 32, "attention"),
}


def peftune(*args: str) -> None:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "peftune", *args, "--config", str(CONFIG)],
                   check=True)
    with (WORK / "wall.log").open("a") as log:  # how long each run took, for the record
        log.write(f"{time.perf_counter() - start:.0f} s: peftune {' '.join(args)}\n")


def zero_shot() -> Path:
    run = WORK / "zero-shot"
    if not (run / "predictions.jsonl").is_file():
        peftune("evaluate", "--output_dir", str(run), *COMMON)
    return run / "predictions.jsonl"


def candidate(index: int, flags: list[str], seed: int) -> Path:
    run = WORK / f"candidate{index}-seed{seed}"
    args = ["--output_dir", str(run), "--seed", str(seed), *COMMON, *flags]
    if not (run / "adapter" / "adapter_config.json").is_file():
        peftune("train", *args)
    if not (run / "predictions.jsonl").is_file():
        peftune("evaluate", *args)
    return run / "predictions.jsonl"


def table() -> str:
    """Every finished run under WORK against zero-shot, seed by seed."""
    baseline, rows = WORK / "zero-shot" / "predictions.jsonl", []
    for seed in SEEDS:
        for i, name in enumerate(CANDIDATES):
            preds = WORK / f"candidate{i}-seed{seed}" / "predictions.jsonl"
            if not preds.is_file():
                continue
            got = compare_predictions(preds, {"zero-shot": baseline})
            d = got["best - zero-shot"]["rougeL"]
            rows.append(f"| {seed} | {name} | {got['test']['best']['rougeL']:.2f} | "
                        f"{d['difference']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] |")
    zero = compare_predictions(baseline, {})
    return "\n".join([
        "| seed | candidate | test ROUGE-L | - zero-shot, paired bootstrap 95% interval |",
        "|---|---|---|---|", *rows,
        f"\nzero-shot: {zero['test']['best']['rougeL']:.2f} test ROUGE-L on "
        f"{zero['documents']} papers"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, nargs="+", default=range(len(CANDIDATES)),
                        help="indices into CANDIDATES to run (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    zero_shot()
    flags = list(CANDIDATES.values())
    for seed in args.seeds:
        for i in args.candidates:
            candidate(i, flags[i], seed)
    text = table()
    (WORK / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
