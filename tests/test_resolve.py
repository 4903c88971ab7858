"""One recipe: a model is resolved once (:class:`models.ResolvedModel`), and loading, wrapping,
adapter loading and merging each have one function that train, plan and export all call."""

import ast
from pathlib import Path

import pytest
import torch

from peftune import assembly, config_from_dict, devices, export, models, plan
from peftune.config import ModelConfig
from peftune.errors import ModelError
from peftune.methods import get_method, registry
from peftune.train import run

SRC = Path(__file__).resolve().parent.parent / "src" / "peftune"


def _called(func: ast.expr) -> set[str]:
    """``f(...)``: f; ``x.f(...)``: f and x.f."""
    if isinstance(func, ast.Attribute):
        owner = {f"{func.value.id}.{func.attr}"} if isinstance(func.value, ast.Name) else set()
        return {func.attr, *owner}
    return {func.id} if isinstance(func, ast.Name) else set()


def _defs_and_calls() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Per module (its path under src/peftune): the functions it defines, the functions and
    methods it calls (``get_peft_model``, ``PeftModel.from_pretrained``, ``merge_and_unload``)."""
    defs: dict[str, set[str]] = {}
    calls: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        name = str(path.relative_to(SRC))
        nodes = list(ast.walk(ast.parse(path.read_text())))
        defs[name] = {n.name for n in nodes if isinstance(n, ast.FunctionDef)}
        calls[name] = {c for n in nodes if isinstance(n, ast.Call) for c in _called(n.func)}
    return defs, calls


def test_each_step_of_the_recipe_has_one_function_and_one_caller_of_the_library():
    defs, calls = _defs_and_calls()

    def where(names: dict[str, set[str]], name: str) -> list[str]:
        return sorted(module for module, found in names.items() if name in found)

    assert not hasattr(models, "load_base") and not hasattr(export, "check_mergeable")
    assert where(defs, "load_base") == where(defs, "wrap") == ["assembly.py"]
    assert where(defs, "resolve") == ["merging.py", "models.py"]  # a merge base, a model
    assert where(defs, "resolve_base") == ["assembly.py"]
    assert where(defs, "load_model") == where(defs, "load_adapter") == ["models.py"]
    assert where(defs, "check_mergeable") == ["methods/__init__.py"]
    assert where(calls, "get_peft_model") == ["assembly.py"]
    assert where(calls, "PeftModel.from_pretrained") == ["models.py"]
    assert where(calls, "merge_and_unload") == ["methods/__init__.py"]


@pytest.mark.parametrize("method", sorted(registry()))
def test_plan_counts_the_parameters_of_the_model_training_assembles(tiny_cfg, method):
    if method in ("qlora", "lora-int8"):
        pytest.importorskip("bitsandbytes")
    cfg = config_from_dict({**tiny_cfg, "method": method, "plan": {"use_data": False}})
    base = assembly.load_base(cfg, models.load_tokenizer(cfg.model))
    total = sum(p.numel() for p in base.parameters())
    trainable, _ = assembly.wrap(base, cfg).get_nb_trainable_parameters()
    counted = plan.make(cfg).params
    assert counted.trainable == trainable
    if assembly.resolve_base(cfg).quantization is None:  # 4-bit weights are counted packed
        assert counted.total == total


@pytest.mark.parametrize(("dtype", "precision", "gpu", "expected"), [
    ("auto", "bf16", True, torch.bfloat16), ("auto", "fp16", True, torch.float16),
    ("auto", "fp32", True, torch.float32), ("auto", "bf16", False, torch.float32),
    ("float16", "fp32", False, torch.float16)])
def test_plan_and_loading_read_one_dtype_rule(tiny_cfg, dtype, precision, gpu, expected):
    """``model.dtype: auto`` is 16 bits on a GPU training in 16 bits: the planner once
    assumed fp32 there while loading gave 16 bits."""
    tiny_cfg["model"]["dtype"] = dtype
    tiny_cfg["train"]["precision"] = precision
    tiny_cfg["plan"] = {"use_data": False, "device_memory": "24GB" if gpu else "auto"}
    cfg = config_from_dict(tiny_cfg)
    resolved = assembly.resolve_base(cfg, gpu=gpu)
    assert resolved.dtype == expected
    if gpu or not torch.cuda.is_available():
        # a device_memory setting plans for a GPU; "auto" here is this CPU-only machine
        assert plan.make(cfg).weight_format == devices.DTYPE_NAMES[expected]
    if not gpu and not torch.cuda.is_available():
        tokenizer = models.load_tokenizer(cfg.model)
        assert assembly.load_base(cfg, tokenizer).dtype == expected


def test_a_k_bit_method_resolves_to_its_quantization_and_export_drops_it(tiny_cfg):
    pytest.importorskip("bitsandbytes")
    cfg = config_from_dict({**tiny_cfg, "method": "qlora"})
    resolved = assembly.resolve_base(cfg)
    assert resolved.quantization.load_in_4bit and resolved.weight_format == "nf4-dq"
    plain = resolved.at(torch.bfloat16)
    assert plain.quantization is None and plain.weight_format == "bfloat16"
    assert plain.config.model_type == resolved.config.model_type == "llama"


def test_resolving_names_the_files_and_fails_in_one_line(tiny_model_dir, tmp_path):
    resolved = models.resolve(ModelConfig(name=str(tiny_model_dir)))
    assert (resolved.source, resolved.gguf_file, resolved.gguf_path) == (
        str(tiny_model_dir), None, None)
    assert resolved.path == str(tiny_model_dir) and not resolved.is_seq2seq
    assert resolved.auto_class.__name__ == "AutoModelForCausalLM"
    assert not resolved.stored_quantized
    with pytest.raises(ModelError, match="model file not found: .*missing.gguf"):
        models.resolve(ModelConfig(name=str(tmp_path / "missing.gguf")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        models.resolve(ModelConfig(name=str(tmp_path / "empty")))


def test_export_merges_what_the_assembled_adapter_merges_to(tiny_cfg):
    tiny_cfg["lora"] = {"target_modules": ["all-linear"]}
    tiny_cfg["train"]["eval_each_epoch"] = False
    adapter = run(config_from_dict(tiny_cfg)).adapter_dir
    exported, _, cfg = export.merge(adapter, dtype="float32")
    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_adapter(assembly.load_base(cfg, tokenizer), adapter)
    merged = get_method(cfg.method).merge(model)
    expected = merged.state_dict()
    assert exported.state_dict().keys() == expected.keys()
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    base = assembly.load_base(cfg, tokenizer).state_dict()
    assert any(not torch.equal(base[n], t) for n, t in expected.items()), "merged nothing"
