"""The prompt peftune trains and scores on is the one serving stacks send.

vLLM, TGI, llama.cpp's chat API and transformers pipelines all build the prompt with the
tokenizer's chat template; these tests rebuild it that way, from text alone, and compare
token ids with what ``peftune train``/``evaluate``/``summarize`` use.
"""

import datasets
import pytest

from peftune.assembly import prepare
from peftune.config import config_from_dict
from peftune.data import PromptFormat, tokenize
from peftune.models import prompt_format
from tests.conftest import make_bpe_tokenizer, make_rows, make_tokenizer

INSTRUCTION = "Summarize the following text."


def client_ids(tok, document: str) -> list[int]:
    """What a client that never heard of peftune sends for ``document``."""
    messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{document}"}]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


def client_truncate(tok, document: str, max_tokens: int) -> str:
    ids = tok(document, add_special_tokens=False)["input_ids"]
    return tok.decode(ids[:max_tokens]) if len(ids) > max_tokens else document


def trained_prompts(tok, documents: list[str], max_tokens: int) -> list[list[int]]:
    fmt = PromptFormat.for_tokenizer(tok, INSTRUCTION)
    rows = [{"id": str(i), "document": d, "summary": "a ."} for i, d in enumerate(documents)]
    ds = tokenize(datasets.Dataset.from_list(rows), tok, fmt, max_tokens)
    return [ids[:n] for ids, n in zip(ds["input_ids"], ds["prompt_len"], strict=True)]


@pytest.mark.parametrize("make", [make_tokenizer, make_bpe_tokenizer], ids=["wordlevel", "bpe"])
def test_prompt_ids_equal_the_chat_template_of_the_truncated_document(make):
    tok = make(chat=True) if make is make_tokenizer else make()
    docs = [r["document"] for r in make_rows(40, seed=3)] + ["alpha\n\nbeta  gamma\n", "pi ."]
    max_tokens = 16
    prompts = trained_prompts(tok, docs, max_tokens)
    truncated = 0
    for doc, ids in zip(docs, prompts, strict=True):
        text = client_truncate(tok, doc, max_tokens)
        truncated += text != doc
        assert ids == client_ids(tok, text)
    assert truncated >= 10  # the comparison covers documents that were cut


def test_plain_template_without_a_chat_template_is_reproducible_from_text():
    tok = make_tokenizer(chat=False)
    fmt = PromptFormat.for_tokenizer(tok, INSTRUCTION)
    doc = make_rows(1)[0]["document"]
    text = f"{INSTRUCTION}\n\n{doc}\n\nSummary:\n"
    assert fmt.text(doc) == text
    expected = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert trained_prompts(tok, [doc], 512) == [expected]


def test_summarize_and_evaluate_build_the_same_prompt(tiny_cfg):
    cfg = config_from_dict(tiny_cfg)
    data = prepare(cfg, roles=("test",))
    ds = data.splits["test"]
    fmt = prompt_format(cfg, data.tokenizer)
    prompts, _ = fmt.prompts(ds["document"], cfg.data.max_source_tokens)
    assert prompts == [ids[:n] for ids, n in zip(ds["input_ids"], ds["prompt_len"],
                                                 strict=True)]


@pytest.mark.slow
def test_embedded_tokenizer_and_data_match_apply_chat_template():
    """SmolLM2's template: the '\\n\\n' after the instruction stays two tokens, as the
    template tokenizes it, for every test abstract (some cut at 96 tokens)."""
    cfg = config_from_dict({"data": {"max_source_tokens": 96}})
    data = prepare(cfg, roles=("test",))
    tok, ds = data.tokenizer, data.splits["test"]
    assert sum(ds["truncated"]) > 0
    for doc, ids, n in zip(ds["document"], ds["input_ids"], ds["prompt_len"], strict=True):
        text = client_truncate(tok, doc, 96)
        messages = [{"role": "user", "content": f"{cfg.data.instruction}\n\n{text}"}]
        assert ids[:n] == list(tok.apply_chat_template(
            messages, add_generation_prompt=True)["input_ids"])
