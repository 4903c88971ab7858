"""16-bit exports against the adapter they came from, and the load lines export prints."""

import re

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from peftune import config_from_dict
from peftune.cli import main
from peftune.export import export
from peftune.train import run
from tests.conftest import bpe_adapter_config


@pytest.fixture(scope="module")
def trained(tiny_bpe_model_dir, tiny_data_dir, tmp_path_factory):
    """A LoRA adapter on the byte-level BPE tiny LLaMA (exportable to GGUF) and prompts."""
    out = tmp_path_factory.mktemp("export-formats")
    cfg = config_from_dict(bpe_adapter_config(tiny_bpe_model_dir, tiny_data_dir, out))
    result = run(cfg)
    prompts = [[2, *range(10, 40)], [2, *range(40, 60)], [2, 7, 9, 11, 13, 200, 250]]
    return result.adapter_dir, prompts, out


def _logits(model, prompts):
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([p])).logits[0].float()
                          for p in prompts])


# Rounding every weight to 16 bits moves a logit of this model (values of order 1) by 1e-3 to
# 2e-2 (measured on two adapters trained on different batch orders: bf16 compute 0.0033 and
# 0.024, bf16 GGUF read in fp32 0.0011 and 0.014, float16 below 0.006), while removing the
# adapter moves it by about 1. bfloat16 keeps 8 significant bits to float16's 11, so its
# bound is looser; both tell the adapter's model from any other. Greedy tokens follow the
# argmax, equal unless two logits tie within rounding.
MAX_LOGIT_DIFF = {"float16": 0.02, "f16": 0.02, "bfloat16": 0.05, "bf16": 0.05}


@pytest.mark.parametrize("fmt,dtype", [("merged", "bfloat16"), ("merged", "float16"),
                                       ("gguf", "f16"), ("gguf", "bf16")])
def test_16_bit_exports_predict_what_the_adapter_predicts(trained, tiny_bpe_model_dir, fmt,
                                                          dtype):
    adapter, prompts, out = trained
    base = AutoModelForCausalLM.from_pretrained(tiny_bpe_model_dir)
    bare = _logits(base, prompts)
    reference = _logits(PeftModel.from_pretrained(base, str(adapter)).eval(), prompts)
    exported = export(adapter, out / f"{fmt}-{dtype}", fmt=fmt, dtype=dtype).path
    if fmt == "merged":
        model = AutoModelForCausalLM.from_pretrained(exported)  # in its saved dtype
        assert model.dtype == getattr(torch, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(exported.parent),
                                                     gguf_file=exported.name)
    got = _logits(model, prompts)
    assert (bare - reference).abs().max() > 10 * MAX_LOGIT_DIFF[dtype]  # the adapter matters
    assert (got - reference).abs().max() <= MAX_LOGIT_DIFF[dtype]
    agree = (got.argmax(-1) == reference.argmax(-1)).float().mean()
    assert agree >= 0.98, f"greedy tokens agree at {agree:.1%} of positions"


def _printed_load_line(argv, capsys):
    capsys.readouterr()
    assert main(["-q", "export", *argv]) == 0
    return re.search(r"^load:\s+(.*)$", capsys.readouterr().out, re.M).group(1)


def _run_load_line(line):
    """What a user pasting the printed line gets."""
    scope = {"PeftModel": PeftModel, "AutoModelForCausalLM": AutoModelForCausalLM,
             "AutoModelForSeq2SeqLM": AutoModelForSeq2SeqLM}
    return eval(line, scope)  # the line is ours, printed a moment ago


def test_the_printed_adapter_load_line_loads_the_adapter(trained, tiny_bpe_model_dir,
                                                         capsys):
    adapter, prompts, out = trained
    line = _printed_load_line([str(adapter), "--format", "adapter", "--out",
                               str(out / "adapter-line")], capsys)
    model = _run_load_line(line)
    assert isinstance(model, PeftModel)
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        tiny_bpe_model_dir), str(adapter)).eval()
    torch.testing.assert_close(_logits(model.eval(), prompts), _logits(expected, prompts))


def test_a_t5_export_prints_a_seq2seq_load_line(tiny_cfg, tiny_t5_dir, tmp_path, capsys):
    tiny_cfg["model"]["name"] = str(tiny_t5_dir)
    tiny_cfg["train"].update(max_steps=2, eval_each_epoch=False)
    result = run(config_from_dict(tiny_cfg))
    ids = torch.tensor([[5, 6, 7, 8, 9, 3]])
    start = torch.tensor([[1]])
    with torch.no_grad():
        expected = result.model.eval()(input_ids=ids, decoder_input_ids=start).logits
    for fmt in ("adapter", "merged"):
        line = _printed_load_line([str(result.adapter_dir), "--format", fmt, "--out",
                                   str(tmp_path / fmt)], capsys)
        assert "AutoModelForSeq2SeqLM" in line and "AutoModelForCausalLM" not in line, line
        model = _run_load_line(line).eval()
        assert model.config.is_encoder_decoder
        with torch.no_grad():
            got = model(input_ids=ids, decoder_input_ids=start).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
