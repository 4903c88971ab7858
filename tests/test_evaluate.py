"""Per-document ROUGE and the paired bootstrap behind the search report's intervals."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftune.errors import PeftuneError
from peftune.evaluate import (
    compare_predictions,
    document_rouge,
    paired_bootstrap,
    rouge,
    write_outputs,
)


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
