"""Property tests over hostile input: every case is one clear error or a correct result."""

import json
import math
import re
import shutil
import string
import typing
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftune import config_from_dict, models
from peftune.config import DataConfig, option_fields, set_dotted
from peftune.data import load_splits
from peftune.errors import ConfigError, DataError, ModelError
from peftune.train import run

FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
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


def _numeric_options():
    """(key, number type, is a list, declared range) of every numeric option."""
    out = []
    for key, (tp, f) in option_fields().items():
        is_list = typing.get_origin(tp) is list
        kinds = typing.get_args(tp) if is_list or typing.get_args(tp) else (tp,)
        kind = next((k for k in kinds if k in (int, float)), None)
        if kind is not None:
            out.append((key, kind, is_list, f.metadata.get("range")))
    return out


NUMERIC = _numeric_options()
PROBES = [math.nan, math.inf, -math.inf, -10**30, -1, 0, 0.5, 1, 2**31, 1e20, 10**30]


def _check_number(key, kind, is_list, bounds, value):
    """A value is refused with a one-line error naming the key, or lies in the declared range."""
    data = {}
    set_dotted(data, key, [value, value] if is_list else value)
    try:
        config_from_dict(data)
    except ConfigError as err:
        assert "\n" not in str(err) and key in str(err), str(err)
    else:
        assert value in bounds, f"{key}={value!r} accepted outside its range {bounds}"
        assert kind is int or math.isfinite(value)


def test_every_numeric_option_declares_and_enforces_its_range():
    assert {"train.epochs", "lora.r", "search.space.learning_rate", "seed"} <= {
        key for key, *_ in NUMERIC}
    for key, kind, is_list, bounds in NUMERIC:
        assert bounds is not None, f"{key} declares no range (_help(..., within=...))"
        edges = [x for x in (bounds.low, bounds.high, *bounds.also) if not isinstance(x, str)]
        near = [x + d for x in edges if math.isfinite(x) for d in (-1, -1e-9, 0, 1e-9, 1)]
        for value in PROBES + near:
            _check_number(key, kind, is_list, bounds, value)


def test_every_string_option_with_choices_refuses_others():
    for key, (_, f) in option_fields().items():
        if "choices" in f.metadata:
            data = {}
            set_dotted(data, key, "no-such-choice")
            with pytest.raises(ConfigError, match=f"{re.escape(key)} must be one of"):
                config_from_dict(data)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data())
def test_numbers_across_each_options_type_and_range(data):
    key, kind, is_list, bounds = data.draw(st.sampled_from(NUMERIC))
    edges = [x for x in (bounds.low, bounds.high, *bounds.also)
             if not isinstance(x, str) and math.isfinite(x)]
    value = data.draw(st.one_of(
        st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(edges).flatmap(lambda x: st.sampled_from([x - 1, x, x + 1]))))
    _check_number(key, kind, is_list, bounds, value)


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
    """The loaded adapter's weights, or None after a one-line error."""
    from peft import get_peft_model_state_dict

    base = models.load_model(models.resolve(models.ModelConfig(name=str(tiny_model_dir))))
    try:
        model = models.load_adapter(base, path)
    except ModelError as err:
        assert "\n" not in str(err)
        return None
    return get_peft_model_state_dict(model)


@FUZZ
@given(cut=st.one_of(st.none(), st.integers(0, 4000)),
       flips=st.lists(st.integers(0, 10**6), max_size=3))
def test_damaged_adapter_weights(tmp_path_factory, trained_adapter, tiny_model_dir, cut, flips):
    def damage(path):
        weights = path / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        for pos in flips:
            data[pos % len(data)] ^= 0xFF
        weights.write_bytes(bytes(data[:cut] if cut is not None else data))

    from safetensors.torch import load_file

    damaged = _mutated(trained_adapter, tmp_path_factory, damage)
    loaded = _try_load(damaged, tiny_model_dir)
    original = load_file(str(trained_adapter / "adapter_model.safetensors"))
    if not flips and cut is None:  # nothing was damaged: it loads, weight for weight
        assert loaded is not None
    if loaded is None:
        return
    # loaded: every adapter weight is there (none left at its initial value), and each is
    # what the file holds; flipped bits in tensor data are not detectable (no checksum)
    on_disk = load_file(str(damaged / "adapter_model.safetensors"))
    assert loaded.keys() == original.keys() == on_disk.keys()
    for key, value in loaded.items():
        assert torch.equal(value, on_disk[key].to(value.dtype)), key
    if not flips:
        assert all(torch.equal(loaded[k], original[k]) for k in original)


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
    base = models.load_model(models.resolve(models.ModelConfig(name=str(tiny_model_dir))))
    with pytest.raises(ModelError, match=message):
        models.load_adapter(base, path)


def test_pickled_adapter_is_refused(tmp_path_factory, trained_adapter, tiny_model_dir):
    def to_bin(path):
        (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")

    path = _mutated(trained_adapter, tmp_path_factory, to_bin)
    base = models.load_model(models.resolve(models.ModelConfig(name=str(tiny_model_dir))))
    with pytest.raises(ModelError, match="pickled .bin adapters are not loaded"):
        models.load_adapter(base, path)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_bpe_model_dir):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftune import export

    model = AutoModelForCausalLM.from_pretrained(tiny_bpe_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bpe_model_dir)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    export.write_llama_metadata(writer, model.config, name="tiny",
                                file_type=gguf.LlamaFileType.ALL_F32)
    export.write_tokenizer(writer, tokenizer, vocab_size=model.config.vocab_size,
                           pre=export.pre_tokenizer_name(tokenizer))
    export.write_llama_tensors(writer, model, qtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("cut", [3, 10, 30, 200, 2000, 0.25, 0.5, -10])
def test_a_truncated_gguf_is_one_clear_error(tmp_path, monkeypatch, tiny_gguf, cut):
    """Cut inside the header, the metadata, the tensor table and the tensor data."""
    data = tiny_gguf.read_bytes()
    end = int(len(data) * cut) if isinstance(cut, float) else cut % len(data)
    (tmp_path / "cut.gguf").write_bytes(data[:end])
    monkeypatch.setenv("PEFTUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match=r"cut.gguf: not a readable GGUF model \(.*\); if the "
                                         "file is truncated or damaged, download it again$"):
        models.load_tokenizer(models.ModelConfig(name=str(tmp_path / "cut.gguf")))


def test_a_whole_gguf_loads(tmp_path, monkeypatch, tiny_gguf):
    monkeypatch.setenv("PEFTUNE_CACHE", str(tmp_path))
    tokenizer = models.load_tokenizer(models.ModelConfig(name=str(tiny_gguf)))
    assert tokenizer("alpha beta")["input_ids"]


def _convert_after_barrier(gguf: str, barrier, out) -> None:
    """One worker process: convert ``gguf``, meeting the other worker just after the cache
    check (at ``from_config``), so that neither has written the cached folder yet."""
    real = models.AutoModelForCausalLM.from_config

    def both_past_the_cache_check(*args, **kwargs):
        barrier.wait()
        return real(*args, **kwargs)

    models.AutoModelForCausalLM.from_config = both_past_the_cache_check
    path = Path(gguf)
    try:
        out.put(("ok", models._gguf_as_plain(str(path.parent), path.name)))
    except Exception as err:  # noqa: BLE001 - reported by the test with its type
        out.put(("error", repr(err)))


def test_two_conversions_of_one_gguf_at_once_both_succeed(tmp_path, monkeypatch, tiny_gguf):
    """Two worker processes loading the same GGUF base at the same moment both convert it;
    the one that finishes second finds the cached folder already there and uses it.
    Processes, as real workers are: transformers patches global state while it builds a
    model, so two threads building at once leave every later model in the process untied."""
    import multiprocessing

    monkeypatch.setenv("PEFTUNE_CACHE", str(tmp_path))  # the workers inherit it
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2, timeout=120), ctx.Queue()
    workers = [ctx.Process(target=_convert_after_barrier, args=(str(tiny_gguf), barrier, out))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert [status for status, _ in results] == ["ok", "ok"], results
    assert results[0][1] == results[1][1]
    cached = tmp_path / "models"
    assert [p.name for p in cached.iterdir()] == [Path(results[0][1]).name]  # no tmp left over
    assert models.load_tokenizer(models.ModelConfig(name=str(tiny_gguf)))("alpha beta")[
        "input_ids"]
