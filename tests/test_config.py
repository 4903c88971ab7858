import math
from pathlib import Path

import pytest

from peftune import config_from_dict, load_yaml
from peftune.cli import main
from peftune.config import Config
from peftune.errors import ConfigError

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    cfg = config_from_dict(load_yaml(path))
    assert isinstance(cfg, Config)
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("path", [p for p in CONFIGS if "search" in p.name],
                         ids=lambda p: p.name)
def test_every_shipped_search_starts_from_its_own_configuration(path):
    from peftune.search import default_params

    cfg = config_from_dict(load_yaml(path))
    assert default_params(cfg)["learning_rate"] == cfg.train.learning_rate


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"aclsum-smollm2-lora.yaml", "xsum-llama7b-lora.yaml"} <= names


def test_method_options_round_trip():
    cfg = config_from_dict({"method": "lora", "lora": {"r": 16, "target_modules": "q_proj,k_proj"}})
    assert cfg.method_options.r == 16
    assert cfg.method_options.target_modules == ["q_proj", "k_proj"]
    assert config_from_dict(cfg.to_dict()).method_options.r == 16


@pytest.mark.parametrize("data,message", [
    ({"train": {"learning_rate": -1}}, "train.learning_rate must be > 0"),
    ({"train": {"lr": 1}}, "unknown config key 'train.lr'"),
    ({"bogus": 1}, "unknown config key 'bogus'"),
    ({"train": {"batch_size": "many"}}, "train.batch_size must be int"),
    ({"train": {"batch_size": 6, "micro_batch_size": 4}}, "multiple of"),
    ({"train": {"micro_batch_size": "most"}}, "train.micro_batch_size must be 'auto' or in"),
    ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size must be 'auto' or in"),
    ({"method": "magic"}, "unknown method 'magic'"),
    ({"lora": {"r": 1.5}}, "lora.r must be an integer"),
    ({"model": {"dtype": "int3"}}, "model.dtype must be one of"),
    ({"train": {"epochs": math.inf}}, r"train.epochs must be in \(0, 100000\], got inf"),
    ({"train": {"epochs": math.nan}}, "train.epochs must be in .*, got nan"),
    ({"train": {"learning_rate": math.nan}}, "train.learning_rate must be > 0 and finite"),
    ({"train": {"logging_steps": 0}}, r"train.logging_steps must be in \[1, "),
    ({"lora": {"r": 0}}, r"lora.r must be in \[1, "),
    ({"qlora": {"r": 0}}, r"qlora.r must be in \[1, "),
    ({"lora": {"dropout": 5}}, r"lora.dropout must be in \[0, 1\), got 5.0"),
    ({"data": {"max_train_examples": -3}}, "data.max_train_examples must be in"),
    ({"train": {"lr_scheduler": "cosinus"}}, "train.lr_scheduler must be one of linear, cosine"),
    ({"seed": -1}, r"seed must be in \[0, 4294967295\], got -1"),
    ({"train": {"batch_size": 1e20}}, r"train.batch_size must be in \[1, 1048576\]"),
    ({"train": {"max_steps": 0}}, r"train.max_steps must be -1 or in \[1, "),
    ({"train": {"save_steps": 0}}, "train.save_steps must be in"),
    ({"train": {"save_steps": -2}}, "train.save_steps must be in"),
    ({"train": {"warmup_ratio": 10**400}}, "train.warmup_ratio is out of range"),
    ({"search": {"space": {"epochs": [1.0, math.inf]}}}, "search.space.epochs must be in"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("")
    for output_dir in (tmp_path / "taken", tmp_path / "taken" / "run"):
        with pytest.raises(ConfigError, match=r"output_dir .* is a file, not a folder"):
            config_from_dict({"output_dir": str(output_dir)})


@pytest.mark.parametrize("flags,message", [
    (["--train.epochs", "inf"], "train.epochs must be in (0, 100000], got inf"),
    (["--train.learning_rate", "nan"], "train.learning_rate must be > 0 and finite, got nan"),
    (["--train.save_steps", "0"], "train.save_steps must be in [1, 2147483647], got 0"),
    (["--lora.dropout", "5"], "lora.dropout must be in [0, 1), got 5.0"),
    (["--seed", "-1"], "seed must be in [0, 4294967295], got -1"),
    (["--train.lr_scheduler", "cosinus"], "train.lr_scheduler must be one of"),
    (["--search.workers", "0"], "search.workers must be in [1, 1024], got 0"),
])
def test_bad_flags_exit_2_with_one_line(flags, message, capsys, tmp_path):
    # a missing data file: a value let through fails fast, with another message
    where = ["--output_dir", str(tmp_path / "run"), "--data.source", str(tmp_path / "no.jsonl")]
    assert main(["-q", "train", *where, *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"peftune: error: {err.split('peftune: error: ', 1)[-1]}"
    assert err.count("\n") == 1 and message in err


def test_bad_yaml_values_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    where = f"data:\n  source: {tmp_path / 'no.jsonl'}\n"
    for text in (f"output_dir: {tmp_path / 'run'}\ntrain:\n  epochs: .inf\n",
                 f"output_dir: {tmp_path / 'run'}\ntrain:\n  batch_size: 1.0e+20\n",
                 f"output_dir: {tmp_path / 'file'}\n"):
        path = tmp_path / "cfg.yaml"
        path.write_text(where + text)
        assert main(["-q", "search", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("peftune: error: ") and err.count("\n") == 1, err


def test_every_key_is_a_flag():
    """Each key of a resolved config, given as a flag with a value other than its default,
    lands in that key (keys come from the config, not from the code that builds flags)."""
    from peftune.cli import build_config, parser

    default = config_from_dict({}).to_dict()
    changed = {"train.learning_rate": 0.0042, "data.source": "some/data.jsonl",
               "model.name": "some-model", "lora.r": 16, "method": "ia3", "seed": 7,
               "search.space.learning_rate": [1e-5, 1e-2], "eval.max_new_tokens": 33}
    argv = ["search"]
    for key, value in changed.items():
        argv += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    got = build_config(parser().parse_args(argv)).to_dict()
    for key, value in changed.items():
        node, want = got, default
        for part in key.split("."):
            node, want = node[part], want[part]
        assert node == value and want != value, key


ACCELERATE_CONFIGS = sorted(CONFIGS[0].parent.joinpath("accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_config_loads_in_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))  # rejects unknown keys
    assert cfg.num_processes >= 2 and cfg.distributed_type.value in (
        "MULTI_GPU", "FSDP", "DEEPSPEED")
    assert {p.name for p in ACCELERATE_CONFIGS} >= {"cpu-2proc.yaml", "fsdp.yaml",
                                                    "deepspeed-zero3.yaml"}


def test_an_unset_learning_rate_is_the_methods_suggested_rate():
    from peftune.methods import get_method

    for name in ("lora", "prompt", "ia3"):
        cfg = config_from_dict({"method": name})
        assert cfg.train.learning_rate == get_method(name).learning_rate
        assert cfg.to_dict()["train"]["learning_rate"] == get_method(name).learning_rate
    assert config_from_dict({"method": "prompt", "train": {"learning_rate": 1e-4}}
                            ).train.learning_rate == 1e-4
