"""Data-parallel training through ``accelerate launch``: 2 CPU processes on gloo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import peftune
from peftune import config_from_dict
from peftune.train import run

ROOT = Path(__file__).resolve().parent.parent


def _launch(config: Path, *args: str) -> subprocess.CompletedProcess:
    src = str(Path(peftune.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(config), "-m", "peftune", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_two_gloo_processes_match_one_process_with_the_same_effective_batch(tiny_cfg, tmp_path):
    tiny_cfg["lora"] = {"dropout": 0.0}  # dropout masks differ per process
    tiny_cfg["train"].update(max_steps=3, batch_size=4, micro_batch_size=2, eval_each_epoch=False)
    single = run(config_from_dict(tiny_cfg))

    tiny_cfg["output_dir"] = str(tmp_path / "ddp")
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg))
    proc = _launch(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml", "train", "--config",
                   str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter:") == 1  # one summary, from rank 0

    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["train"]
    assert ddp["train_loss"] == pytest.approx(single.metrics["train_loss"], rel=1e-4)
    expected = load_file(str(single.adapter_dir / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4)
