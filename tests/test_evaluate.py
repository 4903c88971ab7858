"""Per-document ROUGE and the paired bootstrap behind the search report's intervals."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftune.errors import PeftuneError
from peftune.generation import write_outputs
from peftune.metrics import compare_predictions, document_rouge, paired_bootstrap, rouge


def test_bootstrap_of_a_hand_computed_case():
    # differences 0 and 20: a resampled mean is 0, 10 or 20 with chances 1/4, 1/2, 1/4,
    # so the middle 95% of 2000 resamples runs from 0 to 20 around the mean of 10
    assert paired_bootstrap([30.0, 50.0], [30.0, 30.0], resamples=2000, seed=1) == (
        10.0, 0.0, 20.0)
    # one document: every resample is that document
    assert paired_bootstrap([7.0], [4.0], resamples=1000, seed=0) == (3.0, 3.0, 3.0)


def test_bootstrap_is_seeded_and_narrows_with_more_documents():
    a = [float(i % 7) for i in range(40)]
    b = [float((i * 3) % 5) for i in range(40)]
    first = paired_bootstrap(a, b, resamples=1000, seed=3)
    assert first == paired_bootstrap(a, b, resamples=1000, seed=3)
    wide = first[2] - first[1]
    narrow = paired_bootstrap(a * 10, b * 10, resamples=1000, seed=3)
    assert narrow[0] == pytest.approx(first[0])
    assert narrow[2] - narrow[1] < wide / 2


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.lists(st.floats(0, 100), min_size=1, max_size=30), st.floats(-50, 50),
       st.integers(0, 2**16))
def test_bootstrap_of_identical_or_shifted_scores_has_no_width(scores, shift, seed):
    assert paired_bootstrap(scores, scores, resamples=1000, seed=seed) == (0.0, 0.0, 0.0)
    diff, low, high = paired_bootstrap([s + shift for s in scores], scores, resamples=1000,
                                       seed=seed)
    assert diff == pytest.approx(shift) and low == pytest.approx(shift)
    assert high == pytest.approx(shift)


def test_bootstrap_rejects_unpaired_scores():
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1.0, 2.0], [1.0], resamples=10, seed=0)


def test_document_scores_average_to_the_corpus_score():
    preds, refs = ["the cat sat on the mat", "a dog ran"], ["the cat sat", "the dog ran far"]
    per_doc = document_rouge(preds, refs)
    assert per_doc["rouge1"][0] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)  # P 3/6, R 3/3
    assert rouge(preds, refs)["rougeL"] == pytest.approx(sum(per_doc["rougeL"]) / 2, abs=1e-4)


def _write(path, preds, refs, ids=None):
    ds = {"id": ids or [f"d{i}" for i in range(len(preds))], "summary": refs}
    write_outputs(path, "test", ds, preds, rouge(preds, refs))
    return path / "predictions.jsonl"


def test_compare_predictions_pairs_documents_and_matches_the_scored_means(tmp_path):
    refs = ["alpha beta gamma delta", "epsilon zeta eta", "theta iota kappa", "mu nu xi"]
    best = _write(tmp_path / "final", ["alpha beta gamma", "epsilon zeta", "theta iota",
                                       "mu nu"], refs)
    zero = _write(tmp_path / "zero-shot", ["omega", "omega", "omega", "omega"], refs)
    out = compare_predictions(best, {"zero-shot": zero}, resamples=1000, seed=0)
    assert out["documents"] == 4 and out["resamples"] == 1000
    scored = json.loads((tmp_path / "final" / "metrics.json").read_text())["test"]
    assert out["test"]["best"]["rouge1"] == pytest.approx(scored["rouge1"])
    d = out["best - zero-shot"]["rouge1"]
    assert d["difference"] == pytest.approx(scored["rouge1"] - 0.0, abs=1e-3)
    assert 0 < d["low"] <= d["difference"] <= d["high"]
    other = _write(tmp_path / "other", ["omega"] * 4, refs, ids=["x", "d1", "d2", "d3"])
    with pytest.raises(PeftuneError, match="not of the same documents"):
        compare_predictions(best, {"other": other}, resamples=10, seed=0)


def test_loop_rate_counts_outputs_that_repeat_a_phrase_three_times():
    from peftune.metrics import loop_rate, loops, text_scores

    looping = "The work is based on a phrase-based engine and " * 4
    fine = "We present a parser. The parser is fast; the parser is small and the parser wins."
    assert loops(looping) and not loops(fine) and not loops("")
    assert loop_rate([looping, fine, fine, fine]) == 0.25 and loop_rate([]) == 0
    metrics, per_doc = text_scores([looping, fine], ["a phrase-based engine", "a fast parser"])
    assert metrics["loop_rate"] == 0.5 and metrics["num_examples"] == 2
    assert metrics["rougeL"] == pytest.approx(sum(per_doc["rougeL"]) / 2, abs=1e-4)


def test_mean_interval_holds_the_mean_and_narrows_with_agreeing_documents():
    from peftune.metrics import mean_interval

    spread = [10.0, 30.0, 20.0, 40.0, 0.0, 20.0]
    mean, low, high = mean_interval(spread)
    assert mean == 20.0 and low < 20.0 < high
    assert mean_interval([20.0] * 6) == (20.0, 20.0, 20.0)


def test_generated_no_repeat_rule_ignores_the_prompt():
    import torch
    from transformers import NoRepeatNGramLogitsProcessor

    from peftune.fast_generation import GeneratedNoRepeatNGram

    # prompt "5 6" (width 2), output so far "5": the prompt's bigram 5 6 stays allowed ...
    ids, scores = torch.tensor([[5, 6, 5]]), torch.zeros(1, 10)
    assert GeneratedNoRepeatNGram(2, prompt_width=2)(ids, scores.clone())[0, 6] == 0
    assert NoRepeatNGramLogitsProcessor(2)(ids, scores.clone())[0, 6] == -float("inf")
    # ... but the output's own bigrams do not repeat
    ids = torch.tensor([[5, 6, 1, 2, 1]])
    banned = GeneratedNoRepeatNGram(2, prompt_width=2)(ids, scores.clone())[0]
    assert banned[2] == -float("inf") and banned[6] == 0


def test_generation_with_the_generated_only_rule_never_repeats_an_output_ngram(tiny_cfg):
    from peftune import models
    from peftune.assembly import prepare
    from peftune.config import EvalConfig, ModelConfig, config_from_dict
    from peftune.generation import generate, prompts_of

    cfg = config_from_dict(tiny_cfg)
    model_cfg = ModelConfig(name=tiny_cfg["model"]["name"])
    tok = models.load_tokenizer(model_cfg)
    model = models.load_model(models.resolve(model_cfg), pad_token_id=tok.pad_token_id)
    prompts = prompts_of(prepare(cfg, tok, roles=("test",)).splits["test"])
    plain = generate(model, tok, prompts, EvalConfig(batch_size=3, max_new_tokens=24),
                     progress=False)
    ruled = generate(model, tok, prompts, EvalConfig(
        batch_size=3, max_new_tokens=24, generated_no_repeat_ngram_size=2), progress=False)
    ids = [tok(text, add_special_tokens=False)["input_ids"] for text in ruled]
    for row in ids:
        pairs = list(zip(row, row[1:], strict=False))
        assert len(pairs) == len(set(pairs))
    assert plain != ruled, "the random tiny model should repeat itself somewhere unruled"
