"""Property tests over hostile input: every case is one clear error or a correct result."""

import json
import shutil
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftune import config_from_dict, models
from peftune.config import DataConfig
from peftune.data import load_splits
from peftune.errors import ConfigError, DataError, ModelError
from peftune.train import run

FUZZ = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(string.ascii_lowercase, max_size=8), inner,
                                        max_size=3), max_leaves=6)


@FUZZ
@given(raw=st.binary(max_size=400), suffix=st.sampled_from([".jsonl", ".csv", ".parquet"]))
def test_arbitrary_data_files(tmp_path_factory, raw, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"data{suffix}"
    path.write_bytes(raw)
    try:
        splits = load_splits(DataConfig(source=str(path)))
    except DataError as err:
        assert "\n" not in str(err) and str(path.name) in str(err)
    else:
        assert all(set(ds.column_names) == {"id", "document", "summary"}
                   for ds in splits.values())


@FUZZ
@given(rows=st.lists(st.dictionaries(st.sampled_from(["document", "summary", "id", "x"]),
                                     values, max_size=4), min_size=1, max_size=30))
def test_arbitrary_jsonl_rows(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("fuzz") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        splits = load_splits(DataConfig(source=str(path)))
    except DataError as err:
        assert "\n" not in str(err)
    else:
        for ds in splits.values():
            assert all(isinstance(d, str) and d.strip() for d in ds["document"])


SECTIONS = ["data", "model", "train", "eval", "search", "lora", "output_dir", "seed", "method"]
KEYS = ["learning_rate", "batch_size", "micro_batch_size", "epochs", "source", "name", "r",
        "alpha", "n_trials", "metric", "space", "dtype", "precision", "bogus"]


@FUZZ
@given(cfg=st.dictionaries(st.sampled_from(SECTIONS),
                           st.one_of(values, st.dictionaries(st.sampled_from(KEYS), values,
                                                             max_size=4)), max_size=4))
def test_arbitrary_configs(cfg):
    try:
        config = config_from_dict(cfg)
    except ConfigError as err:
        assert "\n" not in str(err)
    else:
        assert config_from_dict(config.to_dict()).to_dict() == config.to_dict()


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    out = tmp_path_factory.mktemp("adapter-run")
    run(config_from_dict({
        "output_dir": str(out), "data": {"source": str(tiny_data_dir)},
        "model": {"name": str(tiny_model_dir)},
        "train": {"max_steps": 1, "batch_size": 2, "micro_batch_size": 2,
                  "precision": "fp32", "save_checkpoints": False}}))
    return out / "adapter"


def _mutated(adapter, tmp_path_factory, mutate):
    copy = tmp_path_factory.mktemp("mutant") / "adapter"
    shutil.copytree(adapter, copy)
    mutate(copy)
    return copy


def _try_load(path, tiny_model_dir):
    base = models.load_model(models.ModelConfig(name=str(tiny_model_dir)))
    try:
        models.load_adapter(base, path)
    except ModelError as err:
        assert "\n" not in str(err)
        return "error"
    return "loaded"


@FUZZ
@given(cut=st.integers(0, 4000), flips=st.lists(st.integers(0, 10**6), max_size=3))
def test_damaged_adapter_weights(tmp_path_factory, trained_adapter, tiny_model_dir, cut, flips):
    def damage(path):
        weights = path / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        for pos in flips:
            data[pos % len(data)] ^= 0xFF
        weights.write_bytes(bytes(data[:cut] if cut < len(data) else data))

    assert _try_load(_mutated(trained_adapter, tmp_path_factory, damage),
                     tiny_model_dir) in ("error", "loaded")


@pytest.mark.parametrize("change,message", [
    ({"evil_key": 1}, "unknown keys evil_key"),
    ({"auto_mapping": {"base_model_class": "os.system", "parent_library": "os"}},
     "auto_mapping"),
    ({"peft_type": "../../etc/passwd"}, "unknown peft_type"),
])
def test_hostile_adapter_config(tmp_path_factory, trained_adapter, tiny_model_dir, change,
                                message):
    def edit(path):
        cfg_file = path / "adapter_config.json"
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **change}))

    path = _mutated(trained_adapter, tmp_path_factory, edit)
    base = models.load_model(models.ModelConfig(name=str(tiny_model_dir)))
    with pytest.raises(ModelError, match=message):
        models.load_adapter(base, path)


def test_pickled_adapter_is_refused(tmp_path_factory, trained_adapter, tiny_model_dir):
    def to_bin(path):
        (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")

    path = _mutated(trained_adapter, tmp_path_factory, to_bin)
    base = models.load_model(models.ModelConfig(name=str(tiny_model_dir)))
    with pytest.raises(ModelError, match="pickled .bin adapters are not loaded"):
        models.load_adapter(base, path)
