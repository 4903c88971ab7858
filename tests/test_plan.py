"""`peftune plan`: counts equal a real model's, lengths equal the data's, and the fit and
largest micro-batch follow the arithmetic; shipped configs fit what they claim."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from peftune import config_from_dict, load_yaml, plan
from peftune.assembly import prepare, wrap
from peftune.cli import main

ROOT = Path(__file__).resolve().parent.parent
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}


@pytest.mark.parametrize("tied", [False, True])
def test_counts_on_an_empty_model_equal_the_real_model(tiny_cfg, tiny_model_dir, tied):
    """Tied input and output embeddings (SmolLM2, Gemma) are one tensor: counted once."""
    cfg = config_from_dict({**tiny_cfg, "lora": {"target_modules": ["all-linear"]}})
    config = LlamaConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=tied)
    real = wrap(LlamaForCausalLM(config), cfg)
    trainable, total = real.get_nb_trainable_parameters()
    counted = plan.count_parameters(cfg, config)
    assert (counted.trainable, counted.total) == (trainable, total - trainable)


def test_lengths_are_the_prepared_data_s(tiny_cfg):
    cfg = config_from_dict(tiny_cfg)
    ds = prepare(cfg, roles=("train",)).splits["train"]
    lengths = plan.measure_lengths(ds)
    totals = sorted(len(ids) for ids in ds["input_ids"])
    assert lengths.max == totals[-1] and lengths.p50 == totals[(len(totals) - 1) // 2]
    assert lengths.examples == len(totals) and lengths.mean == pytest.approx(
        sum(totals) / len(totals))
    assert lengths.summary_max == max(len(i) - p for i, p in zip(ds["input_ids"],
                                                                 ds["prompt_len"], strict=True))
    assert plan.tokens_per_epoch(lengths) == sum(totals)


def _plan_7b(tmp_path, config: str, memory: str, **train):
    (tmp_path / "llama7b").mkdir(exist_ok=True)
    LlamaConfig(**LLAMA_7B).save_pretrained(tmp_path / "llama7b")  # config.json alone
    data = load_yaml(ROOT / "configs" / config)
    data["model"]["name"] = str(tmp_path / "llama7b")
    data["plan"] = {"use_data": False, "device_memory": memory}
    data["train"].update(train)
    return plan.make(config_from_dict(data))


def test_weights_and_adapter_memory_follow_the_format(tmp_path):
    p = _plan_7b(tmp_path, "xsum-llama7b-lora.yaml", "80GB")
    assert 6.7e9 < p.params.total < 6.8e9 and p.params.trainable == 4_194_304  # r=8 on q,v
    m = p.memory["max"][False]
    assert m.weights == 2 * p.params.total and m.adapter == 16 * p.params.trainable
    nf4 = dataclasses.replace(p.params)
    assert plan.weight_bytes(nf4, "nf4") == pytest.approx(
        nf4.linear * (0.5 + 4 / 64) + (nf4.total - nf4.linear) * 4)
    assert plan.weight_bytes(nf4, "int8") < plan.weight_bytes(nf4, "bfloat16")


def test_largest_micro_batch_is_the_last_that_fits(tmp_path):
    p = _plan_7b(tmp_path, "xsum-llama7b-lora.yaml", "24GiB")
    for gc in (False, True):
        n = p.largest_micro_batch(gc)
        at = [plan.estimate(p, micro_batch=k, tokens=p.lengths.max,
                            summary=p.lengths.summary_max, checkpointing=gc).total
              for k in (n, n + 1)]
        assert at[0] <= p.device_memory < at[1]
    assert p.largest_micro_batch(True) > p.largest_micro_batch(False)


@pytest.mark.parametrize("config", ["xsum-llama7b-lora.yaml", "xsum-llama7b-search.yaml"])
def test_shipped_7b_configs_fit_the_24gb_their_comments_promise(tmp_path, config):
    assert "24 GB" in (ROOT / "configs" / config).read_text()
    p = _plan_7b(tmp_path, config, "24GB")
    assert p.fits(plan.checkpointing(p.cfg, p))


def test_auto_checkpointing_follows_the_plan_and_explicit_settings_win(tmp_path):
    assert plan.checkpointing(_plan_7b(tmp_path, "xsum-llama7b-lora.yaml", "24GB").cfg)
    assert not plan.checkpointing(_plan_7b(tmp_path, "xsum-llama7b-lora.yaml", "200GB").cfg)
    cfg = _plan_7b(tmp_path, "xsum-llama7b-lora.yaml", "24GB",
                   gradient_checkpointing=False).cfg
    assert not plan.checkpointing(cfg)
    cfg = _plan_7b(tmp_path, "xsum-llama7b-lora.yaml", "200GB").cfg
    cfg.method = "qlora"  # a k-bit method's own option decides under auto
    assert plan.checkpointing(cfg)


@pytest.mark.parametrize("value,message", [
    ({"plan": {"device_memory": "lots"}}, "plan.device_memory must be"),
    ({"plan": {"measure_steps": 0}}, "plan.measure_steps must be in"),
    ({"train": {"gradient_checkpointing": "sometimes"}}, "train.gradient_checkpointing"),
])
def test_plan_options_are_validated(value, message):
    with pytest.raises(Exception, match=message):
        config_from_dict(value)


def test_cli_plan_prints_memory_and_tokens_and_measures(tiny_cfg, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg))
    assert main(["-q", "plan", "--config", str(path), "--plan.device_memory", "2GiB",
                 "--plan.measure", "true", "--plan.measure_steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "measured on 12 training rows" in out and "largest that fits" in out
    assert "per search trial" in out and "tokens/s" in out


def _rows_plan(tmp_path, *, rows: int, tokens: int, memory: str, batch: int = 8):
    p = _plan_7b(tmp_path, "xsum-llama7b-lora.yaml", memory, batch_size=batch,
                 micro_batch_size="auto")
    lengths = dataclasses.replace(p.lengths, p90=tokens, max=tokens, examples=rows)
    return dataclasses.replace(p, lengths=lengths)


@pytest.mark.parametrize(("kind", "tokens", "expected"), [
    ("cpu", 1100, 1),   # a long row is a micro-batch's worth on a CPU
    ("cpu", 330, 4),    # short rows: four of them (1,320 tokens), not eight
    ("cpu", 90, 8),     # never more than the batch
    ("cuda", 1100, 4),  # a GPU's budget is larger: 8 rows would be 8,800 tokens
])
def test_auto_micro_batch_fills_the_device_s_token_budget(tmp_path, kind, tokens, expected):
    p = _rows_plan(tmp_path, rows=100, tokens=tokens, memory="1TB")
    p.device_kind = kind
    chosen = p.auto_micro_batch()
    assert chosen == expected and p.cfg.train.batch_size % chosen == 0
    assert chosen * tokens <= plan.TOKENS_PER_MICRO_BATCH[kind] or chosen == 1


def test_auto_micro_batch_stays_within_device_memory(tmp_path):
    p = _rows_plan(tmp_path, rows=100, tokens=1100, memory="24GB")
    assert 0 < p.largest_micro_batch(False) < 4  # the budget alone would give 4 on a GPU
    chosen = p.auto_micro_batch()
    assert chosen <= p.largest_micro_batch(False)
    planned = plan.estimate(p, micro_batch=chosen, tokens=p.lengths.max,
                            summary=p.lengths.summary_max, checkpointing=False).total
    if planned > plan.AUTO_HEADROOM * p.device_memory:  # room for what the plan misses
        assert chosen == 1 and p.needs_checkpointing()
    tight = _rows_plan(tmp_path, rows=100, tokens=1100, memory="14GB")
    assert tight.largest_micro_batch(False) == 0 and tight.auto_micro_batch() == 1


def test_auto_micro_batch_is_what_trains_and_what_the_run_records(tiny_cfg, caplog):
    from peftune.train import run

    tiny_cfg["train"]["micro_batch_size"] = "auto"
    cfg = config_from_dict(tiny_cfg)
    with caplog.at_level("INFO", logger="peftune"):
        result = run(cfg)
    chosen = plan.make(cfg).micro_batch
    assert f"micro-batch {chosen} (auto)" in caplog.text
    saved = yaml.safe_load((Path(cfg.output_dir) / "config.yaml").read_text())
    assert saved["train"]["micro_batch_size"] == chosen == 4  # tiny rows: the whole batch
    assert yaml.safe_load((result.adapter_dir / "peftune.yaml").read_text())[
        "train"]["micro_batch_size"] == chosen


def test_auto_plans_the_step_with_a_long_outlier_as_parts_within_the_token_budget(
        tmp_path, monkeypatch):
    """Typical rows of 330 tokens make micro-batch 4 on a CPU; the step holding a 1,100-token
    row trains it alone (1,100 tokens, within 1,536), and the plan's peak is that part's, not
    four rows of 1,100. An explicit micro-batch is trained (and planned) as it is."""
    def lengths(cfg, examples=0):
        return plan.Lengths(p50=300, p90=330, max=1100, summary_p50=60, summary_p90=70,
                            summary_max=90, examples=100, mean=310.0, measured=True)

    monkeypatch.setattr(plan, "assumed_lengths", lengths)
    monkeypatch.setattr(plan, "device_memory", lambda setting: ("cpu", 2**40))
    auto = _plan_7b(tmp_path, "xsum-llama7b-lora.yaml", "auto", batch_size=8,
                    micro_batch_size="auto")
    assert auto.micro_batch == 4 and auto.token_budget == plan.TOKENS_PER_MICRO_BATCH["cpu"]
    assert [auto.rows_at(n) for n in (330, 500, 1100, 2000)] == [4, 3, 1, 1]
    one_row = plan.estimate(auto, micro_batch=1, tokens=1100, summary=90, checkpointing=False)
    assert auto.memory["max"][False] == one_row
    assert auto.memory["p90"][False].activations == plan.estimate(
        auto, micro_batch=4, tokens=330, summary=70, checkpointing=False).activations
    fixed = _plan_7b(tmp_path, "xsum-llama7b-lora.yaml", "auto", batch_size=8,
                     micro_batch_size=4)
    assert fixed.token_budget is None and fixed.rows_at(1100) == 4
    assert fixed.memory["max"][False].activations == 4 * one_row.activations


@pytest.mark.parametrize(("search", "train", "after"), [
    ({}, {}, 0),  # every row, adapters kept, default first: nothing trains after the trials
    ({"train_examples": 40}, {}, 2),  # trials on fewer rows: the final and the default
    ({"keep_adapters": False}, {}, 2),
    ({"final_on": "train+validation"}, {}, 2),
    ({"start_from_default": False}, {}, 1),  # the default is not a trial
    ({}, {"early_stopping": 2}, 2),  # the final stops early where the trials did not
    ({"baselines": False, "train_examples": 40}, {}, 1),
    ({"final": False, "train_examples": 40}, {}, 0),
])
def test_the_search_plan_counts_the_trainings_after_the_trials(search, train, after):
    cfg = config_from_dict({"search": {"baselines": True, **search},
                            "train": {"epochs": 1, **train}})
    lengths = plan.Lengths(p50=300, p90=330, max=400, summary_p50=60, summary_p90=70,
                           summary_max=90, examples=100, mean=310.0, measured=True)
    assert plan.trainings_after(cfg, lengths) == after
    assert plan.search_tokens(cfg, lengths) == pytest.approx(
        cfg.search.n_trials * plan.trial_tokens(cfg, lengths) + after * 310.0 * 100)
