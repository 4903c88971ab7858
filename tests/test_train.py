import dataclasses
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peftune import config_from_dict, models
from peftune.assembly import prepare, wrap
from peftune.config import EvalConfig
from peftune.data import Collator
from peftune.generation import generate, prompts_of
from peftune.metrics import rouge, split_sentences
from peftune.train import fit, run


def _assembled(cfg, *, live: bool = False):
    """The prepared data and the tiny model wrapped as training wraps it; ``live``: its
    first LoRA B drawn non-zero, so gradients flow to A as well."""
    tok = models.load_tokenizer(cfg.model)
    base = models.load_model(models.resolve(cfg.model), pad_token_id=tok.pad_token_id)
    data = prepare(cfg, tok)
    model = wrap(base, cfg)
    if live:
        torch.nn.init.normal_(model.base_model.model.model.layers[0].self_attn.q_proj
                              .lora_B["default"].weight)
    return data, model


def test_train_save_load_in_plain_peft_gives_same_logits(tiny_cfg, tiny_model_dir):
    result = run(config_from_dict(tiny_cfg))
    assert result.metrics["train_loss"] > 0 and "eval_loss" in result.metrics
    files = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    batch = Collator(pad_id=1)([{"input_ids": [5, 6, 7, 8, 9]}, {"input_ids": [10, 11]}])
    model = result.model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        loaded = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
        got = loaded(**batch).logits
    torch.testing.assert_close(got, expected)
    with loaded.disable_adapter(), torch.no_grad():
        assert not torch.allclose(loaded(**batch).logits, expected), "adapter had no effect"


def _adapter_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    import shutil

    tiny_cfg["train"].update(max_steps=6, save_steps=1)
    tiny_cfg["lora"] = {"dropout": 0.1}
    run(config_from_dict(tiny_cfg))
    run_dir = tmp_path / "run"
    straight = _adapter_weights(run_dir)
    # a crash after step 5 (in epoch 2): the last checkpoint and the adapter were never written
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-6")
    shutil.rmtree(run_dir / "adapter")
    run(config_from_dict(tiny_cfg))
    resumed = _adapter_weights(run_dir)
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=0)


def test_generation_strips_prompt_and_sorts_by_length(tiny_cfg):
    from peftune.config import ModelConfig

    cfg = config_from_dict(tiny_cfg)
    model_cfg = ModelConfig(name=tiny_cfg["model"]["name"])
    tok = models.load_tokenizer(model_cfg)
    model = models.load_model(models.resolve(model_cfg), pad_token_id=tok.pad_token_id)
    data = prepare(cfg, tok, roles=("test",))
    prompts = prompts_of(data.splits["test"])
    settings = EvalConfig(batch_size=3, max_new_tokens=5)
    batched = generate(model, tok, prompts, settings, progress=False)
    one = EvalConfig(batch_size=1, max_new_tokens=5)
    single = [generate(model, tok, [p], one, progress=False)[0]
              for p in prompts]
    assert batched == single  # left padding and re-ordering change nothing
    prompt_text = tok.decode(prompts[0], skip_special_tokens=True)
    assert not batched[0].startswith(prompt_text[:20])
    assert all(len(out.split()) <= 5 for out in batched)


# Multi-sentence pairs where sentence order, stemming and repeated words matter, so the mean
# over documents differs from any single document's score.
ROUGE_PAIRS = [
    ("The cats ran home. They were tired.", "The cat runs home. It was tired!"),
    ("Results improve with data. The method is simple. We release code.",
     "We release the code. The simple method improves results with more data."),
    ("B b b. A a a.", "A a a. B b b."),
    ("Nothing in common here.", "Completely different words appear."),
    ("A model of data. A model of the data? 3 results follow.",
     "The model of data gives 3 results. A model."),
]


def test_rouge_equals_rouge_scores_own_on_multi_sentence_pairs():
    from rouge_score import rouge_scorer

    preds, refs = [p for p, _ in ROUGE_PAIRS], [r for _, r in ROUGE_PAIRS]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"],
                                      use_stemmer=True)
    per_doc = [scorer.score(r, p) for p, r in zip(preds, refs, strict=True)]
    # rougeLsum is defined on one sentence per line
    lsum = [scorer.score(r.replace(". ", ".\n").replace("! ", "!\n").replace("? ", "?\n"),
                         p.replace(". ", ".\n").replace("! ", "!\n").replace("? ", "?\n"))
            for p, r in zip(preds, refs, strict=True)]
    expected = {k: 100 * sum(s[k].fmeasure for s in per_doc) / len(per_doc)
                for k in ("rouge1", "rouge2", "rougeL")}
    expected["rougeLsum"] = 100 * sum(s["rougeLsum"].fmeasure for s in lsum) / len(lsum)
    got = rouge(preds, refs)
    assert got == pytest.approx(expected, abs=1e-4)
    assert len({round(v, 2) for v in got.values()}) == 4  # four different numbers
    assert expected["rougeLsum"] > expected["rougeL"]  # sentence order matters to L only
    # stemming: "cats"/"cat", "ran"/"runs" differ only without it
    plain = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False).score(refs[0], preds[0])
    assert 100 * per_doc[0]["rouge1"].fmeasure > 100 * plain["rouge1"].fmeasure + 5
    assert rouge(["a b c"], ["a b c"]) == dict.fromkeys(("rouge1", "rouge2", "rougeL",
                                                          "rougeLsum"), 100.0)
    assert split_sentences("One fact. Two facts! three") == "One fact.\nTwo facts! three"


def test_summary_only_loss_equals_the_models_own_loss_and_gradients(tiny_cfg, tmp_path):
    from peftune.train import PeftuneTrainer, build_trainer

    cfg = config_from_dict(tiny_cfg)
    data, peft_model = _assembled(cfg, live=True)
    trainer = build_trainer(cfg, peft_model, data, output_dir=tmp_path / "ckpt")
    assert isinstance(trainer, PeftuneTrainer)
    batch = data.collator([data.splits["train"][i] for i in range(4)])
    params = [p for p in peft_model.parameters() if p.requires_grad]

    def loss_and_grads(loss_fn):
        peft_model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    peft_model.eval()  # no dropout: both paths see the same network
    fast, fast_grads = loss_and_grads(lambda: trainer.compute_loss(peft_model, dict(batch)))
    plain, plain_grads = loss_and_grads(lambda: peft_model(**batch).loss)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    n = (batch["labels"][:, 1:] != -100).sum()
    scaled = trainer.compute_loss(peft_model, dict(batch), num_items_in_batch=2 * n)
    torch.testing.assert_close(scaled, plain / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not __import__("peftune.devices").devices.bf16_supported(),
                    reason="this CPU has no bf16 arithmetic (AVX512-BF16 or AMX): precision "
                           "auto resolves to fp32 here")
def test_default_precision_trains_in_bf16_with_the_models_own_loss(tiny_cfg, tmp_path):
    """precision auto, what shipped configs use: the Trainer autocasts to bf16, and the
    summary-only loss equals the model's own loss under that same autocast."""
    from peftune.train import build_trainer

    del tiny_cfg["train"]["precision"]
    cfg = config_from_dict(tiny_cfg)
    assert cfg.train.precision == "auto"
    data, peft_model = _assembled(cfg, live=True)
    trainer = build_trainer(cfg, peft_model, data, output_dir=tmp_path / "ckpt")
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.summary_loss
    batch = data.collator([data.splits["train"][i] for i in range(4)])
    peft_model.eval()
    with torch.no_grad():
        full = peft_model(**batch).loss
        with trainer.accelerator.autocast():
            assert peft_model(**batch).logits.dtype == torch.bfloat16  # autocast is on
            fast = trainer.compute_loss(peft_model, dict(batch))
            own = peft_model(**batch).loss
    # the same bf16 matmuls on fewer rows: equal up to bf16 rounding (8 bits of mantissa)
    torch.testing.assert_close(fast, own, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(fast, full, rtol=2e-2, atol=1e-2)
    # and the real loop: a few bf16 steps lower the loss on the training rows
    cfg.train = dataclasses.replace(cfg.train, max_steps=6, eval_each_epoch=False)
    peft_model.train()
    metrics = fit(cfg, peft_model, data, output_dir=tmp_path / "ckpt2")
    peft_model.eval()
    with torch.no_grad(), trainer.accelerator.autocast():
        after = trainer.compute_loss(peft_model, dict(batch))
    assert math.isfinite(metrics["train_loss"]) and after < fast


def _head_rows(model):
    """Rows the LM head of ``model`` projects, one entry per call."""
    rows = []
    model.get_base_model().lm_head.register_forward_hook(
        lambda module, args, output: rows.append(args[0].shape[:-1].numel()))
    return rows


def test_summary_only_loss_projects_only_the_labelled_positions(tiny_cfg, tmp_path):
    from peftune.train import build_trainer

    cfg = config_from_dict(tiny_cfg)
    data, peft_model = _assembled(cfg)
    trainer = build_trainer(cfg, peft_model, data, output_dir=tmp_path / "ckpt")
    batch = data.collator([data.splits["train"][i] for i in range(4)])
    rows = _head_rows(peft_model)
    # through the engine's own call: the mask is an input of the model's forward
    trainer.compute_loss(trainer.model_wrapped, dict(batch))
    assert rows == [int((batch["labels"][:, 1:] != -100).sum())]
    assert rows[0] < batch["labels"].numel() / 2


def test_adalora_keeps_its_orthogonality_penalty_on_the_summary_path(tiny_cfg, tmp_path):
    from peftune.train import build_trainer

    tiny_cfg.update(method="adalora", adalora={"dropout": 0.0, "total_step": 10})
    cfg = config_from_dict(tiny_cfg)
    data, peft_model = _assembled(cfg)
    trainer = build_trainer(cfg, peft_model, data, output_dir=tmp_path / "ckpt")
    batch = data.collator([data.splits["train"][i] for i in range(4)])
    peft_model.eval()
    rows = _head_rows(peft_model)
    with torch.no_grad():
        fast = trainer.compute_loss(peft_model, dict(batch))
        own = peft_model(**batch).loss  # AdaLoraModel.forward adds the penalty
        bare = peft_model.base_model.model(**batch).loss  # the penalty bypassed
    assert rows[0] < rows[1]  # the summary path did run
    torch.testing.assert_close(fast, own, rtol=1e-5, atol=1e-6)
    assert fast - bare > 1e-3


def test_generation_halves_a_batch_that_runs_out_of_memory(tiny_cfg, monkeypatch, caplog):

    cfg = config_from_dict(tiny_cfg)
    tok = models.load_tokenizer(cfg.model)
    model = models.load_model(models.resolve(cfg.model), pad_token_id=tok.pad_token_id)
    prompts = prompts_of(prepare(cfg, tok, roles=("test",)).splits["test"])
    settings = EvalConfig(batch_size=4, max_new_tokens=5)
    expected = generate(model, tok, prompts, settings, progress=False)
    plain, widths = model.generate, []

    def fits_two(**kwargs):
        widths.append(kwargs["input_ids"].shape[0])
        if widths[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return plain(**kwargs)

    monkeypatch.setattr(model, "generate", fits_two)
    with caplog.at_level("WARNING", logger="peftune"):
        got = generate(model, tok, prompts, settings, progress=False)
    assert got == expected
    assert widths == [4, 2, 2] and "retrying with 2" in caplog.text


def _tiny_lora_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, init_lora_weights=False))


def _onednn_packs_bf16():
    """Whether this torch build can pack a bf16 weight for oneDNN (what half_precision uses
    on a CPU); builds without oneDNN, or without its bf16 kernels, generate unpacked."""
    if not (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(4, 8, dtype=torch.bfloat16))
    except RuntimeError:
        return False
    return True


needs_onednn = pytest.mark.skipif(not _onednn_packs_bf16(),
                                  reason="this torch build cannot pack bf16 weights for oneDNN")


@needs_onednn
def test_half_precision_matches_a_bf16_copy_and_puts_the_fp32_weights_back():
    import copy

    from peftune.fast_generation import half_precision

    model = _tiny_lora_llama().eval()
    inner = model.base_model.model
    reference = copy.deepcopy(model)  # the plain 16-bit model (buffers stay fp32)
    for param in reference.parameters():
        param.data = param.data.to(torch.bfloat16)
    before = dict(model.named_parameters())
    ids = torch.randint(2, 50, (2, 7))
    with torch.inference_mode():
        expected = reference(input_ids=ids).logits
        with half_precision(model, "bf16"):
            assert inner.lm_head.weight is inner.model.embed_tokens.weight  # still tied
            assert inner.lm_head.weight.dtype == torch.bfloat16
            assert "forward" in vars(inner.model.layers[0].mlp.up_proj)  # packed for oneDNN
            fast = model(input_ids=ids).logits
    assert torch.equal(fast, expected)
    after = dict(model.named_parameters())
    assert all(after[n] is p and p.dtype == torch.float32 for n, p in before.items())
    assert "forward" not in vars(inner.model.layers[0].mlp.up_proj)
    assert inner.model.rotary_emb.inv_freq.dtype == torch.float32
    with half_precision(model, "bf16", restore=False):  # a model done training keeps them
        pass
    assert inner.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, expected)


@needs_onednn
def test_packed_linear_falls_back_where_it_cannot_apply():
    from peftune.fast_generation import half_precision

    layer = torch.nn.Linear(8, 4)
    with half_precision(layer, "bf16"):
        assert "forward" in vars(layer)
        x = torch.randn(3, 8, dtype=torch.bfloat16)
        plain = torch.nn.functional.linear(x, layer.weight, layer.bias)
        with torch.inference_mode():
            assert torch.equal(layer(x), plain)
        assert torch.equal(layer(x), plain)  # grad enabled: the plain forward


def test_growing_cache_gives_the_default_caches_keys_and_texts():
    from transformers import DynamicCache

    from peftune.fast_generation import growing_cache

    model = _tiny_lora_llama().eval()
    ids = torch.randint(2, 50, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 150,
              "do_sample": False, "return_dict_in_generate": True}
    with torch.inference_mode():
        plain = model.generate(**kwargs, cache=DynamicCache())
        grown = model.generate(**kwargs, cache=growing_cache())
    assert torch.equal(plain.sequences, grown.sequences)  # 156 tokens: the room grew once
    for a, b in zip(plain.cache.layers, grown.cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    layer = grown.cache.layers[0]
    assert type(layer).__name__ == "GrowingLayer"
    with torch.inference_mode():
        layer.crop(-5)
        keys = layer.keys.clone()
        layer.update(torch.ones(3, 2, 1, 16), torch.ones(3, 2, 1, 16))
        assert torch.equal(layer.keys[:, :, :-1], keys)
        assert layer.keys.shape[-2] == keys.shape[-2] + 1
        layer.batch_select_indices(torch.tensor([2, 0]))  # a new tensor: a new buffer from it
        layer.update(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16))
    assert torch.equal(layer.keys[:, :, :-2], keys[[2, 0]]) and layer.keys.shape[0] == 2


def test_prompts_prefilled_one_by_one_continue_like_a_padded_batch():
    from peftune.fast_generation import prefilled_cache

    model = _tiny_lora_llama().eval()
    prompts = [torch.randint(2, 50, (n,)) for n in (9, 4, 6)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, 9 - len(prompt):], mask[row, 9 - len(prompt):] = prompt, 1
    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 8,
              "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.inference_mode():
        padded = model.generate(**kwargs)
        cache = prefilled_cache(model, prompts, width=9)
        assert cache.get_seq_length() == 8
        prefilled = model.generate(**kwargs, cache=cache)
        assert prefilled_cache(model, [torch.tensor([5]), prompts[0]], width=9) is None
    assert torch.equal(padded.sequences, prefilled.sequences)
    for a, b in zip(padded.logits, prefilled.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_micro_batch_splits_each_step_s_examples_without_changing_them(tiny_cfg):
    """Length grouping is by optimizer step, so a step trains on the same examples whatever
    the micro-batch, and the results agree (the out-of-memory retry and
    ``micro_batch_size: auto`` rely on it)."""
    from peftune.train import build_trainer

    tiny_cfg["train"].update(batch_size=4, max_steps=3, group_by_length=True)
    tiny_cfg["lora"] = {"dropout": 0.0}
    steps, results = {}, {}
    for micro in (1, 2, 4):
        tiny_cfg["train"]["micro_batch_size"] = micro
        cfg = config_from_dict(tiny_cfg)
        tok = models.load_tokenizer(cfg.model)
        base = models.load_model(models.resolve(cfg.model), pad_token_id=tok.pad_token_id)
        data = prepare(cfg, tok)
        order = list(build_trainer(cfg, wrap(base, cfg), data,
                                   output_dir=Path(cfg.output_dir) / "x")._get_train_sampler())
        steps[micro] = [sorted(order[i:i + 4]) for i in range(0, len(order), 4)]
        base = models.load_model(models.resolve(cfg.model), pad_token_id=tok.pad_token_id)
        model = wrap(base, cfg)
        metrics = fit(cfg, model, data, output_dir=Path(cfg.output_dir) / f"m{micro}")
        results[micro] = (metrics["train_loss"],
                          {k: v.detach().clone() for k, v in model.named_parameters()
                           if v.requires_grad})
    assert steps[1] == steps[2] == steps[4]
    for micro in (1, 2):
        assert results[micro][0] == pytest.approx(results[4][0], rel=1e-5)
        for name, param in results[micro][1].items():
            torch.testing.assert_close(param, results[4][1][name], atol=1e-6, rtol=1e-5)


def test_split_by_tokens_keeps_every_row_once_within_the_budget():
    from peftune.train import split_by_tokens

    rows = [list(range(1, 11)), [1, 2, 3], [4, 5, 6, 7], [8, 9]]
    batch = Collator(pad_id=0)([{"input_ids": r, "labels": r} for r in rows])
    assert split_by_tokens(batch, 40) == [batch]  # 4 rows x 10 tokens: within the budget
    parts = split_by_tokens(batch, 12)
    # the 10-token row alone; the other three at 4 tokens each make 12
    assert [p["input_ids"].shape for p in parts] == [(1, 10), (3, 4)]
    got = [[t for t in row if t] for p in parts for row in p["input_ids"].tolist()]
    assert got == [rows[0], rows[1], rows[2], rows[3]]  # each once, batch order in a part
    for part in parts:
        assert torch.equal(part["labels"] != -100, part["attention_mask"].bool())
    assert [p["input_ids"].shape[0] for p in split_by_tokens(batch, 1)] == [1, 1, 1, 1]


def test_a_step_over_the_token_budget_trains_in_parts_with_the_same_gradients(tiny_cfg,
                                                                             tmp_path):
    """The step with one long row runs as several smaller forward passes; its loss and
    gradients are the whole micro-batch's (the loss is summed over the step's labels)."""
    from peftune.train import build_trainer

    tiny_cfg["lora"] = {"dropout": 0.0}
    cfg = config_from_dict(tiny_cfg)
    data, model = _assembled(cfg, live=True)
    rows = [{k: data.splits["train"][i][k] for k in ("input_ids", "labels")}
            for i in range(4)]
    rows[1] = {k: v * 6 for k, v in rows[1].items()}  # one row six times as long
    batch = data.collator(rows)
    longest = int(batch["attention_mask"].sum(1).max())
    n = (batch["labels"][:, 1:] != -100).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    results, shapes = {}, {}
    hook = model.get_base_model().model.embed_tokens.register_forward_hook(
        lambda mod, args, out: shapes[budget].append(tuple(args[0].shape)))
    for budget in (None, longest):
        shapes[budget] = []
        trainer = build_trainer(cfg, model, data, output_dir=tmp_path / "ckpt",
                                token_budget=budget)
        model.zero_grad()
        loss = trainer.training_step(model, dict(batch), num_items_in_batch=n)
        results[budget] = loss, [p.grad.clone() for p in params]
    hook.remove()
    assert shapes[None] == [(4, longest)]
    assert shapes[longest][0] == (1, longest) and len(shapes[longest]) == 2
    assert sum(s[0] for s in shapes[longest]) == 4
    torch.testing.assert_close(results[longest][0], results[None][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[longest][1], results[None][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _scripted_rouge(monkeypatch, values):
    """ROUGE-L of the signal rows: the next of ``values`` at each evaluation."""
    from peftune import train as training

    calls = []

    def fake(model, tokenizer, ds, settings, **kwargs):
        calls.append({"rows": len(ds)})
        value = values[min(len(calls), len(values)) - 1]
        return {"rouge1": value, "rouge2": value, "rougeL": value, "rougeLsum": value}

    monkeypatch.setattr(training, "score", fake)
    return calls


def test_early_stopping_on_rouge_stops_when_rouge_stops_improving(tiny_cfg, monkeypatch):
    tiny_cfg["train"].update(max_steps=10, eval_steps=1, early_stopping=2, signal_examples=3)
    calls = _scripted_rouge(monkeypatch, [10.0, 20.0, 20.0, 15.0, 30.0])
    result = run(config_from_dict(tiny_cfg))
    # best 20 at step 2, no better at steps 3 and 4: two evaluations without improvement
    assert result.metrics["stopped_early_at"] == 4 and len(calls) == 4
    assert result.metrics["eval_slice_rougeL"] == 15.0
    assert all(c["rows"] == 3 for c in calls)


def test_early_stopping_on_loss_generates_nothing(tiny_cfg, monkeypatch):
    from peftune.train import training_args, watched

    tiny_cfg["train"].update(max_steps=4, eval_steps=1, early_stopping=1,
                             early_stopping_signal="loss")
    calls = _scripted_rouge(monkeypatch, [0.0])
    cfg = config_from_dict(tiny_cfg)
    assert watched(cfg) == "eval_loss"
    args = training_args(dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, micro_batch_size=2)), output_dir=Path(cfg.output_dir), has_eval=True)
    assert args.metric_for_best_model == "eval_loss" and args.greater_is_better is False
    result = run(cfg)
    assert calls == [] and "eval_slice_rougeL" not in result.metrics
    assert "eval_loss" in result.metrics


def test_rouge_at_evaluations_leaves_training_as_it_was(tiny_cfg, tmp_path):
    # dropout on: a model left in eval mode, or random numbers drawn by generation, would
    # give other weights than a run that never generates
    tiny_cfg["train"].update(max_steps=4, eval_steps=1)
    tiny_cfg["lora"] = {"dropout": 0.3}
    plain = run(config_from_dict(tiny_cfg)).model
    tiny_cfg["train"].update(early_stopping=100, signal_examples=2)
    tiny_cfg["output_dir"] = str(tmp_path / "watched")
    result = run(config_from_dict(tiny_cfg))
    assert 0 <= result.metrics["eval_slice_rougeL"] <= 100
    assert "stopped_early_at" not in result.metrics
    want = {k: v for k, v in plain.named_parameters() if v.requires_grad}
    for name, param in result.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, want[name], atol=0, rtol=0)


def test_early_stopping_on_rouge_trains_an_encoder_decoder(tiny_cfg, tiny_t5_dir):
    tiny_cfg["model"]["name"] = str(tiny_t5_dir)
    tiny_cfg["train"].update(max_steps=3, eval_steps=1, early_stopping=5, signal_examples=2)
    result = run(config_from_dict(tiny_cfg))
    assert 0 <= result.metrics["eval_slice_rougeL"] <= 100 and result.metrics["train_loss"] > 0


@pytest.mark.parametrize(("data", "message"), [
    ({"train": {"early_stopping": -1}}, r"train.early_stopping must be in \[0, "),
    ({"train": {"early_stopping": 2, "eval_each_epoch": False}},
     "train.early_stopping needs evaluations: set train.eval_steps"),
    ({"train": {"early_stopping_signal": "bleu"}}, "train.early_stopping_signal must be one of"),
    ({"train": {"signal_examples": 0}}, r"train.signal_examples must be in \[1, "),
])
def test_bad_early_stopping_options_name_the_flag(data, message):
    from peftune.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)
