"""Choosing among trials the validation set cannot tell apart.

The best trial by its validation score was picked on the same documents that scored it: among
trials within noise of it, that is partly luck. With ``search.rescore_examples``, the kept
adapters of the tied top trials generate summaries for validation rows no trial saw, and the
best mean over all of a trial's rows is the search's choice.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from peftune import assembly, models
from peftune.config import Config
from peftune.generation import generate, prompts_of
from peftune.metrics import paired_bootstrap, text_scores
from peftune.rundir import RunDir
from peftune.search.objective import suggest
from peftune.search.study import DEFAULT_ATTR, kept_adapter

log = logging.getLogger(__name__)

RESCORED = "rescored"  # study user attribute: what re-scoring found and chose
RESCORE_AT_MOST = 4  # tied trials re-scored (by validation score; the default's trial too)


def within_noise(study: optuna.Study) -> tuple[FrozenTrial, list[FrozenTrial]] | None:
    """The best complete trial and the other complete trials the validation set cannot tell
    from it: the paired bootstrap 95% interval of their difference to the best, on the same
    validation documents (``document_scores``), includes 0. None without per-document
    scores (a loss metric, trials from an older version) or with two objectives."""
    if len(study.directions) > 1:
        return None
    scored = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.user_attrs.get("document_scores")]
    if not scored:
        return None
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    best = (max if maximize else min)(scored, key=lambda t: t.values[0])
    ties = []
    for t in scored:
        if t.number == best.number or len(t.user_attrs["document_scores"]) != \
                len(best.user_attrs["document_scores"]):
            continue
        _, low, high = paired_bootstrap(best.user_attrs["document_scores"],
                                        t.user_attrs["document_scores"])
        if (low if maximize else -high) <= 0:
            ties.append(t)
    return best, sorted(ties, key=lambda t: t.values[0], reverse=maximize)


def chosen(study: optuna.Study) -> int | None:
    """The trial re-scoring chose (None when it did not run, or ran before the study grew)."""
    found = _current(study)
    return found["chosen"] if found else None


def _complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _current(study: optuna.Study) -> dict[str, Any] | None:
    """The stored re-scoring, if it was made with the study's trials as they are now."""
    found = study.user_attrs.get(RESCORED)
    return found if found and found.get("complete") == _complete(study) else None


def rescore(cfg: Config, study: optuna.Study, bases: assembly.Bases,
            data: assembly.Prepared) -> dict[str, Any] | None:
    """Score the tied top trials' kept adapters on ``search.rescore_examples`` validation rows
    after the trials' own, choose the best mean over all their rows, and keep it all in the
    study (``RESCORED``). None when there is nothing to re-score."""
    search = cfg.search
    if not search.rescore_examples or _current(study):
        return _current(study)
    found = within_noise(study)
    if found is None or not found[1]:
        return None
    validation = data.splits["validation"]
    rows = validation.select(range(min(search.eval_examples, len(validation)),
                                   min(search.eval_examples + search.rescore_examples,
                                       len(validation))))
    tied = _candidates(*found, run=RunDir.of(cfg))
    if len(rows) == 0 or len(tied) < 2 or tied[0].number != found[0].number:
        log.info("search.rescore_examples: %s; the best trial stands", "no validation rows "
                 "left after search.eval_examples" if len(rows) == 0 else "the best and at "
                 "least one tied trial must have kept their adapters")
        return None
    # keyed by trial number as text: the study keeps its attributes as JSON; a study topped
    # up since its last re-scoring keeps the scores of the trials it re-scored then
    before = study.user_attrs.get(RESCORED) or {}
    kept = before.get("scores", {}) if before.get("rows") == len(rows) else {}
    scores = {str(t.number): kept.get(str(t.number)) or
              _scores(cfg, t, bases, data.tokenizer, rows) for t in tied}
    means = {str(t.number): _mean(t.user_attrs["document_scores"] + scores[str(t.number)])
             for t in tied}
    result = {"rows": len(rows), "scores": scores, "means": means, "complete": _complete(study),
              "chosen": int(max(means, key=lambda n: means[n]))}
    study.set_user_attr(RESCORED, result)
    return result


def _candidates(best: FrozenTrial, ties: list[FrozenTrial], *, run: RunDir) -> list[FrozenTrial]:
    """The best and the top tied trials (the default configuration's always, when tied), of
    those that kept an adapter."""
    kept = [t for t in [best, *ties] if kept_adapter(run, t)]
    top = kept[:RESCORE_AT_MOST]
    top += [t for t in kept[RESCORE_AT_MOST:] if t.user_attrs.get(DEFAULT_ATTR)]
    return top


def _scores(cfg: Config, trial: FrozenTrial, bases: assembly.Bases, tokenizer: Any,
            rows: Any) -> list[float]:
    trial_cfg = suggest(optuna.trial.FixedTrial(trial.params), cfg)
    model = models.load_adapter(bases.get(trial_cfg), RunDir.of(cfg).trial(trial.number).adapter)
    try:
        preds = generate(model, tokenizer, prompts_of(rows), cfg.eval,
                         precision=models.precision(cfg))
    finally:
        bases.put(trial_cfg, assembly.unwrap(model))
    _, per_doc = text_scores(preds, rows["summary"])
    return [round(v, 4) for v in per_doc[cfg.search.metric]]


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4)
