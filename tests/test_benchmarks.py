"""The prepared GPU benchmark runs end to end (on CPU, with a 2-layer model)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_benchmark_script_runs_its_whole_path_on_a_tiny_model(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny",
                          "--steps", "2", "--warmup", "1", "--micro-batch", "2",
                          "--max-source-tokens", "64"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| B lora |" in out.stdout and "| peftune lora |" in out.stdout
    results = json.loads((tmp_path / "gpu.json").read_text())["results"]
    assert all(r["tokens_per_s"] > 0 and r["mfu_pct"] > 0 for r in results.values())
