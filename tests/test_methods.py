"""Every PEFT method x {tiny LLaMA, tiny T5 where peft supports it}: it trains, it saves and
loads, it merges (or says it cannot), and it generates what its own forward pass predicts."""

import pytest
import torch
from peft import PeftModel
from transformers import GPT2Config, GPT2LMHeadModel

from peftune import config_from_dict, models
from peftune.errors import ConfigError
from peftune.evaluate import generate, prompts_of
from peftune.methods import get_method, registry
from peftune.methods.adalora import RankBudget
from peftune.train import build_trainer, load_base, prepare, run, wrap

CASES = [pytest.param(name, arch, id=f"{name}-{arch}") for name, method in registry().items()
         for arch in ("llama", "t5") if arch == "llama" or method.seq2seq]


@pytest.fixture
def model_dirs(tiny_model_dir, tiny_t5_dir):
    return {"llama": tiny_model_dir, "t5": tiny_t5_dir}


def _config(tiny_cfg, model_dir, method, **options):
    tiny_cfg.update(method=method, **({method: options} if options else {}))
    tiny_cfg["model"]["name"] = str(model_dir)
    return config_from_dict(tiny_cfg)


def _loss(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def _logits(model, batch):
    """Logits without labels (an AdaLoRA adapter loaded for inference cannot take them)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if model.config.is_encoder_decoder:
        labels = batch["labels"].masked_fill(batch["labels"] == -100, model.config.pad_token_id)
        start = torch.full_like(labels[:, :1], model.config.decoder_start_token_id)
        inputs["decoder_input_ids"] = torch.cat([start, labels[:, :-1]], dim=1)
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _greedy_by_forward(model, tokenizer, prompt, max_new_tokens):
    """Greedy decoding with a full forward pass per token: no KV cache, no generate()."""
    model.eval()
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if model.config.is_encoder_decoder:
                start = [model.config.decoder_start_token_id]
                logits = model(input_ids=torch.tensor([prompt]),
                               decoder_input_ids=torch.tensor([start + new])).logits
            else:
                logits = model(input_ids=torch.tensor([prompt + new])).logits
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("name,arch", CASES)
def test_method_trains_saves_loads_merges_and_generates(name, arch, tiny_cfg, model_dirs,
                                                        tmp_path):
    cfg = _config(tiny_cfg, model_dirs[arch], name)
    method = get_method(name)
    tokenizer = models.load_tokenizer(cfg.model)
    data = prepare(cfg, tokenizer, seq2seq=arch == "t5", roles=("train", "test"))
    batch = data.collator([data.splits["train"][i] for i in range(4)])
    model = wrap(load_base(cfg, tokenizer), cfg)

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == model.get_nb_trainable_parameters()[0] > 0

    before = _loss(model, batch)
    optimizer = torch.optim.AdamW(trainable, lr=max(method.learning_rate, 1e-2))
    for _ in range(6):
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert _loss(model, batch) < before

    expected = _logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_base(cfg, tokenizer), str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(loaded, batch), expected)

    prompts = prompts_of(data.splits["test"])[:3]
    generated = generate(model, tokenizer, prompts, batch_size=3, max_new_tokens=4,
                         progress=False)
    assert generated == [_greedy_by_forward(model, tokenizer, p, 4) for p in prompts]

    full = models.load_model(cfg.model, pad_token_id=tokenizer.pad_token_id)
    unmerged = PeftModel.from_pretrained(full, str(tmp_path / "adapter"))
    if method.mergeable:
        before_merge = _logits(unmerged, batch)
        torch.testing.assert_close(_logits(method.merge(unmerged), batch), before_merge,
                                   atol=1e-4, rtol=1e-4)
    else:
        with pytest.raises(ConfigError, match=f"'{name}' cannot be merged"):
            method.merge(unmerged)
