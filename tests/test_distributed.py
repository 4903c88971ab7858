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
from transformers import TrainingArguments

import peftune
from peftune import config_from_dict, plan
from peftune.config import load_yaml
from peftune.train import run, training_args

ROOT = Path(__file__).resolve().parent.parent


def _launch(config: Path, *args: str, script: Path | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``peftune ARGS`` (or of ``script ARGS``)."""
    src = str(Path(peftune.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    target = [str(script)] if script else ["-m", "peftune"]
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(config), *target, *args], env=env, capture_output=True,
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


def test_summary_head_runs_inside_the_ddp_wrapped_model_with_the_same_losses(tiny_cfg,
                                                                            tmp_path):
    tiny_cfg["lora"] = {"dropout": 0.0}
    tiny_cfg["train"].update(max_steps=3, batch_size=4, micro_batch_size=2,
                             eval_each_epoch=False, save_checkpoints=False)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg))
    proc = _launch(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml", str(path),
                   str(tmp_path), script=ROOT / "tests" / "ddp_summary_head.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        summary, full = result["summary"], result["full"]
        assert summary["wrapped_in"] == full["wrapped_in"] == "DistributedDataParallel"
        assert len(summary["losses"]) == 3
        assert summary["losses"] == pytest.approx(full["losses"], rel=1e-5)
        # the LM head saw exactly the labelled positions, not every position of the batch
        assert summary["head_rows"] == summary["label_rows"]
        assert sum(summary["head_rows"]) < sum(summary["all_rows"]) / 2
        assert full["head_rows"] == full["all_rows"]


SHIPPED_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# 1, 2, 4 and 8 processes, and whatever the shipped accelerate configs launch
PROCESS_COUNTS = sorted({1, 2, 4, 8} | {
    yaml.safe_load(p.read_text())["num_processes"]
    for p in (ROOT / "configs" / "accelerate").glob("*.yaml")})


def _no_process_group(self):
    self._n_gpu = 0
    return torch.device("cpu")


@pytest.mark.parametrize("processes", PROCESS_COUNTS)
@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_splits_its_batch_over_the_processes(config, processes,
                                                                  monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", str(processes))  # what accelerate launch sets
    # one test process cannot join a group of N: the Trainer's device setup is skipped
    monkeypatch.setattr(TrainingArguments, "_setup_devices", property(_no_process_group))
    cfg = config_from_dict({**load_yaml(config), "plan": {"use_data": False}})
    if cfg.train.micro_batch_size == "auto":  # what it is on this machine
        cfg = plan.with_micro_batch(cfg, plan.make(cfg))
    args = training_args(cfg, output_dir=tmp_path, has_eval=True)
    micro, steps = args.per_device_train_batch_size, args.gradient_accumulation_steps
    assert micro * steps * processes == cfg.train.batch_size
    assert cfg.train.micro_batch_size % micro == 0  # never more than configured


def test_a_batch_that_cannot_be_split_over_the_processes_names_both(tiny_cfg, monkeypatch,
                                                                    tmp_path):
    from peftune.errors import ConfigError

    tiny_cfg["train"].update(batch_size=6, micro_batch_size=2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"train.batch_size \(6\).*processes \(4\)"):
        training_args(config_from_dict(tiny_cfg), output_dir=tmp_path, has_eval=False)


def test_out_of_memory_is_not_retried_when_other_processes_train_along(tiny_cfg, monkeypatch):
    import peftune.train as train_module
    from peftune import models
    from peftune.assembly import prepare

    cfg = config_from_dict(tiny_cfg)
    tok = models.load_tokenizer(cfg.model)
    base = models.load_model(models.resolve(cfg.model), pad_token_id=tok.pad_token_id)
    data, model = prepare(cfg, tok), train_module.wrap(base, cfg)
    calls = []

    def out_of_memory(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "_fit_once", out_of_memory)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="out of memory"):
        train_module.fit(cfg, model, data, output_dir=Path(cfg.output_dir))
    assert len(calls) == 1  # a lone retry would leave the other rank waiting in a collective
    monkeypatch.setenv("WORLD_SIZE", "1")
    calls.clear()
    with pytest.raises(RuntimeError, match="out of memory"):
        train_module.fit(cfg, model, data, output_dir=Path(cfg.output_dir))
    assert len(calls) == 2  # micro-batch 2, then 1


def test_all_finite_gives_every_rank_the_same_answer(tmp_path):
    """Under FSDP each rank checks only its shard; a rank that skipped the save while the
    others entered its collectives would hang them, so one non-finite shard is everyone's."""
    import torch.multiprocessing as mp

    from peftune.checkpoints import all_finite
    from tests.dist_all_finite import all_finite_on_rank

    address = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(all_finite_on_rank, args=(2, address, str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["False", "False"]
    assert all_finite(torch.nn.Linear(2, 2))  # no process group: this process's weights
