"""Scores of generated summaries: ROUGE, the loop rate, bootstrap intervals, and comparisons
of two systems' predictions files document by document.

ROUGE-1/2/L/Lsum come from ``rouge_score`` with the Porter stemmer, on a 0-100 scale;
ROUGE-Lsum sees one sentence per line, as it was defined. ``loop_rate`` is the share of
predictions that loop (:func:`loops`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rouge_score import rouge_scorer

from peftune.atomic import atomic_write
from peftune.errors import PeftuneError

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


LOOP_NGRAM = 4
LOOP_TIMES = 3


def loops(text: str, *, n: int = LOOP_NGRAM, times: int = LOOP_TIMES) -> bool:
    """Whether ``text`` loops: some run of ``n`` words (lowercased, punctuation dropped)
    occurs ``times`` times or more in it. A summary that says one thing once passes; one
    that repeats a phrase or sentence until ``max_new_tokens`` does not.

    >>> loops("We train it. We train it. We train it. We train it.")
    True
    >>> loops("we train it, then we test it, then we ship it")
    False
    """
    words = _WORD.findall(text.lower())
    seen: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        seen[gram] = seen.get(gram, 0) + 1
        if seen[gram] >= times:
            return True
    return False


def loop_rate(predictions: Sequence[str]) -> float:
    """The share (0-1) of ``predictions`` that :func:`loops`."""
    return round(sum(map(loops, predictions)) / max(1, len(predictions)), 4)


def split_sentences(text: str) -> str:
    return "\n".join(s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip())


def document_rouge(predictions: Sequence[str], references: Sequence[str]
                   ) -> dict[str, list[float]]:
    """ROUGE-1/2/L/Lsum F1 x 100 of each prediction against its reference."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    per_doc: dict[str, list[float]] = {key: [] for key in ROUGE_KEYS}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(split_sentences(ref), split_sentences(pred))
        for key in ROUGE_KEYS:
            per_doc[key].append(100 * scores[key].fmeasure)
    return per_doc


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean F1 of ROUGE-1/2/L/Lsum x 100."""
    n = max(1, len(predictions))
    return {key: round(sum(scores) / n, 4)
            for key, scores in document_rouge(predictions, references).items()}


def text_scores(predictions: Sequence[str], references: Sequence[str]
                ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The metrics of a split's predictions (mean ROUGE, count, mean words, loop rate), and
    the ROUGE of each prediction (what bootstrap intervals resample)."""
    per_doc = document_rouge(predictions, references)
    n = max(1, len(predictions))
    metrics: dict[str, float] = {key: round(sum(v) / n, 4) for key, v in per_doc.items()}
    metrics["num_examples"] = len(predictions)
    metrics["mean_prediction_words"] = round(
        sum(len(p.split()) for p in predictions) / n, 2)
    metrics["loop_rate"] = loop_rate(predictions)
    return metrics, per_doc


def paired_bootstrap(scores_a: Sequence[float], scores_b: Sequence[float], *,
                     resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired items, and its percentile bootstrap 95% interval.

    The items (test documents, scored by two systems) are resampled with replacement
    ``resamples`` times; the interval holds the middle 95% of the resampled means.

    >>> paired_bootstrap([30.0, 50.0], [30.0, 30.0], resamples=1000, seed=0)
    (10.0, 0.0, 20.0)
    """
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired_bootstrap needs two equally long, non-empty lists of scores "
                         f"(got {len(a)} and {len(b)})")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1 (got {resamples})")
    diff = a - b
    rows = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[rows].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def mean_interval(scores: Sequence[float], *, resamples: int = 2000, seed: int = 0
                  ) -> tuple[float, float, float]:
    """Mean of ``scores`` (one per document) and its percentile bootstrap 95% interval.

    >>> mean_interval([20.0, 20.0, 20.0])
    (20.0, 20.0, 20.0)
    """
    return paired_bootstrap(scores, [0.0] * len(scores), resamples=resamples, seed=seed)


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The rows ``write_outputs`` wrote: id, prediction and reference of each document."""
    if not path.is_file():
        raise PeftuneError(f"no predictions at {path}: score that model first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def compare_predictions(best: Path, others: dict[str, Path], *, resamples: int = 2000,
                        seed: int = 0) -> dict[str, Any]:
    """Per-document ROUGE of ``best`` against each of ``others`` on the same documents.

    Returns the mean scores of every system, and for each other system ``"best - NAME"``:
    per ROUGE key the mean difference in points with its paired bootstrap 95% interval.
    """
    rows = {"best": read_predictions(best)}
    rows.update((name, read_predictions(path)) for name, path in others.items())
    ids = [r["id"] for r in rows["best"]]
    for name, got in rows.items():
        if [r["id"] for r in got] != ids:
            raise PeftuneError(f"{name}: its predictions are not of the same documents, in the "
                             f"same order, as {best}")
    scores = {name: document_rouge([r["prediction"] for r in got],
                                   [r["reference"] for r in got])
              for name, got in rows.items()}
    out: dict[str, Any] = {
        "documents": len(ids), "resamples": resamples, "seed": seed, "interval": 0.95,
        "test": {name: {k: round(sum(v) / max(1, len(v)), 4) for k, v in s.items()}
                 for name, s in scores.items()}}
    for name in others:
        out[f"best - {name}"] = {key: _interval(scores["best"][key], scores[name][key],
                                                resamples=resamples, seed=seed)
                                 for key in ROUGE_KEYS}
    return out


def _interval(a: list[float], b: list[float], *, resamples: int, seed: int
              ) -> dict[str, float]:
    diff, low, high = paired_bootstrap(a, b, resamples=resamples, seed=seed)
    return {"difference": round(diff, 4), "low": round(low, 4), "high": round(high, 4)}


def write_examples(path: Path, documents: Sequence[str], predictions: dict[str, Path]) -> None:
    """``path`` (JSON lines): each of ``documents`` with its reference and each named
    system's summary, for the first ``len(documents)`` rows of the predictions files."""
    systems = {name: read_predictions(p)[:len(documents)] for name, p in predictions.items()}
    lines = []
    for i, document in enumerate(documents):
        first = next(iter(systems.values()))[i]
        row = {"id": first["id"], "document": document, "reference": first["reference"]}
        row.update((name, got[i]["prediction"]) for name, got in systems.items())
        lines.append(json.dumps(row) + "\n")
    atomic_write(path, "".join(lines))

