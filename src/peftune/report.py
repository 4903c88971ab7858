"""A self-contained HTML report (plots inlined) and PNG files for a search run directory.

Run it with ``peftune report runs/NAME`` (``peftune search`` writes it when it ends). The page
leads with the test split: zero-shot, the default and the best configuration, with paired
bootstrap intervals; then example summaries, how to use the result, and the search itself.
The study stays a plain Optuna study: ``optuna-dashboard sqlite:///runs/NAME/study.db``.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import shlex
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402
from optuna.visualization import matplotlib as ovm  # noqa: E402

from peftune.atomic import atomic_write  # noqa: E402
from peftune.config import Config, load_yaml  # noqa: E402
from peftune.errors import PeftuneError  # noqa: E402
from peftune.metrics import ROUGE_KEYS, mean_interval  # noqa: E402
from peftune.rundir import RunDir  # noqa: E402
from peftune.search import (  # noqa: E402
    DEFAULT_ATTR,
    RESCORED,
    ranking,
    signal_metric,
    within_noise,
)

LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum",
          "eval_loss": "validation loss", "trainable_params": "trainable parameters",
          "train_time": "training time (s)"}
SYSTEMS = {"zero-shot": "zero-shot", "default": "default configuration"}
# Below this, fANOVA ranks noise; a parameter that never changed would still get a share.
MIN_COMPLETE_FOR_IMPORTANCE = 8
DOCUMENT_CHARS = 400


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


def load_study(run_dir: Path) -> tuple[Any, optuna.Study]:
    from peftune.search import storage_for

    run = RunDir(run_dir)
    if not run.config_file.is_file():
        raise PeftuneError(f"{run_dir}: not a run directory (no {run.config_file.name})")
    cfg = run.config()
    name = cfg.search.study_name or run_dir.resolve().name
    try:
        return cfg, optuna.load_study(study_name=name, storage=storage_for(cfg))
    except KeyError:
        raise PeftuneError(f"{run_dir}: no study named '{name}' in its storage") from None


# ---------------------------------------------------------------- the test split

def headline_metric(cfg: Config) -> str:
    """The ROUGE key the verdicts speak of: the search's metric, else ROUGE-L."""
    return cfg.search.metric if cfg.search.metric in ROUGE_KEYS else "rougeL"


def _interval(d: dict[str, float]) -> str:
    return f"{d['difference']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def verdict(comparison: dict[str, Any], baseline: str, metric: str) -> str:
    """One sentence: the difference best - ``baseline`` and whether noise could explain it."""
    d, n = comparison[f"best - {baseline}"][metric], comparison["documents"]
    name = SYSTEMS.get(baseline, baseline)
    if _same(d):
        judged = f"the same score on every one of the {n} documents"
    elif d["low"] <= 0 <= d["high"]:
        judged = f"cannot tell apart from noise on {n} documents"
    else:
        judged = (f"the best configuration is {'better' if d['low'] > 0 else 'worse'} than "
                  f"{name}: the interval excludes 0 on {n} documents")
    return (f"{label(metric)}, best - {name}: {d['difference']:+.2f} points, 95% interval "
            f"[{d['low']:+.2f}, {d['high']:+.2f}]: {judged}.")


def bottom_line(comparison: dict[str, Any], metric: str) -> str:
    """One plain sentence: does the winner beat each baseline beyond noise on the test split?"""
    baselines = [k.removeprefix("best - ") for k in comparison if k.startswith("best - ")]
    groups: dict[str, list[str]] = {"same": [], "beats": [], "ties": [], "loses": []}
    for name in baselines:
        d = comparison[f"best - {name}"][metric]
        key = "same" if _same(d) else "beats" if d["low"] > 0 else "loses" if d["high"] < 0 \
            else "ties"
        groups[key].append(SYSTEMS.get(name, name))
    parts = []
    if groups["same"]:
        parts.append(f"scores as {_and(groups['same'])} does on every document (the search "
                     "chose it, or a model that writes the same summaries)")
    if groups["beats"]:
        parts.append(f"beats {_and(groups['beats'])} beyond noise")
    if groups["ties"]:
        parts.append(f"does not beat {_and(groups['ties'])} beyond noise (the interval of "
                     "the difference includes 0)")
    if groups["loses"]:
        parts.append(f"is worse than {_and(groups['loses'])} beyond noise")
    return (f"Bottom line ({label(metric)}, {comparison['documents']} test documents): the "
            f"searched configuration {'; it '.join(parts)}.")


def _same(d: dict[str, float]) -> bool:
    """A difference of 0 on every document: the two systems wrote what scores the same."""
    return d["difference"] == d["low"] == d["high"] == 0


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def difference_lines(comparison: dict[str, Any], *, metric: str) -> list[str]:
    """The differences as rows under ``print_rouge``'s table, then a verdict per baseline."""
    baselines = [k.removeprefix("best - ") for k in comparison if k.startswith("best - ")]
    lines = [f"{'':<20}" + "".join(f"  {label(k):>24}" for k in ROUGE_KEYS)]
    for name in baselines:
        diffs = comparison[f"best - {name}"]
        lines.append(f"{'best - ' + name:<20}" + "".join(f"  {_interval(diffs[k]):>24}"
                                                          for k in ROUGE_KEYS))
    lines.append(f"ROUGE points; [paired bootstrap 95% interval over {comparison['documents']} "
                 f"test documents, {comparison['resamples']} resamples]")
    return lines + [verdict(comparison, name, metric) for name in baselines] + [
        bottom_line(comparison, metric)]


def _best_name(run: RunDir) -> str:
    best = load_yaml(run.best_config) if run.best_config.is_file() else {}
    return f"best configuration ({best['method']})" if best.get("method") else \
        "best configuration"


def _score_row(name: str, scores: dict[str, float]) -> str:
    return f"<tr><th>{html.escape(name)}</th>" + "".join(
        f"<td>{scores[k]:.2f}</td>" for k in ROUGE_KEYS) + "</tr>"


def _headline(run: RunDir, cfg: Config) -> str:
    metrics = run.final.metrics()
    if "test" not in metrics:
        return ("<p>No final model yet: the search has not finished, or ran with "
                "<code>--search.final false</code>.</p>")
    head = "<tr><th></th>" + "".join(f"<th>{label(k)}</th>" for k in ROUGE_KEYS) + "</tr>"
    comparison = metrics.get("comparison")
    if not comparison:
        return (f"<table>{head}{_score_row(_best_name(run), metrics['test'])}</table>"
                f"<p>No baselines: the search ran without <code>--search.baselines true</code>, "
                "so zero-shot and the default configuration were not scored on these "
                "documents.</p>")
    scores = comparison["test"]
    baselines = [k.removeprefix("best - ") for k in comparison if k.startswith("best - ")]
    rows = [_score_row(SYSTEMS.get(b, b), scores[b]) for b in baselines]
    rows.append(_score_row(_best_name(run), scores["best"]))
    for b in baselines:
        diffs = comparison[f"best - {b}"]
        rows.append(f"<tr class='diff'><th>best - {html.escape(SYSTEMS.get(b, b))}</th>" + "".join(
            f"<td>{diffs[k]['difference']:+.2f}<br><small>[{diffs[k]['low']:+.2f}, "
            f"{diffs[k]['high']:+.2f}]</small></td>" for k in ROUGE_KEYS) + "</tr>")
    metric = headline_metric(cfg)
    verdicts = "".join(f"<li>{html.escape(verdict(comparison, b, metric))}</li>"
                       for b in baselines)
    verdicts += f"<li><strong>{html.escape(bottom_line(comparison, metric))}</strong></li>"
    return (f"<table>{head}{''.join(rows)}</table>"
            f"<p>ROUGE F1 x 100 on {comparison['documents']} test documents. Differences are in "
            "ROUGE points; in brackets, a paired bootstrap 95% confidence interval "
            f"({comparison['resamples']} resamples of the documents, seed "
            f"{comparison['seed']}): where it spans 0, the difference may be noise.</p>"
            f"<ul>{verdicts}</ul>")


def _cut(text: str) -> str:
    if len(text) <= DOCUMENT_CHARS:
        return text
    return text[:DOCUMENT_CHARS].rsplit(" ", 1)[0] + " …"


def _examples(run: RunDir) -> str:
    path = run.final.examples
    if not path.is_file():
        return "<p>No examples: the final model has not been scored on the test split.</p>"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    systems = [s for s in ("zero-shot", "best") if rows and s in rows[0]]
    head = "".join(f"<th>{SYSTEMS.get(s, 'best configuration')}</th>" for s in systems)
    body = "".join(
        f"<tr><td>{html.escape(_cut(r['document']))}<br><small>id {html.escape(str(r['id']))}"
        f"</small></td><td>{html.escape(r['reference'])}</td>"
        + "".join(f"<td>{html.escape(r[s])}</td>" for s in systems) + "</tr>" for r in rows)
    return (f"<p>The first {len(rows)} test documents (cut to {DOCUMENT_CHARS} characters), "
            "their reference summaries and what the models wrote.</p>"
            f"<table class='examples'><tr><th>document</th><th>reference</th>{head}</tr>"
            f"{body}</table>")


def _usage(run: RunDir) -> str:
    parts = []
    if run.best_config.is_file():
        best = run.best_config.as_posix()
        parts.append(f"<p>The best configuration: <code>{html.escape(best)}</code>. "
                     "Train it again, e.g. on more data, with <code>peftune train --config "
                     f"{html.escape(shlex.quote(best))} --output_dir runs/NEW"
                     "</code>.</p>")
    if run.final.adapter.is_dir():
        final = shlex.quote(run.final.path.as_posix())
        parts.append(
            "<p>The final model (its adapter is in <code>"
            f"{html.escape(run.final.adapter.as_posix())}</code>): summarize with the run's "
            "prompt and decoding settings, or merge it into its base for plain transformers:</p>"
            f"<pre>peftune summarize {html.escape(final)} \"text to summarize\"\n"
            f"peftune export {html.escape(final)} --format merged</pre>")
    return "".join(parts) or "<p>No best configuration yet.</p>"


# ---------------------------------------------------------------- plots of the search

def _maximize(study: optuna.Study) -> bool:
    return study.directions[0] == optuna.study.StudyDirection.MAXIMIZE


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _method(trial: FrozenTrial) -> str:
    return str(trial.params.get("method", "?"))


def _seconds(trial: FrozenTrial) -> float:
    return trial.duration.total_seconds() if trial.duration else 0.0


def _axis(cfg: Config) -> str:
    unit = " (F1 x 100)" if cfg.search.metric in ROUGE_KEYS else ""
    return f"{label(cfg.search.metric)}{unit}, {cfg.search.eval_examples} validation examples"


def plot_objective(study: optuna.Study, cfg: Config) -> tuple[Figure | None, str]:
    done = sorted(_complete(study), key=lambda t: t.number)
    if not done:
        return None, "No trial has completed yet."
    maximize, metric = _maximize(study), label(cfg.search.metric)
    fig, ax = plt.subplots(figsize=(8, 4))
    for method in sorted({_method(t) for t in done}):
        mine = [t for t in done if _method(t) == method]
        ax.scatter([t.number for t in mine], [t.values[0] for t in mine], label=method, zorder=3)
    best: list[float] = []
    for t in done:
        better = not best or (t.values[0] > best[-1]) == maximize
        best.append(t.values[0] if better else best[-1])
    ax.step([t.number for t in done], best, where="post", color="black", linewidth=1,
            label="best so far")
    pruned = [t.number for t in study.trials if t.state == TrialState.PRUNED]
    if pruned:
        ax.plot(pruned, [0.03] * len(pruned), "x", color="grey",
                transform=ax.get_xaxis_transform(), label="pruned (no score)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=f"Validation {metric} per trial", xlabel="trial", ylabel=_axis(cfg))
    ax.legend(fontsize=8)
    return fig, (f"Each point is a complete trial's {metric} on the "
                 f"{cfg.search.eval_examples} validation examples the search scores "
                 f"({'higher' if maximize else 'lower'} is better); the line is the best so "
                 "far, the crosses at the bottom are pruned trials.")


def plot_loss(study: optuna.Study, cfg: Config) -> tuple[Figure | None, str]:
    curves = [t for t in study.trials
              if t.intermediate_values and t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if not curves:
        return None, ("No trial reported a validation loss while training (pruning is off "
                      "with two objectives; <code>search.intermediate_steps</code> sets how "
                      "often it is measured).")
    # Optuna holds the negated loss when the study maximizes ROUGE (see ReportToTrial)
    on_loss = signal_metric(cfg.search) == "eval_loss"
    sign = -1.0 if _maximize(study) and on_loss else 1.0
    what = "validation loss" if on_loss else \
        f"{cfg.search.metric} on the first {cfg.search.signal_examples} validation rows"
    fig, ax = plt.subplots(figsize=(8, 4))
    for t in curves:
        steps = sorted(t.intermediate_values)
        losses = [sign * t.intermediate_values[s] for s in steps]
        pruned = t.state == TrialState.PRUNED
        (line,) = ax.plot(steps, losses, linestyle="--" if pruned else "-", marker=".",
                          linewidth=1)
        if pruned:
            ax.plot(steps[-1], losses[-1], "x", color=line.get_color(), markersize=9, mew=2)
    ax.legend(handles=[Line2D([], [], color="grey", label="complete trial"),
                       Line2D([], [], color="grey", linestyle="--", marker="x",
                              label="pruned trial (x: where it stopped)")], fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=f"{what[0].upper()}{what[1:]} during each trial", xlabel="optimizer step",
           ylabel=what.split(" on ")[0])
    return fig, (f"The {html.escape(what)}, measured every {cfg.search.intermediate_steps} "
                 f"steps: what the {html.escape(cfg.search.pruner)} pruner compares trials on.")


def best_per_method(study: optuna.Study) -> dict[str, FrozenTrial]:
    maximize = _maximize(study)
    best: dict[str, FrozenTrial] = {}
    for t in _complete(study):
        method = _method(t)
        if method not in best or (t.values[0] > best[method].values[0]) == maximize:
            best[method] = t
    return best


def noise_sentence(study: optuna.Study) -> str:
    """Whether the search's best trial is ahead of the others beyond noise, in words; with
    ties, the one with the fewest trainable parameters among them."""
    found = within_noise(study)
    if found is None:
        return ""
    best, ties = found
    return _ranking(best, ties) + _default_said(study, best, ties) + _rescored_said(study)


def _rescored_said(study: optuna.Study) -> str:
    """What re-scoring the tied trials on further validation rows found and chose."""
    found = study.user_attrs.get(RESCORED)
    if not found or ranking.chosen(study) is None:  # none, or made before the study grew
        return ""
    means = sorted(found["means"].items(), key=lambda kv: kv[1], reverse=_maximize(study))
    listed = ", ".join(f"trial {n} {mean:.2f}" for n, mean in means)
    chosen = study.trials[found["chosen"]]
    what = " (the default configuration)" if chosen.user_attrs.get(DEFAULT_ATTR) else ""
    return (f" Their kept adapters then scored {found['rows']} more validation documents; "
            f"over all their documents: {listed}. The search's choice is trial "
            f"{chosen.number}{what}.")


def _default_said(study: optuna.Study, best: FrozenTrial, ties: list[FrozenTrial]) -> str:
    """Where the default configuration's trial (``search.start_from_default``) stands."""
    default = next((t for t in study.trials if t.user_attrs.get(DEFAULT_ATTR)), None)
    if default is None or default.state != TrialState.COMPLETE:
        return ""
    if default.number == best.number:
        n = len(best.user_attrs["document_scores"])
        return (f" The best is trial {best.number}, the default configuration itself: no "
                f"searched configuration scored higher on these {n} validation documents.")
    if any(t.number == default.number for t in ties):
        return f" Trial {default.number}, the default configuration, is one of them."
    return (f" Trial {default.number}, the default configuration, is behind the best beyond "
            "noise.")


def _ranking(best: FrozenTrial, ties: list[FrozenTrial]) -> str:
    n = len(best.user_attrs["document_scores"])
    if not ties:
        return (f"Trial {best.number} is ahead of every other complete trial beyond noise "
                f"(the paired bootstrap 95% interval of each difference, on the same {n} "
                "validation documents, is above 0).")
    numbers = _and([str(t.number) for t in ties])
    tied = [best, *ties]
    smallest = min(tied, key=lambda t: t.user_attrs.get("trainable_params", float("inf")))
    text = (f"The top trials are within noise of each other: trial{'s' if len(ties) > 1 else ''}"
            f" {numbers} cannot be told apart from the best, trial {best.number} (the paired "
            f"bootstrap 95% interval of the difference on the same {n} validation documents "
            "includes 0), so the ranking among them may be chance.")
    if smallest.number != best.number and "trainable_params" in smallest.user_attrs:
        text += (f" The smallest adapter among them is trial {smallest.number}'s "
                 f"({smallest.user_attrs['trainable_params']:,} trainable parameters, "
                 f"{best.user_attrs.get('trainable_params', 0):,} for the best).")
    return text


def plot_best_per_method(study: optuna.Study, cfg: Config) -> tuple[Figure | None, str]:
    best = best_per_method(study)
    if not best:
        return None, "No trial has completed yet."
    names = sorted(best)
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.5 * len(names)))
    bars = ax.barh(names, [best[m].values[0] for m in names])
    ax.bar_label(bars, [f"{best[m].values[0]:.2f} (trial {best[m].number})" for m in names],
                 padding=3, fontsize=8)
    ax.margins(x=0.3)
    ax.set(title=f"Best validation {label(cfg.search.metric)} per method", xlabel=_axis(cfg),
           ylabel="method")
    return fig, "The best complete trial of each method tried."


def plot_cost(study: optuna.Study, cfg: Config) -> tuple[Figure | None, str]:
    timed = [t for t in study.trials if t.duration is not None]
    if not timed:
        return None, "No trial has finished yet."
    colors = {TrialState.COMPLETE: "tab:blue", TrialState.PRUNED: "tab:orange",
              TrialState.FAIL: "tab:red"}
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar([t.number for t in timed], [_seconds(t) for t in timed],
           color=[colors.get(t.state, "grey") for t in timed])
    states = sorted({t.state for t in timed}, key=lambda s: s.value)
    ax.legend(handles=[Patch(color=colors.get(s, "grey"), label=s.name.lower())
                       for s in states], fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title="Wall time per trial", xlabel="trial", ylabel="seconds")
    return fig, pruning_savings(study, cfg)


def pruning_savings(study: optuna.Study, cfg: Config) -> str:
    """What pruned trials cost and roughly what they saved next to an average full trial."""
    timed = [t for t in study.trials if t.duration is not None]
    pruned = [t for t in timed if t.state == TrialState.PRUNED]
    complete = [t for t in timed if t.state == TrialState.COMPLETE]
    if not pruned:
        return f"No trial was pruned (pruner: {html.escape(cfg.search.pruner)})."
    spent = sum(_seconds(t) for t in pruned)
    text = f"{len(pruned)} of {len(timed)} trials were pruned; they ran {spent:.0f} s in all"
    stopped = [max(t.intermediate_values) for t in pruned if t.intermediate_values]
    last = [max(t.intermediate_values) for t in complete if t.intermediate_values]
    if stopped and last:
        at = f"{min(stopped)}" if min(stopped) == max(stopped) else \
            f"{min(stopped)}-{max(stopped)}"
        text += (f", stopping at step {at} where complete trials went on to step "
                 f"{max(last)} (their last validation)")
    if not complete:
        return text + "."
    full = sum(_seconds(t) for t in complete) / len(complete)
    saved = max(0.0, len(pruned) * full - spent)
    total = sum(_seconds(t) for t in timed)
    return (text + f". A complete trial took {full:.0f} s on average, so pruning saved about "
            f"{saved:.0f} s ({saved / max(total + saved, 1e-9):.0%} of what the trials would "
            "have taken unpruned).")


def plot_importances(study: optuna.Study, cfg: Config) -> tuple[Figure | None, str]:
    done = _complete(study)
    shared = set.intersection(*(set(t.params) for t in done)) if done else set()
    varying = sorted(p for p in shared if len({repr(t.params[p]) for t in done}) > 1)
    if len(done) < MIN_COMPLETE_FOR_IMPORTANCE or len(varying) < 2:
        return None, (
            "Parameter importances are not shown: they need at least "
            f"{MIN_COMPLETE_FOR_IMPORTANCE} complete trials in which two or more parameters "
            f"vary, and this study has {len(done)} complete trial(s)"
            + (f" varying {', '.join(html.escape(p) for p in varying)}" if varying else "")
            + ". With fewer, a ranking would be noise.")
    target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
    importances = optuna.importance.get_param_importances(study, params=varying, target=target)
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.45 * len(names)))
    ax.barh(names, [importances[n] for n in names])
    ax.set(title=f"What explains validation {label(cfg.search.metric)} "
           f"(fANOVA over {len(done)} complete trials)",
           xlabel="share of the variance explained", ylabel="parameter")
    return fig, ("Parameters that never changed are left out; conditional ones (a method's "
                 "own options) only count where every complete trial has them.")


def plot_tradeoffs(study: optuna.Study, cfg: Config) -> tuple[Figure | None, str]:
    """Validation score against trainable parameters and against generation seconds per
    document, each complete trial with its bootstrap interval: the front a user picks a
    smaller or faster adapter from, within noise of the best."""
    done = [t for t in _complete(study) if "trainable_params" in t.user_attrs]
    if not done:
        return None, "No complete trial has recorded its trainable parameters yet."
    found = within_noise(study)
    close = {found[0].number, *(t.number for t in found[1])} if found else set()
    axes_of = [("trainable_params", "trainable parameters", True),
               ("generation_seconds_per_document", "generation seconds per document", False)]
    axes_of = [a for a in axes_of if any(a[0] in t.user_attrs for t in done)]
    fig, axes = plt.subplots(1, len(axes_of), figsize=(8, 3.8), squeeze=False)
    for ax, (key, name, log_scale) in zip(axes[0], axes_of, strict=True):
        for t in (t for t in done if key in t.user_attrs):
            scores = t.user_attrs.get("document_scores")
            mean, low, high = mean_interval(scores) if scores else (t.values[0],) * 3
            ax.errorbar(t.user_attrs[key], t.values[0], yerr=[[mean - low], [high - mean]],
                        fmt="o", color="tab:red" if t.number in close else "tab:blue",
                        capsize=3)
            ax.annotate(str(t.number), (t.user_attrs[key], t.values[0]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        if log_scale:
            ax.set_xscale("log")
        ax.set(xlabel=name, ylabel=_axis(cfg) if ax is axes[0][0] else None)
    fig.suptitle(f"Validation {label(cfg.search.metric)} against size and generation speed",
                 fontsize=10)
    return fig, ("Each complete trial (its number beside it) with the 95% bootstrap interval "
                 "of its validation score; red: the best trial and those within noise of it. "
                 "Among the red ones, the leftmost is the smallest (or fastest) adapter the "
                 "validation set cannot tell from the best.")


def plot_pareto(study: optuna.Study, cfg: Config) -> tuple[Figure | None, str]:
    names = [label(m) for m in study.metric_names or []] or None
    ax = ovm.plot_pareto_front(study, target_names=names)
    return ax.get_figure(), "Complete trials on both objectives; the front is highlighted."


PLOTS: list[tuple[str, str, Callable[[optuna.Study, Config], tuple[Figure | None, str]]]] = [
    ("objective", "Validation score per trial", plot_objective),
    ("validation_loss", "Validation loss per step", plot_loss),
    ("best_per_method", "Best trial per method", plot_best_per_method),
    ("cost", "Cost", plot_cost),
    ("tradeoffs", "Score against size and speed", plot_tradeoffs),
    ("importances", "Parameter importances", plot_importances),
]


def _figures(run: RunDir, study: optuna.Study, cfg: Config) -> str:
    """Each plot as a heading, a sentence on what it shows, and the PNG inlined (also kept
    as ``report/NAME.png``); a plot that cannot be drawn yet says why instead."""
    plots = PLOTS + ([("pareto_front", "Pareto front", plot_pareto)]
                     if len(study.directions) > 1 else [])
    parts = []
    for name, title, draw in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's "experimental" notices
            fig, note = draw(study, cfg)
        parts.append(f"<h3>{title}</h3><p>{note}</p>")
        if fig is not None:
            fig.set_size_inches(8, max(fig.get_size_inches()[1], 3.0))
            fig.tight_layout()
            path = run.report / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=90)
            plt.close(fig)
            data = base64.b64encode(path.read_bytes()).decode()
            parts.append(f"<img alt='{title}' src='data:image/png;base64,{data}'>")
    return "".join(parts)


def _value(trial: FrozenTrial) -> str:
    return ", ".join(f"{v:.4g}" for v in trial.values) if trial.values else ""


def trial_interval(trial: FrozenTrial) -> str:
    """The 95% bootstrap interval of a trial's mean validation score over its documents."""
    scores = trial.user_attrs.get("document_scores")
    if not scores:
        return ""
    _, low, high = mean_interval(scores)
    return f"[{low:.2f}, {high:.2f}]"


def _attr(trial: FrozenTrial, key: str, fmt: str) -> str:
    value = trial.user_attrs.get(key)
    return fmt.format(value) if value is not None else ""


def _trial_rows(study: optuna.Study) -> str:
    rows = []
    for t in study.trials:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in t.params.items())
        reason = t.user_attrs.get("reason", "")
        number = f"{t.number} (default)" if t.user_attrs.get(DEFAULT_ATTR) else str(t.number)
        rows.append(f"<tr><td>{number}</td><td>{t.state.name.lower()}</td>"
                    f"<td>{_value(t)}</td><td>{trial_interval(t)}</td>"
                    f"<td>{_attr(t, 'loop_rate', '{:.0%}')}</td>"
                    f"<td>{_attr(t, 'trainable_params', '{:,}')}</td>"
                    f"<td>{_attr(t, 'generation_seconds_per_document', '{:.2f}')}</td>"
                    f"<td>{html.escape(params)}</td>"
                    f"<td>{_seconds(t):.0f} s</td><td>{html.escape(reason)}</td></tr>")
    return "".join(rows)


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 6px;
font-size:90%;vertical-align:top;text-align:left}tr.diff td{background:#f6f6f6}
table.examples{table-layout:fixed;width:100%}
table.examples th:first-child{width:40%}pre{background:#f4f4f4;padding:.6em}
img{max-width:100%}small{color:#555}"""


def write(run_dir: Path) -> Path:
    """Write ``report/index.html`` (and its PNGs) under ``run_dir``; return the HTML path."""
    cfg, study = load_study(run_dir)
    run = RunDir(run_dir)
    states = [t.state.name.lower() for t in study.trials]
    counts = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
    metric = label(cfg.search.metric)
    best_rows = "".join(
        f"<tr><td>{html.escape(m)}</td><td>{t.number}</td><td>{_value(t)}</td>"
        f"<td>{t.user_attrs.get('trainable_params', '')}</td></tr>"
        for m, t in sorted(best_per_method(study).items()))
    name = html.escape(study.study_name)
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>peftune search: {name}</title><style>{STYLE}</style></head><body>
<h1>Search {name}</h1>
<p>{len(states)} trials ({counts}) of {html.escape(', '.join(cfg.search.methods))} on
{html.escape(cfg.data.source)} with {html.escape(cfg.model.name)}, chosen by validation
{metric} on {cfg.search.eval_examples} examples; the best configuration was then trained
again and scored once on the test split.</p>
<h2>Test split: zero-shot, default and best configuration</h2>{_headline(run, cfg)}
<p>{html.escape(noise_sentence(study))}</p>
<h2>Examples</h2>{_examples(run)}
<h2>How to use the result</h2>{_usage(run)}
<h2>The search</h2>{_figures(run, study, cfg)}
<h3>Best trial per method</h3><table><tr><th>method</th><th>trial</th>
<th>validation {metric}</th><th>trainable params</th></tr>{best_rows}</table>
<h3>All trials</h3><p>{html.escape(noise_sentence(study))}</p>
<table><tr><th>#</th><th>state</th><th>value</th><th>95% interval</th><th>looping</th>
<th>trainable params</th><th>generation s/doc</th><th>params</th><th>time</th><th>reason</th>
</tr>{_trial_rows(study)}</table>
<p>95% interval: percentile bootstrap of the mean over the validation documents (2,000
resamples). Looping: the share of validation summaries in which some 4 words recur 3 times
or more.</p></body></html>"""
    out = run.report / "index.html"
    atomic_write(out, page)
    return out


# ---------------------------------------------------------------- peftune compare

COLUMNS = [  # (key, Markdown header, format)
    ("method", "method", "{}"),
    ("learning_rate", "lr", "{:g}"),
    ("rouge1", "ROUGE-1", "{:.2f}"),
    ("rouge2", "ROUGE-2", "{:.2f}"),
    ("rougeL", "ROUGE-L", "{:.2f}"),
    ("trainable_parameters", "trainable params", "{:,}"),
    ("adapter_mib", "adapter MiB", "{:.2f}"),
    ("train_tokens_per_s", "train tokens/s", "{:.0f}"),
    ("peak_memory_mib", "peak MiB", "{:.0f}"),
    ("wall_s", "wall s", "{:.0f}"),
]


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [head, "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        if "error" in row:
            cells = [row["method"], f"{row['learning_rate']:g}", f"not run: {row['error']}"]
            cells += [""] * (len(COLUMNS) - len(cells))
        else:
            cells = [fmt.format(row[key]) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_compare(rows: list[dict[str, Any]], out: Path, *, title: str) -> None:
    memory = "peak CUDA memory allocated" if _has_cuda() else "peak process RSS"
    text = (f"# {title}\n\n{markdown(rows)}\npeak MiB: {memory}; tokens/s: non-padding input "
            "tokens per second of training; wall s: load, train and score.\n")
    atomic_write(out / "compare.md", text)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[k for k, _, _ in COLUMNS] + ["error"],
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "compare.csv", buffer.getvalue())
    plot_compare(rows, out / "compare.png", title=title)
    print(f"\n{text}\ntables: {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'compare.png'}")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def plot_compare(rows: list[dict[str, Any]], path: Path, *, title: str) -> None:
    done = [r for r in rows if "error" not in r]
    keys = ("rouge1", "rouge2", "rougeL")
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(done) + 2), 4))
    for k, key in enumerate(keys):
        ax.bar([i + (k - 1) * width for i in range(len(done))], [r[key] for r in done],
               width, label=key.replace("rouge", "ROUGE-"))
    ax.set_xticks(range(len(done)), [r["method"] for r in done], rotation=30, ha="right")
    ax.set_ylabel("F1 x 100")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
