"""Tiny random models and data built on the fly: no downloads, seconds per test."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

# Tiny matrices gain nothing from a second thread, and on a busy machine OpenMP threads
# waiting for each other make every op hundreds of times slower.
torch.set_num_threads(1)


def _process_globals() -> dict[str, object]:
    """What transformers, accelerate and torch patch while they build a model and must put
    back: a test that leaves one patched breaks every later model in the run."""
    return {"PreTrainedModel.tie_weights": PreTrainedModel.tie_weights,
            "PreTrainedModel.init_weights": PreTrainedModel.init_weights,
            "Module.register_parameter": torch.nn.Module.register_parameter,
            "Module.register_buffer": torch.nn.Module.register_buffer,
            "default dtype": torch.get_default_dtype(),
            "default device": torch.get_default_device()}


@pytest.fixture(autouse=True)
def _globals_restored():
    before = _process_globals()
    yield
    changed = [name for name, value in _process_globals().items() if value != before[name]]
    assert not changed, f"this test left process-wide state patched: {', '.join(changed)}"


WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega the a of and model data result method").split()
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def make_tokenizer(*, chat: bool = False, pad_is_eos: bool = False) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(WORDS)) + list(".,:!?"))}
    vocab.update({w: len(vocab) + i for i, w in enumerate(["Summarize", "following", "text",
                                                          "Summary", "summarize"])})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="</s>" if pad_is_eos else "<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def make_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=2, eos_token_id=3,
                         pad_token_id=1)
    return LlamaForCausalLM(config)


def make_t5(vocab_size: int, seed: int = 0) -> T5ForConditionalGeneration:
    """Pad (1) starts the decoder, as in T5; no dropout, so losses are comparable."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                      num_decoder_layers=2, num_heads=4, dropout_rate=0.0, pad_token_id=1,
                      eos_token_id=3, decoder_start_token_id=1)
    return T5ForConditionalGeneration(config)


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(12, 30))]
        rows.append({"id": f"doc{i}", "document": " ".join(words) + " .",
                     "summary": " ".join(words[:4]) + " ."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny LLaMA + tokenizer folder, usable as --model.name."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer(chat=True, pad_is_eos=True)
    make_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny T5 (encoder-decoder) + tokenizer folder, usable as --model.name."""
    path = tmp_path_factory.mktemp("tiny-t5")
    tok = make_tokenizer()
    make_t5(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-data")
    rows = make_rows(20)
    write_jsonl(path / "train.jsonl", rows[:12])
    write_jsonl(path / "validation.jsonl", rows[12:16])
    write_jsonl(path / "test.jsonl", rows[16:])
    return path


@pytest.fixture
def tiny_cfg(tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> dict:
    """A config dict for a seconds-long run on the tiny model and data."""
    return {
        "output_dir": str(tmp_path / "run"),
        "data": {"source": str(tiny_data_dir), "max_source_tokens": 24},
        "model": {"name": str(tiny_model_dir)},
        "train": {"max_steps": 3, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-2,
                  "logging_steps": 1, "precision": "fp32"},
        "eval": {"max_new_tokens": 8, "batch_size": 4},
    }


def bpe_adapter_config(model_dir: Path, data_dir: Path, out: Path) -> dict:
    """A seconds-long LoRA run (all linear layers, fp32) on the byte-level BPE tiny LLaMA,
    which exports to GGUF: the export tests' trained adapter."""
    return {
        "output_dir": str(out / "run"),
        "data": {"source": str(data_dir), "max_source_tokens": 24},
        "model": {"name": str(model_dir)}, "lora": {"target_modules": ["all-linear"]},
        "train": {"max_steps": 3, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 5e-2,
                  "precision": "fp32", "eval_each_epoch": False},
    }


def make_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE tokenizer (what GGUF's 'gpt2' tokenizer model holds),
    trained in milliseconds on the fixture words; the WordLevel one has no GGUF form."""
    from tokenizers import decoders, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) + " . Summarize the following text. Summary:"
              for i in range(len(WORDS))]
    core.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tiny_bpe_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny LLaMA with a byte-level BPE tokenizer: exportable to GGUF."""
    path = tmp_path_factory.mktemp("tiny-llama-bpe")
    tok = make_bpe_tokenizer()
    make_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path
