from pathlib import Path

import pytest

from peftune import config_from_dict, load_yaml
from peftune.config import Config, flag_specs
from peftune.errors import ConfigError

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    cfg = config_from_dict(load_yaml(path))
    assert isinstance(cfg, Config)
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


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
    ({"method": "magic"}, "unknown method 'magic'"),
    ({"lora": {"r": 1.5}}, "lora.r must be an integer"),
    ({"model": {"dtype": "int3"}}, "model.dtype must be one of"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_every_key_is_a_flag():
    keys = {key for key, *_ in flag_specs()}
    assert {"train.learning_rate", "data.source", "model.name", "lora.r", "method"} <= keys


ACCELERATE_CONFIGS = sorted(CONFIGS[0].parent.joinpath("accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_config_loads_in_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))  # rejects unknown keys
    assert cfg.num_processes >= 2 and cfg.distributed_type.value in (
        "MULTI_GPU", "FSDP", "DEEPSPEED")
    assert {p.name for p in ACCELERATE_CONFIGS} >= {"cpu-2proc.yaml", "fsdp.yaml",
                                                    "deepspeed-zero3.yaml"}
