"""One assembly path: every command builds tokenizer, prompt, data and base the same way,
k-bit search trials get their quantized base, and a run folder never enables remote code."""

import json
import shutil

import optuna
import pytest
import torch
import yaml

from peftune import config_from_dict
from peftune import search as searching
from peftune import train as training
from peftune.assembly import load_base
from peftune.cli import main
from peftune.train import run

bnb = pytest.importorskip("bitsandbytes")


def _params(method, **over):
    params = {"method": method, "batch_size": 4, "learning_rate": 1e-3, "epochs": 1.0,
              "warmup_ratio": 0.0, "weight_decay": 0.0, f"{method}.r": 4,
              f"{method}.alpha_over_r": 2, f"{method}.dropout": 0.0,
              f"{method}.targets": "default"}
    return {**params, **over}


def test_qlora_trials_train_on_a_4bit_base_and_leave_the_plain_base_alone(tiny_cfg,
                                                                          monkeypatch):
    tiny_cfg["search"] = {"n_trials": 2, "methods": ["qlora", "lora"], "eval_examples": 2,
                          "pruner": "none"}
    tiny_cfg["qlora"] = {"gradient_checkpointing": True}
    cfg = config_from_dict(tiny_cfg)
    seen = []
    real_fit = training.fit

    def spy(trial_cfg, model, *args, **kwargs):
        q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
        base = model.get_base_model()
        seen.append((trial_cfg.method, type(q_proj.base_layer),
                     base.is_gradient_checkpointing, id(base)))
        return real_fit(trial_cfg, model, *args, **kwargs)

    monkeypatch.setattr(training, "fit", spy)
    bases, data = searching.load_for_search(cfg)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(_params("qlora"))
    study.enqueue_trial(_params("lora"))
    study.optimize(searching.Objective(cfg, bases, data), n_trials=2)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    (q_method, q_layer, q_ckpt, q_id), (l_method, l_layer, l_ckpt, l_id) = seen
    assert q_method == "qlora" and q_layer is bnb.nn.Linear4bit and q_ckpt
    assert l_method == "lora" and l_layer is torch.nn.Linear and not l_ckpt
    assert q_id != l_id
    plain = bases.get(config_from_dict(tiny_cfg))
    fresh = load_base(config_from_dict(tiny_cfg), data.tokenizer)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(plain.state_dict()[name], tensor), name
    assert all(p.dtype == torch.float32 for p in plain.parameters())


# ---------------------------------------------------------------- remote code

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.fixture
def hostile_adapter(tiny_cfg, tiny_model_dir, tmp_path):
    """A trained adapter whose peftune.yaml points at a model folder with its own tokenizer
    code and says trust_remote_code: true."""
    model_dir = tmp_path / "evil-model"
    shutil.copytree(tiny_model_dir, model_dir)
    marker = tmp_path / "code-ran"
    (model_dir / "evil.py").write_text(EVIL.format(marker=str(marker)))
    meta = json.loads((model_dir / "tokenizer_config.json").read_text())
    meta["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(meta))
    result = run(config_from_dict(tiny_cfg))
    settings = yaml.safe_load((result.adapter_dir / "peftune.yaml").read_text())
    settings["model"].update(name=str(model_dir), trust_remote_code=True)
    (result.adapter_dir / "peftune.yaml").write_text(yaml.safe_dump(settings))
    return result.adapter_dir, marker


@pytest.mark.parametrize("command", [
    ["summarize", "{adapter}", "alpha beta gamma ."],
    ["evaluate", "--adapter", "{adapter}"],
    ["export", "{adapter}", "--format", "merged", "--out", "{tmp}/merged"],
])
def test_an_adapter_folder_cannot_turn_on_remote_code(hostile_adapter, tmp_path, command):
    adapter, marker = hostile_adapter
    argv = [a.format(adapter=adapter, tmp=tmp_path) for a in command]
    main(["-q", *argv])
    assert not marker.exists(), "the folder's own code ran"


def test_the_command_line_can_turn_on_remote_code(hostile_adapter):
    adapter, marker = hostile_adapter
    main(["-q", "summarize", str(adapter), "alpha beta .", "--model.trust_remote_code", "true"])
    assert marker.read_text() == "ran", "the hostile folder above would not have been caught"
