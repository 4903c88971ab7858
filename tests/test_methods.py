"""Every PEFT method x {tiny LLaMA, tiny T5 where peft supports it}: it trains, it saves and
loads, it merges (or says it cannot), and it generates what its own forward pass predicts."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import GPT2Config, GPT2LMHeadModel

from peftune import config_from_dict, load_yaml, models
from peftune.assembly import load_base, prepare, wrap
from peftune.config import EvalConfig
from peftune.errors import ConfigError
from peftune.generation import generate, prompts_of
from peftune.methods import get_method, registry
from peftune.methods.adalora import RankBudget
from peftune.train import build_trainer, run

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
    data = prepare(cfg, tokenizer, roles=("train", "test"))
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
    settings = EvalConfig(batch_size=3, max_new_tokens=4, no_repeat_ngram_size=0)
    generated = generate(model, tokenizer, prompts, settings, progress=False)
    assert generated == [_greedy_by_forward(model, tokenizer, p, 4) for p in prompts]

    full = models.load_model(models.resolve(cfg.model), pad_token_id=tokenizer.pad_token_id)
    unmerged = PeftModel.from_pretrained(full, str(tmp_path / "adapter"))
    if method.mergeable:
        before_merge = _logits(unmerged, batch)
        torch.testing.assert_close(_logits(method.merge(unmerged), batch), before_merge,
                                   atol=1e-4, rtol=1e-4)
    else:
        with pytest.raises(ConfigError, match=f"'{name}' cannot be merged"):
            method.merge(unmerged)


def test_adalora_prunes_the_rank_budget_under_the_trainer(tiny_cfg, tiny_model_dir, tmp_path):
    tiny_cfg["train"].update(max_steps=6, eval_each_epoch=False)
    options = {"init_r": 4, "target_r": 1, "tinit": 0, "tfinal": 0}
    result = run(_config(tiny_cfg, tiny_model_dir, "adalora", **options))
    config = result.model.peft_config["default"]
    assert config.total_step == 6  # the run's real number of optimizer steps
    ranks = [sum(mask) for mask in config.rank_pattern.values()]
    assert len(ranks) == 4 and sum(ranks) <= len(ranks) * 1 < len(ranks) * 4
    # the pruned adapter loads at its pruned ranks and gives the same outputs
    cfg = config_from_dict(tiny_cfg)
    tokenizer = models.load_tokenizer(cfg.model)
    batch = prepare(cfg, tokenizer).collator(
        [{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9]}])
    loaded = PeftModel.from_pretrained(load_base(cfg, tokenizer), str(result.adapter_dir))
    torch.testing.assert_close(_logits(loaded, batch), _logits(result.model, batch))

    # control: the same run without the callback never prunes anything
    tiny_cfg["output_dir"] = str(tmp_path / "control")
    cfg = config_from_dict(tiny_cfg)
    data = prepare(cfg, tokenizer)
    model = wrap(load_base(cfg, tokenizer), cfg)
    trainer = build_trainer(cfg, model, data, output_dir=tmp_path / "control")
    trainer.remove_callback(RankBudget)
    trainer.train()
    assert model.peft_config["default"].rank_pattern is None


def test_adalora_schedule_must_leave_a_pruning_phase(tiny_cfg, tiny_model_dir):
    tiny_cfg["train"].update(max_steps=2, eval_each_epoch=False)
    with pytest.raises(ConfigError, match="leave no pruning phase in 2 steps"):
        run(_config(tiny_cfg, tiny_model_dir, "adalora", tinit=1, tfinal=1))


def test_llama_adapter_rejects_other_architectures(tiny_cfg, tiny_model_dir, tiny_t5_dir):
    cfg = _config(tiny_cfg, tiny_model_dir, "llama-adapter")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=48, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(ConfigError, match="needs a LLaMA-family model .* is 'gpt2'"):
        wrap(gpt2, cfg)
    t5 = models.load_model(models.resolve(_config(tiny_cfg, tiny_t5_dir, "llama-adapter").model))
    with pytest.raises(ConfigError, match="does not support encoder-decoder models"):
        wrap(t5, cfg)
    with pytest.raises(ConfigError, match=r"adapter_layers must be in \[1, 2\]"):
        wrap(load_base(cfg, models.load_tokenizer(cfg.model)),
             _config(tiny_cfg, tiny_model_dir, "llama-adapter", adapter_layers=3))


@pytest.mark.parametrize("data,message", [
    ({"ia3": {"target_modules": "k_proj,v_proj", "feedforward_modules": "down_proj"}},
     "ia3.feedforward_modules must be a subset of ia3.target_modules; down_proj"),
    ({"ptuning": {"encoder_reparameterization_type": "GRU"}},
     "ptuning.encoder_reparameterization_type must be one of MLP, LSTM"),
    ({"prompt": {"prompt_tuning_init": "vocab"}}, "prompt.prompt_tuning_init must be one of"),
    ({"adalora": {"init_r": 4, "target_r": 8}}, "adalora.target_r must be in"),
])
def test_bad_method_options_name_the_flag(data, message, tiny_cfg, tiny_model_dir):
    method = next(iter(data))
    with pytest.raises(ConfigError, match=message):
        cfg = config_from_dict({"method": method, "model": {"name": str(tiny_model_dir)},
                                **data})
        wrap(load_base(cfg, models.load_tokenizer(cfg.model)), cfg)


def test_ia3_defaults_follow_the_architecture(tiny_cfg, model_dirs):
    for arch, targets, feedforward in (("llama", {"k_proj", "v_proj", "down_proj"},
                                        {"down_proj"}), ("t5", {"k", "v", "wo"}, {"wo"})):
        cfg = _config(tiny_cfg, model_dirs[arch], "ia3")
        config = wrap(models.load_model(models.resolve(cfg.model)), cfg).peft_config["default"]
        assert set(config.target_modules) == targets
        assert set(config.feedforward_modules) == feedforward


def test_prompt_tuning_starts_from_the_instruction(tiny_cfg, tiny_model_dir):
    tiny_cfg["data"]["instruction"] = "Summarize the following text."
    cfg = _config(tiny_cfg, tiny_model_dir, "prompt", num_virtual_tokens=5)
    tokenizer = models.load_tokenizer(cfg.model)
    model = wrap(load_base(cfg, tokenizer), cfg)
    ids = tokenizer(cfg.data.instruction, add_special_tokens=False)["input_ids"]
    embeddings = model.get_input_embeddings().weight[ids[:5]]
    torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight, embeddings)


def test_the_demo_default_adapts_every_linear_layer(tiny_cfg, tiny_model_dir):
    """The demo's default LoRA, chosen by measurement (BENCHMARKS.md, the default
    configuration), reaches the MLP as well as attention, at its rank."""
    demo = load_yaml(Path(__file__).parents[1] / "configs" / "aclsum-smollm2-search.yaml")
    cfg = _config(tiny_cfg, tiny_model_dir, "lora", **demo["lora"])
    model = wrap(models.load_model(models.resolve(cfg.model)), cfg)
    adapted = {name.rsplit(".", 1)[-1]: module.r["default"]
               for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"), 16)


def test_lora_rslora_and_dora_switches(tiny_cfg, tiny_model_dir):
    cfg = _config(tiny_cfg, tiny_model_dir, "lora", r=4, alpha=8, use_rslora=True)
    base = models.load_model(models.resolve(cfg.model))
    layer = wrap(base, cfg).base_model.model.model.layers[0]
    assert layer.self_attn.q_proj.scaling["default"] == pytest.approx(8 / 4 ** 0.5)
    cfg = _config(tiny_cfg, tiny_model_dir, "lora", r=4, alpha=8, use_dora=True)
    model = wrap(models.load_model(models.resolve(cfg.model)), cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 2


def test_search_spaces_are_valid_options_with_prefixed_names():
    import optuna

    from peftune.config import from_dict

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for name, method in registry().items():
        for _ in range(3):
            trial = study.ask()
            options = from_dict(method.options, method.search_space(trial), name)
            assert isinstance(options, method.options)
            assert all(key.startswith(f"{name}.") for key in trial.params)


@pytest.mark.parametrize("name,arch", CASES)
def test_method_generates_in_bf16_and_gets_its_fp32_weights_back(name, arch, tiny_cfg,
                                                                 model_dirs):
    from peftune.fast_generation import half_precision

    cfg = _config(tiny_cfg, model_dirs[arch], name)
    tokenizer = models.load_tokenizer(cfg.model)
    data = prepare(cfg, tokenizer, roles=("test",))
    model = wrap(load_base(cfg, tokenizer), cfg)
    before = {n: p for n, p in model.named_parameters() if p.dtype == torch.float32}
    prompts = prompts_of(data.splits["test"])[:3]
    settings = EvalConfig(batch_size=3, max_new_tokens=4, no_repeat_ngram_size=0)
    generated = generate(model, tokenizer, prompts, settings, progress=False,
                         precision="bf16")
    after = dict(model.named_parameters())
    assert all(after[n] is p and p.dtype == torch.float32 for n, p in before.items())
    with half_precision(model, "bf16"):
        expected = [_greedy_by_forward(model, tokenizer, p, 4) for p in prompts]
    assert generated == expected


@pytest.mark.parametrize("name", list(registry()))
def test_adapter_weights_stay_fp32_on_a_16bit_base(name, tiny_cfg, tiny_model_dir):
    # model.dtype auto loads 16-bit weights on a GPU; the optimizer must update fp32 ones
    cfg = _config(tiny_cfg, tiny_model_dir, name)
    cfg.model.dtype = "float16"
    base = load_base(cfg, models.load_tokenizer(cfg.model))
    model = wrap(base, cfg)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable


def test_llama_adapter_trains_in_bf16_autocast_on_a_bf16_base(tiny_cfg, tiny_model_dir):
    cfg = _config(tiny_cfg, tiny_model_dir, "llama-adapter")
    cfg.model.dtype, cfg.train.precision = "bfloat16", "bf16"
    result = run(cfg)
    gates = [p for n, p in result.model.named_parameters() if "adaption_gate" in n]
    assert gates and all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in gates)
    assert result.metrics["train_loss"] > 0
