"""Faults injected on purpose: kills, signals, partial checkpoints, divergence, unsafe code."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftune import config_from_dict
from peftune.errors import Diverged
from peftune.train import COMPLETE_MARKER, last_complete_checkpoint, run

SRC = Path(__file__).resolve().parent.parent / "src"


def _weights(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def _train_cmd(cfg, tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return [sys.executable, "-m", "peftune", "-q", "train", "--config", str(path)], env


def _wait_for_checkpoint(folder, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (folder / f"checkpoint-{step}" / COMPLETE_MARKER).is_file():
            return
        time.sleep(0.05)
    raise AssertionError(f"checkpoint-{step} never completed (exit {proc.poll()})")


@pytest.fixture
def resume_cfg(tiny_cfg):
    tiny_cfg["train"].update(max_steps=8, save_steps=1, save_total_limit=3)
    tiny_cfg["lora"] = {"dropout": 0.1}
    return tiny_cfg


@pytest.mark.parametrize("micro_batch", [4, 2], ids=["accumulation-1", "accumulation-2"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(resume_cfg, tmp_path, micro_batch):
    resume_cfg["train"]["micro_batch_size"] = micro_batch
    straight = dict(resume_cfg, output_dir=str(tmp_path / "straight"))
    run(config_from_dict(straight))
    cmd, env = _train_cmd(resume_cfg, tmp_path, "killed")
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(tmp_path / "run" / "checkpoints", 4, proc)
    proc.send_signal(signal.SIGKILL)  # somewhere in step 5 or while saving it
    proc.wait()
    assert not (tmp_path / "run" / "adapter").exists()
    subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL)
    _assert_same(_weights(tmp_path / "run"), _weights(tmp_path / "straight"))


def test_a_checkpoint_cut_short_is_never_resumed_from(resume_cfg, tmp_path):
    resume_cfg["train"]["save_total_limit"] = 4
    run(config_from_dict(resume_cfg))
    run_dir, folder = tmp_path / "run", tmp_path / "run" / "checkpoints"
    straight = _weights(run_dir)
    # the run died while saving step 6: no step 7/8, no adapter, step 6 half-written
    shutil.rmtree(run_dir / "adapter")
    for step in (7, 8):
        shutil.rmtree(folder / f"checkpoint-{step}")
    (folder / "checkpoint-6" / COMPLETE_MARKER).unlink()
    weights = folder / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert last_complete_checkpoint(folder).name == "checkpoint-5"
    run(config_from_dict(resume_cfg))
    _assert_same(_weights(run_dir), straight)


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(resume_cfg, tmp_path):
    resume_cfg["train"].update(save_steps=100, max_steps=400)
    cmd, env = _train_cmd(resume_cfg, tmp_path, "term")
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    log_dir = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while not list(log_dir.glob("*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)  # the Trainer made its output folder: training has started
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "rerun the same command to resume" in err
    saved = last_complete_checkpoint(log_dir)
    assert saved is not None and 0 < int(saved.name.split("-")[1]) < 400


def test_divergence_stops_without_saving_an_adapter(tiny_cfg, tmp_path):
    tiny_cfg["train"].update(learning_rate=1e6, max_grad_norm=1e9, max_steps=8)
    with pytest.raises(Diverged, match="diverged"):
        run(config_from_dict(tiny_cfg))
    assert not (tmp_path / "run" / "adapter").exists()


def test_no_pickle_loading_in_the_source_tree():
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if re.search(r"^\s*import pickle|^\s*from pickle|cPickle", text, re.M):
            offenders.append(f"{path.name}: pickle")
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
        if re.search(r"trust_remote_code\s*=\s*True", text):
            offenders.append(f"{path.name}: trust_remote_code=True")
    assert offenders == []


class _OutOfMemoryAbove:
    """Raises the CPU allocator's out-of-memory error for micro-batches above a size."""

    def __init__(self, limit):
        self.limit, self.sizes = limit, []

    def __call__(self, module, args, kwargs):
        size = kwargs["input_ids"].shape[0] if "input_ids" in kwargs else args[0].shape[0]
        self.sizes.append(size)
        if size > self.limit:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 123456789 bytes.")


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_batch(tiny_cfg, caplog):
    from peftune import models
    from peftune.train import fit, prepare, wrap

    tiny_cfg["train"].update(batch_size=4, micro_batch_size=4, max_steps=2)
    cfg = config_from_dict(tiny_cfg)
    base, tok = models.load_base(cfg.model)
    data = prepare(cfg, tok, seq2seq=False)
    model = wrap(base, cfg)
    oom = _OutOfMemoryAbove(2)
    base.model.register_forward_pre_hook(oom, with_kwargs=True)
    with caplog.at_level("WARNING", logger="peftune"):
        metrics = fit(cfg, model, data, output_dir=Path(cfg.output_dir) / "ckpt")
    assert "retrying with 2 (gradient accumulation keeps the batch size at 4)" in caplog.text
    assert metrics["train_loss"] > 0 and 4 in oom.sizes and oom.sizes[-1] <= 2


def test_disk_full_is_one_clear_error_and_keeps_the_last_checkpoint(tiny_cfg, tmp_path,
                                                                     monkeypatch):
    import errno

    import peftune.train as train_module
    from peftune.errors import PeftuneError

    tiny_cfg["train"].update(max_steps=4, save_steps=1)
    original, calls = train_module.PeftuneTrainer._save_checkpoint, []

    def save_until_full(self, model, trial):
        calls.append(self.state.global_step)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, model, trial)

    monkeypatch.setattr(train_module.PeftuneTrainer, "_save_checkpoint", save_until_full)
    with pytest.raises(PeftuneError, match=r"disk full .* \(checkpoint-2\) is kept"):
        run(config_from_dict(tiny_cfg))
    assert last_complete_checkpoint(tmp_path / "run" / "checkpoints").name == "checkpoint-2"


@pytest.mark.parametrize("full_at,target,kept", [("checkpoint-2", "checkpoints", "checkpoint-1"),
                                                 ("adapter", "adapter", "checkpoint-3")])
def test_disk_full_in_the_tokenizer_save_is_one_clear_error(tiny_cfg, tmp_path, monkeypatch,
                                                            full_at, target, kept):
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    from peftune.errors import PeftuneError

    tiny_cfg["train"].update(max_steps=3, save_steps=1)
    original = TokenizersBackend._save_pretrained

    def save(self, save_directory, *args, **kwargs):
        if Path(save_directory).name == full_at:
            # what the tokenizers library raises: a plain Exception, no errno
            raise Exception("No space left on device (os error 28)")
        return original(self, save_directory, *args, **kwargs)

    monkeypatch.setattr(TokenizersBackend, "_save_pretrained", save)
    with pytest.raises(PeftuneError, match=rf"disk full while writing to \S*run/{target}; "
                                           rf"the last complete checkpoint \({kept}\) is kept"):
        run(config_from_dict(tiny_cfg))
