"""``export --merge-base``: a QLoRA adapter merged into the 4-bit base it trained on
(dequantized) or into the full-precision checkpoint (original)."""

import json

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peftune import config_from_dict
from peftune.card import CARD, front_matter
from peftune.cli import main
from peftune.errors import ConfigError, PeftuneError
from peftune.export import export, merge, merge_base
from peftune.merging import MergeOptions
from peftune.parity import ParityOptions
from peftune.train import run


@pytest.fixture(scope="module")
def qlora_adapter(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora-run")
    cfg = config_from_dict({
        "output_dir": str(out / "run"), "method": "qlora",
        "data": {"source": str(tiny_data_dir), "max_source_tokens": 24},
        "model": {"name": str(tiny_model_dir)},
        "qlora": {"gradient_checkpointing": False},
        "train": {"max_steps": 3, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 5e-2,
                  "precision": "fp32", "eval_each_epoch": False},
        "eval": {"max_new_tokens": 8, "batch_size": 4}})
    return run(cfg).adapter_dir


def _nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the qlora base holds it: NF4 with double quantization, dequantized."""
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4",
                                                 compress_statistics=True,
                                                 quant_storage=torch.uint8)
    return bnb.functional.dequantize_4bit(packed, state).float()


def test_dequantized_merges_into_the_trained_weights_original_into_the_checkpoint(
        qlora_adapter, tiny_model_dir):
    checkpoint = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    lora = load_file(str(qlora_adapter / "adapter_model.safetensors"))
    merged = {base: merge(qlora_adapter, dtype="float32", options=MergeOptions(base=base))[0]
              for base in ("dequantized", "original")}
    settings = json.loads((qlora_adapter / "adapter_config.json").read_text())
    scaling = settings["lora_alpha"] / settings["r"]
    checked = 0
    for name, a in lora.items():
        if "lora_A" not in name:
            continue
        b = lora[name.replace("lora_A", "lora_B")]
        delta = (b.float() @ a.float()) * scaling
        key = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        weight = checkpoint.state_dict()[key]
        assert delta.abs().max() > 0, key
        torch.testing.assert_close(merged["original"].state_dict()[key], weight + delta)
        torch.testing.assert_close(merged["dequantized"].state_dict()[key],
                                   _nf4_round_trip(weight) + delta)
        assert not torch.equal(merged["original"].state_dict()[key],
                               merged["dequantized"].state_dict()[key])
        checked += 1
    assert checked > 0
    assert all(p.dtype == torch.float32 for m in merged.values() for p in m.parameters())


def test_dequantized_merge_generates_the_adapter_on_its_4bit_base_and_the_card_says_so(
        qlora_adapter, tmp_path):
    done = export(qlora_adapter, tmp_path / "merged", fmt="merged", dtype="float32",
                  parity=ParityOptions(mode="strict", documents=4))
    assert done.merge_base == "dequantized"  # the default, chosen in BENCHMARKS.md
    assert "4/4 identical texts" in done.parity
    assert front_matter(done.path / CARD)["peftune"]["merge_base"] == "dequantized"
    assert "## Merge base" in (done.path / CARD).read_text()
    original = export(qlora_adapter, tmp_path / "original", fmt="merged", dtype="float32",
                      merge_options=MergeOptions(base="original"), parity=None)
    assert original.merge_base == "original"
    assert front_matter(original.path / CARD)["peftune"]["merge_base"] == "original"


def test_merge_base_dequantized_is_refused_for_a_method_that_does_not_quantize(tiny_cfg):
    cfg = config_from_dict(tiny_cfg)  # lora: trained on the full-precision base
    with pytest.raises(PeftuneError, match="--merge-base dequantized applies to methods"):
        merge_base(cfg, MergeOptions(base="dequantized"))
    assert merge_base(cfg, MergeOptions()) is None
    assert merge_base(cfg, MergeOptions(base="original")) is None


def test_merge_base_is_refused_where_nothing_is_merged_and_checked_where_declared(tmp_path):
    with pytest.raises(PeftuneError, match="--merge-base does not apply to --format adapter"):
        export(tmp_path, tmp_path / "out", fmt="adapter",
               merge_options=MergeOptions(base="original"))
    with pytest.raises(ConfigError, match="merge.base"):
        MergeOptions(base="quantized")


def test_the_cli_prints_the_merge_base_and_refuses_it_where_nothing_is_merged(qlora_adapter,
        tmp_path, capsys):
    assert main(["-q", "export", str(qlora_adapter), "--dtype", "float32", "--merge-base",
                 "original", "--parity", "off", "--out", str(tmp_path / "m")]) == 0
    assert "merged into the original base" in capsys.readouterr().out
    assert main(["-q", "export", str(qlora_adapter), "--format", "gguf-lora", "--merge-base",
                 "dequantized", "--out", str(tmp_path / "g")]) == 2
    assert "--merge-base does not apply to --format gguf-lora" in capsys.readouterr().err
