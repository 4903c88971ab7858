import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peftune import config_from_dict
from peftune.config import EvalConfig
from peftune.data import Collator
from peftune.evaluate import generate, prompts_of, rouge, split_sentences
from peftune.train import run


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
    from peftune import models
    from peftune.config import ModelConfig
    from peftune.train import prepare

    cfg = config_from_dict(tiny_cfg)
    model, tok = models.load_base(ModelConfig(name=tiny_cfg["model"]["name"]))
    data = prepare(cfg, tok, seq2seq=False, roles=("test",))
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


def test_rouge_scale_stemming_and_lsum():
    assert rouge(["the cats ran"], ["the cat runs"])["rouge1"] > 60
    assert rouge(["a b c"], ["a b c"]) == dict.fromkeys(("rouge1", "rouge2", "rougeL",
                                                          "rougeLsum"), 100.0)
    assert split_sentences("One fact. Two facts! three") == "One fact.\nTwo facts! three"
    swapped = rouge(["B b b. A a a."], ["A a a. B b b."])
    assert swapped["rougeLsum"] > swapped["rougeL"]


def test_summary_only_loss_equals_the_models_own_loss_and_gradients(tiny_cfg, tmp_path):
    from peftune import models
    from peftune.train import PeftuneTrainer, build_trainer, prepare, wrap

    cfg = config_from_dict(tiny_cfg)
    model, tok = models.load_base(cfg.model)
    data = prepare(cfg, tok, seq2seq=False)
    peft_model = wrap(model, cfg)
    torch.nn.init.normal_(peft_model.base_model.model.model.layers[0].self_attn.q_proj
                          .lora_B["default"].weight)  # non-zero adapter: gradients flow to A
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


def test_16bit_linear_weights_give_autocasts_numbers_and_are_put_back():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftune.evaluate import linear_weights_in

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, init_lora_weights=False))
    model.eval()
    before = {name: p for name, p in model.named_parameters()}
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(input_ids=ids).logits
        with linear_weights_in(model, "bf16"):
            assert model.base_model.model.lm_head.weight.dtype == torch.bfloat16
            assert model.base_model.model.model.embed_tokens.weight.dtype == torch.float32
            cast_once = model(input_ids=ids).logits
    assert torch.equal(plain, cast_once)
    after = dict(model.named_parameters())
    assert all(after[n] is p and p.dtype == torch.float32 for n, p in before.items())
    assert model.base_model.model.lm_head.weight is model.base_model.model.model.embed_tokens.weight
    with linear_weights_in(model, "bf16", restore=False):  # a model done training keeps them
        pass
    assert model.base_model.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(plain, model(input_ids=ids).logits)
