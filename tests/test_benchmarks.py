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


@pytest.mark.slow
def test_search_quality_script_scores_both_searches_on_the_same_test_documents(
        tmp_path, tiny_model_dir):
    """One task, one seed, 1 + 1 trials on the tiny model: the larger search tops up the
    demo-sized study (its first trial is kept), and the table compares both on one test set."""
    work = tmp_path / "work"
    extra = ["--model.name", str(tiny_model_dir), "--data.max_source_tokens", "24",
             "--data.max_train_examples", "8", "--train.max_steps", "1", "--train.batch_size",
             "4", "--train.precision", "fp32", "--eval.max_new_tokens", "4",
             "--search.train_examples", "8", "--search.eval_examples", "2"]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search_quality.py"),
                          "--tasks", "titles", "--seeds", "1", "--trials", "1",
                          "--work", str(work), "--extra", *extra],
                         env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    row = next(line for line in out.stdout.splitlines() if line.startswith("| titles | 1 |"))
    cells = row.split("|")
    assert len(cells) == 11 and row.count("[") == 3
    assert all(0 <= float(c) <= 100 for c in cells[3:7]), row  # ROUGE points
    import optuna

    runs = work / "titles" / "seed1"
    trials = {name: optuna.load_study(study_name="titles-seed1",
                                      storage=f"sqlite:///{runs / name / 'study.db'}").trials
              for name in ("x1", "x2")}
    assert [t.state.name for t in trials["x2"]] == ["COMPLETE", "COMPLETE"]
    assert trials["x2"][0].params == trials["x1"][0].params
    assert trials["x2"][0].value == trials["x1"][0].value
    preds = [json.loads(line)["id"] for line in
             (runs / "x2" / "final" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 48
