"""Faults injected on purpose: kills, signals, partial checkpoints, divergence, unsafe code."""

import dataclasses
import json
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
from transformers import TrainerCallback

from peftune import config_from_dict
from peftune.cli import main
from peftune.errors import Diverged, Interrupted
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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(resume_cfg, tmp_path, signum):
    resume_cfg["train"].update(save_steps=5, max_steps=400)
    cmd, env = _train_cmd(resume_cfg, tmp_path, "term")
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    log_dir = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 300
    # a complete checkpoint means training (and its signal handler) is running
    while last_complete_checkpoint(log_dir) is None and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.05)
    first = last_complete_checkpoint(log_dir)
    assert first is not None, "training never saved its first checkpoint"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "rerun the same command to resume" in err and f"signal {int(signum)} " in err
    saved = last_complete_checkpoint(log_dir)
    step = int(saved.name.split("-")[1])
    assert int(first.name.split("-")[1]) < step < 400
    assert f"at step {step}" in err


class _SignalsAt(TrainerCallback):
    """Sends this process ``signals`` as optimizer step ``step`` begins, as a terminal's
    Ctrl-C or a scheduler's SIGTERM would: at an exact step, so the test is deterministic."""

    def __init__(self, step, *signals):
        self.step, self.signals = step, signals

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            for signum in self.signals:
                signal.raise_signal(signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_resume_after_a_signal_equals_an_uninterrupted_run(resume_cfg, tmp_path, signum):
    before = signal.getsignal(signum)  # SIG_IGN for SIGINT where a shell runs us in background
    straight = run(config_from_dict(dict(resume_cfg, output_dir=str(tmp_path / "straight"))))
    cfg = config_from_dict(resume_cfg)
    with pytest.raises(Interrupted, match=f"stopped by signal {int(signum)} at step 4"):
        run(cfg, callbacks=[_SignalsAt(4, signum)])
    run_dir = tmp_path / "run"
    assert last_complete_checkpoint(run_dir / "checkpoints").name == "checkpoint-4"
    assert not (run_dir / "adapter").exists()
    resumed = run(cfg)
    expected = _weights(tmp_path / "straight")
    got = _weights(run_dir)
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), "resume is not exact"
    assert resumed.metrics["train_loss"] == pytest.approx(straight.metrics["train_loss"],
                                                          rel=1e-6)
    assert signal.getsignal(signum) == before, "the handler was not restored"


def test_a_second_ctrl_c_stops_at_once_without_saving(resume_cfg, tmp_path):
    cfg = config_from_dict(resume_cfg)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, callbacks=[_SignalsAt(4, signal.SIGINT, signal.SIGINT)])
    run_dir = tmp_path / "run"
    # the first Ctrl-C would have saved step 4 once it ended; the second did not wait for it
    assert last_complete_checkpoint(run_dir / "checkpoints").name == "checkpoint-3"
    assert not (run_dir / "adapter").exists()
    run(cfg)  # and the rerun resumes from step 3 to the end
    assert last_complete_checkpoint(run_dir / "checkpoints").name == "checkpoint-8"


def test_divergence_stops_without_saving_an_adapter(tiny_cfg, tmp_path):
    tiny_cfg["train"].update(learning_rate=1e6, max_grad_norm=1e9, max_steps=8)
    with pytest.raises(Diverged, match="diverged"):
        run(config_from_dict(tiny_cfg))
    assert not (tmp_path / "run" / "adapter").exists()


def _finite(checkpoint):
    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    return all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_weights_gone_nan_between_logs_never_displace_the_last_finite_checkpoint(tiny_cfg,
                                                                                 tmp_path):
    # a checkpoint every step, the loss checked every 4: the weights are NaN from step 5 on
    tiny_cfg["train"].update(learning_rate=1e8, max_grad_norm=1e9, max_steps=8, save_steps=1,
                             logging_steps=4, eval_each_epoch=False)
    with pytest.raises(Diverged, match="diverged") as err:
        run(config_from_dict(tiny_cfg))
    folder = tmp_path / "run" / "checkpoints"
    complete = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    assert complete and all(_finite(p) for p in complete)
    assert f"the last finite checkpoint, {last_complete_checkpoint(folder)}, is kept" in \
        str(err.value)


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
    from peftune.assembly import prepare
    from peftune.train import fit, wrap

    tiny_cfg["train"].update(batch_size=4, micro_batch_size=4, max_steps=3)
    tiny_cfg["lora"] = {"dropout": 0.0}  # the same network in both runs, whatever the RNG
    cfg = config_from_dict(tiny_cfg)
    tok = models.load_tokenizer(cfg.model)
    base = models.load_model(models.resolve(cfg.model), pad_token_id=tok.pad_token_id)
    data = prepare(cfg, tok)
    model = wrap(base, cfg)
    initial = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    oom = _OutOfMemoryAbove(2)
    base.model.register_forward_pre_hook(oom, with_kwargs=True)
    with caplog.at_level("WARNING", logger="peftune"):
        metrics = fit(cfg, model, data, output_dir=Path(cfg.output_dir) / "ckpt")
    assert "retrying with 2 (gradient accumulation keeps the batch size at 4)" in caplog.text
    assert 4 in oom.sizes and oom.sizes[-1] <= 2
    # the promise: the same training as a run asked for micro-batch 2 from the start
    halved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=2))
    other_base = models.load_model(models.resolve(cfg.model), pad_token_id=tok.pad_token_id)
    other = wrap(other_base, halved)
    with torch.no_grad():
        for name, param in other.named_parameters():
            if name in initial:
                param.copy_(initial[name])
    expected = fit(halved, other, data, output_dir=Path(cfg.output_dir) / "halved")
    assert metrics["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
    trained = {k: v for k, v in other.named_parameters() if k in initial}
    for name, param in model.named_parameters():
        if name in initial:
            assert not torch.equal(param, initial[name]) or "lora_B" not in name
            torch.testing.assert_close(param, trained[name], atol=1e-6, rtol=1e-5, msg=name)


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


def _crash_after(run_dir, step):
    """What a run killed right after checkpoint ``step`` leaves: no later checkpoint, no adapter."""
    shutil.rmtree(run_dir / "adapter")
    for later in (run_dir / "checkpoints").glob("checkpoint-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)


def test_resume_from_an_epochs_last_step_is_bitwise_exact(resume_cfg, tmp_path):
    # 12 rows, 4 per step: step 6 ends epoch 2, and its checkpoint precedes the epoch's eval
    straight = run(config_from_dict(resume_cfg))
    expected = {k: v.clone() for k, v in _weights(tmp_path / "run").items()}
    _crash_after(tmp_path / "run", 6)
    resumed = run(config_from_dict(resume_cfg))
    got = _weights(tmp_path / "run")
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert resumed.metrics["train_loss"] == pytest.approx(straight.metrics["train_loss"],
                                                          rel=1e-6)


def test_train_loss_after_a_resume_is_the_mean_over_the_whole_run(resume_cfg, tmp_path):
    # logged at step 5 only: the loss of steps 6 and 7 is in checkpoint-7 but in no log
    resume_cfg["train"]["logging_steps"] = 5
    straight = run(config_from_dict(resume_cfg)).metrics["train_loss"]
    _crash_after(tmp_path / "run", 7)
    run(config_from_dict(resume_cfg))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]
    assert saved["train_loss"] == pytest.approx(straight, rel=1e-6)


@pytest.mark.parametrize("flag,value,change", [
    ("train.learning_rate", "0.001", "train.learning_rate 0.01 -> 0.001"),
    ("seed", "7", "seed 42 -> 7"),
    ("data.max_train_examples", "8", "data.max_train_examples None -> 8"),
    ("lora.r", "4", "lora.r 8 -> 4"),
])
def test_a_rerun_with_other_settings_stops_and_leaves_the_run_as_it_was(tiny_cfg, tmp_path,
                                                                        capsys, flag, value,
                                                                        change):
    tiny_cfg["train"]["save_steps"] = 1
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg))
    assert main(["-q", "train", "--config", str(path)]) == 0
    run_dir = tmp_path / "run"
    files = [run_dir / "config.yaml", run_dir / "adapter" / "peftune.yaml",
             run_dir / "metrics.json", *sorted((run_dir / "checkpoints").rglob("*"))]
    before = {p: p.read_bytes() for p in files if p.is_file()}
    capsys.readouterr()
    assert main(["-q", "train", "--config", str(path), f"--{flag}", value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert change in err and "--train.resume false" in err
    assert {p: p.read_bytes() for p in files if p.is_file()} == before


def test_resume_false_starts_afresh_whatever_checkpoints_are_there(tiny_cfg, tmp_path):
    tiny_cfg["train"].update(max_steps=6, save_steps=1)
    run(config_from_dict(tiny_cfg))
    tiny_cfg["train"].update(max_steps=4, learning_rate=1e-3)
    fresh = run(config_from_dict(dict(tiny_cfg, output_dir=str(tmp_path / "fresh"))))
    tiny_cfg["train"]["resume"] = False
    run(config_from_dict(tiny_cfg))
    folder = tmp_path / "run" / "checkpoints"
    # the old run's checkpoint-5 and -6 would otherwise outrank the new ones in rotation
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    _assert_same(_weights(tmp_path / "run"), _weights(fresh.adapter_dir.parent))
    tiny_cfg["train"]["resume"] = True
    run(config_from_dict(tiny_cfg))  # the same settings again: resumes, no complaint


def _truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _zero_a_block(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    assert any(data[middle:middle + 64])
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name,damage", [
    ("optimizer.pt", _truncate),
    ("adapter_model.safetensors", _truncate),
    ("trainer_state.json", _truncate),
    ("rng_state.pth", _truncate),
    ("adapter_model.safetensors", _zero_a_block),
], ids=["optimizer", "adapter", "trainer-state", "rng-state", "adapter-zero-block"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tiny_cfg, tmp_path, caplog,
                                                                   name, damage):
    tiny_cfg["train"].update(max_steps=8, save_steps=1)  # save_total_limit keeps 7 and 8
    tiny_cfg["lora"] = {"dropout": 0.1}
    run(config_from_dict(tiny_cfg))
    run_dir = tmp_path / "run"
    straight = _weights(run_dir)
    shutil.rmtree(run_dir / "adapter")
    damaged = run_dir / "checkpoints" / "checkpoint-8"
    damage(damaged / name)
    with caplog.at_level("INFO", logger="peftune"):
        run(config_from_dict(tiny_cfg))
    assert f"resuming from {run_dir / 'checkpoints' / 'checkpoint-7'}" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(damaged) in w and f"damaged: {name}" in w for w in warnings)
    _assert_same(_weights(run_dir), straight)


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


def _hold_lock(run_dir, then):
    """A process that takes ``run_dir``'s run lock, prints ``held`` and runs ``then``."""
    code = ("import os, signal, sys, time\nfrom pathlib import Path\nfrom peftune import lock\n"
            f"with lock.hold(Path({str(run_dir)!r}), what='test'):\n"
            f"    print('held', flush=True)\n    {then}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("command", ["train", "search"])
def test_a_second_run_on_the_same_output_dir_refuses_naming_the_first(tiny_cfg, tmp_path,
                                                                      command):
    first = _hold_lock(tmp_path / "run", "time.sleep(120)")
    try:
        cmd, env = _train_cmd(tiny_cfg, tmp_path, "second")
        cmd[cmd.index("train")] = command
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    finally:
        first.kill()
        first.wait()
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"peftune: error: output_dir {tmp_path / 'run'} is in use by another peftune run "
        f"(pid {first.pid}); wait for it to finish or give this "
        f"{'training' if command == 'train' else 'search'} another --output_dir"]
    assert not (tmp_path / "run" / "adapter").exists() and not (
        tmp_path / "run" / "study.db").exists(), "the refused run wrote to the directory"


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    from peftune import lock

    killed = _hold_lock(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)")
    assert killed.wait() == -signal.SIGKILL
    assert (tmp_path / lock.LOCK_NAME).read_text().strip() == str(killed.pid)
    with lock.hold(tmp_path, what="test"):
        assert (tmp_path / lock.LOCK_NAME).read_text().strip() == str(os.getpid())
        # while held here, another process is refused
        code = (f"from pathlib import Path\nfrom peftune import lock\n"
                f"with lock.hold(Path({str(tmp_path)!r}), what='test'): pass\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        refused = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                 text=True)
        assert f"(pid {os.getpid()})" in refused.stderr.splitlines()[-1]
