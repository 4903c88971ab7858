"""Serving formats: a LoRA as a llama.cpp GGUF adapter, an Ollama Modelfile, vLLM's rules
for adapter folders, the parity check of every export, and llama.cpp itself running
peftune's GGUF exports (required under CI: the suite fails there instead of skipping)."""

import json
import os
import re

import gguf
import numpy as np
import pytest
from peft import IA3Config, LoraConfig, TaskType, get_peft_model

from peftune import config_from_dict, llamacpp, ollama, vllm
from peftune.assembly import prepare
from peftune.cli import main
from peftune.errors import ConfigError, ModelError, PeftuneError
from peftune.export import export, permute_qk, run_config
from peftune.generation import generate, prompts_of
from peftune.models import prompt_format
from peftune.parity import Parity, ParityOptions, check
from peftune.train import run
from tests.conftest import bpe_adapter_config, make_llama, make_tokenizer

# Under CI llama.cpp must be installed (`make setup` installs it): a missing binding fails
# the llama.cpp tests there instead of skipping them.
needs_llama_cpp = pytest.mark.skipif(
    not llamacpp.available() and not os.environ.get("CI"),
    reason="llama-cpp-python is not installed (`make setup` installs it)")
PENALTY, N_NEW = 1.3, 12


@pytest.fixture(scope="module")
def trained(tiny_bpe_model_dir, tiny_data_dir, tmp_path_factory):
    """A LoRA on every linear layer of the byte-level BPE tiny LLaMA, decoded with a
    repetition penalty; its test prompts and peftune's greedy token ids for them."""
    out = tmp_path_factory.mktemp("serving")
    cfg = config_from_dict({**bpe_adapter_config(tiny_bpe_model_dir, tiny_data_dir, out),
                            "eval": {"max_new_tokens": N_NEW, "repetition_penalty": PENALTY}})
    result = run(cfg)
    data = prepare(cfg, roles=("test", "validation"))
    prompts = prompts_of(data.splits["test"]) + prompts_of(data.splits["validation"])
    texts = generate(result.model, data.tokenizer, prompts, cfg.eval, progress=False)
    with result.model.disable_adapter():
        assert generate(result.model, data.tokenizer, prompts, cfg.eval,
                        progress=False) != texts, "the adapter changes no text"
    return result.adapter_dir, prompts, texts, data.tokenizer, out


def _tensors(path):
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}


def _field(path, key):
    return gguf.GGUFReader(str(path)).get_field(key).contents()


def test_a_q8_0_gguf_holds_q8_0_blocks_of_the_merged_weights(trained):
    """2-D weights in Q8_0 (each within one step, max / 127, of its 32-wide block; the step
    itself is stored in f16), norms in f32."""
    adapter, *_, out = trained
    path = export(adapter, out / "gguf-q8", fmt="gguf", dtype="q8_0").path
    exact = _tensors(export(adapter, out / "gguf-f32-ref", fmt="gguf", dtype="f32").path)
    assert _field(path, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    for t in gguf.GGUFReader(str(path)).tensors:
        want = exact[t.name]
        if want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, t.name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        step = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        assert (np.abs(got - want).reshape(-1, 32) <= step + 1e-7).all(), t.name


# ---------------------------------------------------------------- gguf-lora

def test_gguf_lora_is_the_merged_models_delta_in_llama_cpps_layout(trained):
    """Base + alpha / r * B @ A, per GGUF tensor, is the merged GGUF's tensor: the pairs are
    named, oriented and Q/K-permuted as llama.cpp applies them."""
    adapter, *_, out = trained
    done = export(adapter, out / "lora-f32", fmt="gguf-lora", dtype="f32")
    assert (_field(done.path, "general.type"), _field(done.path, "adapter.type")) == \
        ("adapter", "lora")
    meta = json.loads((adapter / "adapter_config.json").read_text())
    assert _field(done.path, "adapter.lora.alpha") == meta["lora_alpha"]
    lora, base = _tensors(done.path), _tensors(done.lora_base)
    merged = _tensors(export(adapter, out / "merged-f32", fmt="gguf", dtype="f32").path)
    names = {n.rsplit(".", 1)[0] for n in lora}
    assert {f"blk.{i}.{m}.weight" for i in (0, 1) for m in
            ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
            } == names
    scale = meta["lora_alpha"] / meta["r"]
    for name in names:
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        assert a.shape[0] == b.shape[1] == meta["r"]
        np.testing.assert_allclose(base[name] + scale * b @ a, merged[name], atol=1e-5,
                                   err_msg=name)
    modelfile = (done.path.parent / "Modelfile").read_text()
    assert f"FROM ./{done.lora_base.name}\nADAPTER ./{done.path.name}\n" in modelfile


def test_permute_qk_of_lora_b_permutes_the_product():
    a = np.random.default_rng(0).normal(size=(4, 8))
    b = np.random.default_rng(1).normal(size=(16, 4))
    np.testing.assert_allclose(permute_qk(b, 2) @ a, permute_qk(b @ a, 2))


def _peft_folder(tmp_path, tiny_cfg, peft_config, name):
    tok = make_tokenizer()
    model = get_peft_model(make_llama(len(tok)), peft_config)
    model.save_pretrained(tmp_path / name)
    (tmp_path / name / "peftune.yaml").write_text(json.dumps(tiny_cfg))
    return tmp_path / name


@pytest.mark.parametrize("name,peft_config,says", [
    ("dora", LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, use_dora=True), "DoRA"),
    ("embed", LoraConfig(task_type=TaskType.CAUSAL_LM, r=4,
                         target_modules=["q_proj", "embed_tokens"]), "embed_tokens"),
    ("head", LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["lm_head"]),
     "lm_head"),
    ("ia3", IA3Config(task_type=TaskType.CAUSAL_LM), "takes LoRA adapters; .* is IA3"),
])
def test_gguf_lora_refuses_what_llama_cpp_cannot_load(tmp_path, tiny_cfg, capsys, name,
                                                     peft_config, says):
    folder = _peft_folder(tmp_path, tiny_cfg, peft_config, name)
    with pytest.raises(ModelError, match=says):
        export(folder, tmp_path / "out", fmt="gguf-lora")
    assert main(["-q", "export", str(folder), "--format", "gguf-lora", "--parity", "off"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(says, err[0]), err


# ---------------------------------------------------------------- Ollama

def render_go(template, prompt):
    """The Go text/template subset the Modelfile uses: literal text, ``{{ .Prompt }}`` and
    string literals ``{{ "..." }}``; any other action fails the test."""
    def action(match):
        body = match.group(1).strip()
        if body == ".Prompt":
            return prompt
        if body.startswith('"') and body.endswith('"'):
            return json.loads(body)
        raise AssertionError(f"unexpected template action {{{{ {body} }}}}")
    return re.sub(r"\{\{-?(.*?)-?\}\}", action, template)


def _modelfile_template(text):
    return re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)


@pytest.mark.parametrize("chat", [True, False])
def test_the_modelfile_template_gives_peftunes_prompt_ids(trained, tiny_data_dir, chat):
    """Rendered for each document and tokenized as llama.cpp does (special tokens parsed, BOS
    added only where the GGUF says so), the TEMPLATE gives the ids peftune trained on."""
    adapter, _, _, tokenizer, out = trained
    done = export(adapter, out / "ollama", fmt="ollama", dtype="f32")
    text = (done.path.parent / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{done.path.name}\n")
    for line in ("PARAMETER temperature 0", "PARAMETER top_k 1",
                 f"PARAMETER repeat_penalty {PENALTY:g}", "PARAMETER repeat_last_n -1",
                 f"PARAMETER num_predict {N_NEW}", 'PARAMETER stop "</s>"'):
        assert line in text.splitlines(), line
    add_bos = _field(done.path, "tokenizer.ggml.add_bos_token")
    cfg = run_config(adapter)
    tok = tokenizer if chat else _without_chat_template(tokenizer)
    template = _modelfile_template(text) if chat else ollama.template(cfg, tok)
    assert ("<|user|>" in template) == chat
    docs = [json.loads(line)["document"] for line in
            (tiny_data_dir / "test.jsonl").read_text().splitlines()]
    fmt = prompt_format(cfg, tok)
    texts, _ = fmt.truncate(docs, cfg.data.max_source_tokens)
    want = fmt.encode(texts)
    for doc, ids in zip(texts, want, strict=True):
        rendered = render_go(template, doc)
        assert tok(rendered, add_special_tokens=bool(add_bos))["input_ids"] == ids


def _without_chat_template(tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    return plain


def test_go_literal_keeps_template_delimiters_literal():
    assert render_go(ollama.go_literal("a {{ b }} c") + "{{ .Prompt }}", "P") == "a {{ b }} cP"


# ---------------------------------------------------------------- vLLM

LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
        "bias": "none", "use_dora": False, "modules_to_save": None}


@pytest.mark.parametrize("change,says", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "bias"),
    ({"r": 1024}, "above vLLM's largest --max-lora-rank 512"),
    ({"rank_pattern": {"q_proj": 600}}, "rank 600"),
    ({"peft_type": "PREFIX_TUNING"}, "LoRA adapters only"),
    ({"peft_type": "IA3"}, "LoRA adapters only"),
])
def test_vllm_refuses_what_its_loader_refuses(change, says):
    found = vllm.problems({**LORA, **change})
    assert len(found) == 1 and says in found[0], found


@pytest.mark.parametrize("r,pattern,want", [(1, {}, 1), (4, {}, 8), (8, {}, 8), (16, {}, 16),
                                            (17, {}, 32), (8, {"v_proj": 300}, 320),
                                            (512, {}, 512)])
def test_max_lora_rank_is_the_smallest_value_vllm_accepts(r, pattern, want):
    meta = {**LORA, "r": r, "rank_pattern": pattern}
    assert not vllm.problems(meta)
    assert vllm.max_lora_rank(meta) == want


def test_the_adapter_card_has_the_vllm_serve_line(trained, tmp_path, tiny_cfg):
    adapter, *_, out = trained
    folder = export(adapter, out / "adapter-vllm", fmt="adapter").path
    card = (folder / "README.md").read_text()
    assert f"--enable-lora --lora-modules run={folder.resolve()} --max-lora-rank 8" in card
    dora = _peft_folder(tmp_path, tiny_cfg, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4,
                                                       use_dora=True), "dora")
    card = (export(dora, tmp_path / "dora-out", fmt="adapter").path / "README.md").read_text()
    assert "vLLM cannot serve this adapter: vLLM does not support DoRA" in card
    assert "vllm serve" not in card


# ---------------------------------------------------------------- parity

def test_every_export_prints_its_parity_line_and_records_it(trained, capsys):
    adapter, *_, out = trained
    target = out / "merged-parity"
    assert main(["-q", "export", str(adapter), "--out", str(target), "--parity", "strict",
                 "--parity-documents", "3"]) == 0
    line = re.search(r"^parity .*$", capsys.readouterr().out, re.M).group(0)
    assert line.startswith("parity (transformers, 3 validation documents): 3/3 identical "
                           "texts, token agreement 100.0%, ROUGE-L vs references +0.00"), line
    card = (target / "README.md").read_text()
    assert "## Parity\n\nAt export, 3 validation documents" in card
    assert "identical: 3" in card  # the front matter's facts


@pytest.mark.parametrize("mode,identical,delta,fp32,fails", [
    ("strict", 7, 0.0, True, "1 of 8 differ"), ("strict", 7, -0.5, False, None),
    ("strict", 8, -1.5, False, "ROUGE-L drops by 1.50"), ("on", 0, -50.0, True, None)])
def test_strict_parity_fails_on_differing_fp32_texts_or_a_rouge_drop(mode, identical, delta,
                                                                     fp32, fails):
    result = Parity(client="x", documents=8, identical=identical, token_agreement=0.9,
                    rougeL=90.0, rougeL_delta=delta)
    options = ParityOptions(mode=mode)
    if fails:
        with pytest.raises(PeftuneError, match=fails):
            check(result, options, fp32=fp32)
    else:
        check(result, options, fp32=fp32)


def test_parity_options_are_checked_where_declared(capsys):
    with pytest.raises(ConfigError, match="parity.documents"):
        ParityOptions(documents=0)
    with pytest.raises(SystemExit):
        main(["export", "x", "--parity", "sometimes"])
    assert "--parity: invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------- llama.cpp itself

def _llama_cpp_texts(path, prompts, tokenizer, lora=None):
    llm = llamacpp.load(path, lora=lora, n_ctx=256)
    ids = llamacpp.greedy(llm, prompts, max_new_tokens=N_NEW, repetition_penalty=PENALTY,
                          stop={tokenizer.eos_token_id})
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


@needs_llama_cpp
def test_llama_cpp_generates_peftunes_texts_from_the_f32_gguf(trained):
    """Greedy, the run's repetition penalty over prompt and output (the card's
    `--repeat-last-n -1`), on every test and validation document."""
    adapter, prompts, texts, tokenizer, out = trained
    path = export(adapter, out / "gguf-f32", fmt="gguf", dtype="f32").path
    assert _llama_cpp_texts(path, prompts, tokenizer) == texts


@needs_llama_cpp
def test_llama_cpp_base_plus_gguf_lora_gives_the_merged_text(trained):
    adapter, prompts, texts, tokenizer, out = trained
    done = export(adapter, out / "lora-run", fmt="gguf-lora", dtype="f32")
    assert _llama_cpp_texts(done.lora_base, prompts, tokenizer, lora=done.path) == texts
    assert _llama_cpp_texts(done.lora_base, prompts, tokenizer) != texts  # the LoRA matters


@needs_llama_cpp
def test_a_gguf_export_checks_its_parity_in_llama_cpp(trained, capsys):
    adapter, *_, out = trained
    assert main(["-q", "export", str(adapter), "--format", "gguf", "--dtype", "f32", "--out",
                 str(out / "gguf-parity"), "--parity", "strict"]) == 0
    assert re.search(r"^parity \(llama\.cpp, 4 validation documents\): 4/4 identical",
                     capsys.readouterr().out, re.M)


@needs_llama_cpp
def test_a_prompt_beyond_llama_cpps_context_is_refused_not_cut(trained):
    adapter, prompts, _, tokenizer, out = trained
    path = export(adapter, out / "gguf-ctx", fmt="gguf", dtype="f32").path
    with pytest.raises(PeftuneError, match="do not fit llama.cpp's context of"):
        llamacpp.greedy(llamacpp.load(path, n_ctx=32), [prompts[0] * 4], max_new_tokens=8,
                        repetition_penalty=1.0, stop=set())

