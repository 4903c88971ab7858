"""The demo's search settings on a second small task: a paper's title from its abstract.

    python benchmarks/second_dataset.py   # ~10 min on 2 CPU cores

Extreme summarization (one line, like XSum's) of the same 250 ACL papers, a task the demo's
settings were not chosen on: writes it as local JSONL under /tmp, then runs `peftune search`
with configs/aclsum-smollm2-search.yaml unchanged but for the data source and output folder,
and prints the winner against zero-shot and the default configuration on test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path("/tmp/peftune-titles")
RUN = Path("/tmp/peftune-titles-run")


def write_titles() -> Path:
    from peftune.data import _detok

    root = Path(__import__("aclsum").__file__).parent / "dataset"
    DATA.mkdir(parents=True, exist_ok=True)
    for name, role in (("train", "train"), ("val", "validation"), ("test", "test")):
        rows = [json.loads(line) for line in
                (root / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        (DATA / f"{role}.jsonl").write_text("".join(
            json.dumps({"id": r["id"], "summary": r["title"].strip(),
                        "document": " ".join(map(_detok, r["sentences"]["abstract"]))}) + "\n"
            for r in rows), encoding="utf-8")
    return DATA


def main() -> None:
    source = write_titles()
    subprocess.run([sys.executable, "-m", "peftune", "search", "--config",
                    str(ROOT / "configs" / "aclsum-smollm2-search.yaml"),
                    "--data.source", str(source), "--output_dir", str(RUN)], check=True)
    metrics = json.loads((RUN / "final" / "metrics.json").read_text())
    for name, row in metrics["comparison"]["test"].items():
        print(f"{name}: test ROUGE-L {row['rougeL']:.2f}")
    for key, diff in metrics["comparison"].items():
        if key.startswith("best - "):
            d = diff["rougeL"]
            print(f"{key}: {d['difference']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]")


if __name__ == "__main__":
    main()
