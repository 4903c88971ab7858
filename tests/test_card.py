"""The run's decoding settings and model card travel with the adapter and every export."""

import json

import yaml
from transformers import GenerationConfig

from peftune import card
from peftune.cli import main


def _train(tiny_cfg, tmp_path):
    tiny_cfg["eval"].update(repetition_penalty=1.2, no_repeat_ngram_size=0)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg))
    assert main(["-q", "train", "--config", str(path)]) == 0
    return tmp_path / "run" / "adapter"


def test_train_writes_generation_settings_and_a_filled_card(tiny_cfg, tmp_path):
    adapter = _train(tiny_cfg, tmp_path)
    settings = GenerationConfig.from_pretrained(adapter)
    assert (settings.max_new_tokens, settings.repetition_penalty, settings.no_repeat_ngram_size,
            settings.num_beams, settings.do_sample) == (8, 1.2, 0, 1, False)
    assert (settings.bos_token_id, settings.eos_token_id, settings.pad_token_id) == (2, 3, 3)
    front = card.front_matter(adapter / "README.md")
    assert front["library_name"] == "peft" and front["pipeline_tag"] == "text-generation"
    assert "lora" in front["tags"] and "base_model" not in front  # a local folder: no Hub id
    assert front["peftune"]["examples"] == {"train": 12, "validation": 4}
    text = (adapter / "README.md").read_text()
    for part in ("apply_chat_template", "Summarize the following text.", "first 24 tokens",
                 "| `repetition_penalty` | 1.2 |", "r: 8", "12 train, 4 validation",
                 "Not scored yet", "PeftModel.from_pretrained(base, folder)"):
        assert part in text, part
    meta = json.loads((adapter / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == str(card.base(card_cfg(adapter)).reference)


def card_cfg(adapter):
    from peftune.rundir import folder_config

    return folder_config(adapter / "peftune.yaml")


def test_evaluate_puts_test_rouge_in_the_card_and_exports_carry_it(tiny_cfg, tmp_path):
    adapter = _train(tiny_cfg, tmp_path)
    assert main(["-q", "evaluate", "--adapter", str(adapter)]) == 0
    scored = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    facts = card.read_facts(adapter)
    assert facts["metrics"]["test"]["rougeL"] == scored["rougeL"]
    assert facts["metrics"]["test"]["num_examples"] == 4
    front = card.front_matter(adapter / "README.md")
    values = {m["type"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert values["rougeL"] == scored["rougeL"]
    # scores of other decoding settings are not the adapter's: the card keeps its own
    assert main(["-q", "evaluate", "--adapter", str(adapter), "--eval.max_new_tokens", "3"]) == 0
    assert card.read_facts(adapter)["metrics"]["test"]["rougeL"] == scored["rougeL"]
    merged = tmp_path / "merged"
    assert main(["-q", "export", str(adapter), "--out", str(merged)]) == 0
    front = card.front_matter(merged / "README.md")
    assert "library_name" not in front and front["peftune"]["precision"] == "fp32"
    assert card.read_facts(merged)["metrics"] == facts["metrics"]
    # the base's own generation config (pad id 1) is replaced by the run's
    settings = GenerationConfig.from_pretrained(merged)
    assert (settings.max_new_tokens, settings.repetition_penalty, settings.pad_token_id) == \
        (8, 1.2, 3)
    assert "float32 weights" in (merged / "README.md").read_text()


def test_a_generated_only_rule_is_named_in_the_card_and_its_processor_reproduces_the_text(
        tiny_cfg, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftune.config import EvalConfig
    from peftune.fast_generation import GeneratedNoRepeatNGram
    from peftune.generation import generate

    tiny_cfg["eval"].update(generated_no_repeat_ngram_size=2, max_new_tokens=16)
    adapter = _train(tiny_cfg, tmp_path)
    text = (adapter / "README.md").read_text()
    assert "eval.generated_no_repeat_ngram_size=2" in text and "logits_processor" in text
    assert GenerationConfig.from_pretrained(adapter).no_repeat_ngram_size == 0  # not the rule
    # what the card tells a transformers user to pass gives peftune's own text
    tok = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_cfg["model"]["name"]), str(adapter)).eval()
    ids = tok("alpha beta gamma delta alpha beta", add_special_tokens=False)["input_ids"]
    inputs = {"input_ids": torch.tensor([ids])}
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=GenerationConfig.from_pretrained(
            adapter), logits_processor=[GeneratedNoRepeatNGram(
                2, prompt_width=inputs["input_ids"].shape[1])])
    plain = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    ours = generate(model, tok, [ids], EvalConfig(max_new_tokens=16,
                                                  generated_no_repeat_ngram_size=2),
                    progress=False)[0]
    assert plain == ours
