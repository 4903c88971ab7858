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
sys.path.insert(0, str(ROOT / "benchmarks"))
WORK = Path("/tmp/peftune-titles")
RUN = Path("/tmp/peftune-titles-run")


def main() -> None:
    from search_quality import write_task  # the same titles task as the 3-task benchmark

    source = write_task("titles", WORK)
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
