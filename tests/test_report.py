"""The search report, from a run directory built by hand: a study with known trials, the
predictions files ``finalize`` leaves, and no training (seconds, not minutes)."""

import html
import json
import os
import re
import shutil
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import datasets
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from peftune import config_from_dict, report
from peftune import search as searching
from peftune.config import save_yaml
from peftune.generation import write_outputs
from peftune.metrics import rouge
from peftune.rundir import RunDir
from peftune.search import DEFAULT_ATTR

DISTRIBUTIONS = {"method": CategoricalDistribution(["lora", "ia3"]),
                 "learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
                 "batch_size": CategoricalDistribution([4, 8])}
REFS = [f"summary {i} of alpha beta gamma" for i in range(12)]
BEST = [f"summary {i} of alpha beta" for i in range(12)]


def _trial(number, state, *, value=None, losses=(), seconds=60.0):
    start = datetime(2026, 1, 1) + timedelta(hours=number)
    params = {"method": ("lora", "ia3")[number % 2], "learning_rate": 1e-4 * (1 + number),
              "batch_size": (4, 8)[(number // 2) % 2]}
    # the study maximizes ROUGE, so Optuna holds the negated validation loss
    return FrozenTrial(number=number, state=state, value=value, datetime_start=start,
                       datetime_complete=start + timedelta(seconds=seconds), params=params,
                       distributions=DISTRIBUTIONS, user_attrs={"trainable_params": 1000},
                       system_attrs={}, trial_id=number,
                       intermediate_values={2 * (i + 1): -loss for i, loss in enumerate(losses)})


def make_run(tmp_path: Path, *, complete: int, pruned: int) -> tuple[Path, optuna.Study]:
    run = tmp_path / "run"
    cfg = config_from_dict({"output_dir": str(run), "search": {
        "metric": "rougeL", "eval_examples": 8, "intermediate_steps": 2, "prune_signal": "loss",
        "methods": ["lora", "ia3"]}})
    save_yaml(cfg, run / "config.yaml")
    save_yaml(cfg, run / "best.yaml")
    study = searching.create_study(cfg)
    for n in range(complete):
        study.add_trial(_trial(n, TrialState.COMPLETE, value=20.0 + n % 5,
                               losses=(3.0, 2.5, 2.0 - 0.1 * n)))
    for n in range(complete, complete + pruned):
        study.add_trial(_trial(n, TrialState.PRUNED, losses=(3.5,), seconds=15.0))
    test = datasets.Dataset.from_dict({
        "id": [f"paper-{i}" for i in range(12)],
        "document": [f"<b>Paper {i}</b> " + "alpha beta gamma " * 40 for i in range(12)],
        "summary": REFS})
    # zero-shot far off; the default as good as the best but on two documents
    systems = {"zero-shot": ["omega"] * 12, "default": BEST[:10] + ["omega", "omega"],
               "final": BEST}
    for name, preds in systems.items():
        write_outputs(run / name, "test", test, preds, rouge(preds, REFS))
    (run / "final" / "adapter").mkdir()
    searching.final._compare(RunDir(run), test, baselines=["zero-shot", "default"], seed=0)
    return run, study


def _text(page: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))


def test_report_leads_with_the_test_split_and_says_what_is_noise(tmp_path):
    run, _ = make_run(tmp_path, complete=4, pruned=2)
    page = report.write(run).read_text()
    metrics = json.loads((run / "final" / "metrics.json").read_text())
    comparison = metrics["comparison"]
    assert comparison["documents"] == 12 and comparison["resamples"] >= 1000
    text = _text(page)
    zero = comparison["best - zero-shot"]["rougeL"]
    default = comparison["best - default"]["rougeL"]
    assert zero["low"] > 0 and default["low"] <= 0 <= default["high"]
    # the same numbers as metrics.json, in words
    assert (f"ROUGE-L, best - default configuration: {default['difference']:+.2f} points, "
            f"95% interval [{default['low']:+.2f}, {default['high']:+.2f}]: cannot tell apart "
            "from noise on 12 documents.") in text
    assert "best configuration is better than zero-shot" in text
    assert f"{comparison['test']['zero-shot']['rouge1']:.2f}" in text
    # examples: escaped documents, cut, beside their reference and both summaries
    assert "&lt;b&gt;Paper 0&lt;/b&gt;" in page and "<b>Paper" not in page
    assert BEST[0] in text and "omega" in text
    longest = max(re.findall(r"<td>(&lt;b&gt;Paper 0[^<]*)<br>", page), key=len)
    assert len(longest) < 420 and longest.endswith("…")
    # how to use it
    assert f"peftune summarize {run}/final" in text and "--format merged" in text
    assert f"{run}/best.yaml" in text
    assert "Parameter importances are not shown" in text and "4 complete trial(s)" in text
    assert "2 of 6 trials were pruned" in text
    assert page.count("data:image/png;base64,") == 5
    # and under `peftune search`'s closing table
    lines = report.difference_lines(comparison, metric="rougeL")
    assert lines[2].split()[:3] == ["best", "-", "default"]
    assert f"{default['difference']:+.2f} [{default['low']:+.2f}, {default['high']:+.2f}]" \
        in lines[2]
    assert lines[-2].endswith("cannot tell apart from noise on 12 documents.")
    assert lines[-1] == (
        "Bottom line (ROUGE-L, 12 test documents): the searched configuration beats zero-shot "
        "beyond noise; it does not beat default configuration beyond noise (the interval of "
        "the difference includes 0).")
    assert lines[-1] in text


def test_bottom_line_says_plainly_when_the_winner_beats_every_baseline():
    comparison = {"documents": 48, "best - zero-shot": {"rougeL": {
        "difference": 4.2, "low": 2.4, "high": 6.0}}, "best - default": {"rougeL": {
            "difference": 5.0, "low": 2.4, "high": 7.4}}}
    assert report.bottom_line(comparison, "rougeL") == (
        "Bottom line (ROUGE-L, 48 test documents): the searched configuration beats zero-shot "
        "and default configuration beyond noise.")
    comparison["best - default"]["rougeL"].update(difference=-3.0, low=-5.0, high=-1.0)
    assert report.bottom_line(comparison, "rougeL").endswith(
        "beats zero-shot beyond noise; it is worse than default configuration beyond noise.")
    # the search chose the default configuration itself
    comparison["best - default"]["rougeL"].update(difference=0.0, low=0.0, high=0.0)
    assert report.bottom_line(comparison, "rougeL") == (
        "Bottom line (ROUGE-L, 48 test documents): the searched configuration scores as "
        "default configuration does on every document (the search chose it, or a model that "
        "writes the same summaries); it beats zero-shot beyond noise.")
    assert report.verdict(comparison, "default", "rougeL").endswith(
        "+0.00 points, 95% interval [+0.00, +0.00]: the same score on every one of the 48 "
        "documents.")


def _scored_study(scores: dict[int, list[float]], params: dict[int, int],
                  default: int | None = None) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for number, docs in scores.items():
        trial = _trial(number, TrialState.COMPLETE, value=sum(docs) / len(docs))
        if number == default:
            trial.set_user_attr(DEFAULT_ATTR, True)
        trial.set_user_attr("document_scores", docs)
        trial.set_user_attr("trainable_params", params[number])
        trial.set_user_attr("loop_rate", 0.25)
        study.add_trial(trial)
    return study


def test_top_trials_within_noise_are_named_with_the_smallest_adapter():
    # trial 1 is 0.5 points ahead of trial 2 on average, but not on every document; trial 0
    # is behind on all 12
    best = [30.0, 20.0, 40.0, 25.0, 35.0, 22.0, 31.0, 28.0, 26.0, 33.0, 29.0, 24.0]
    close = [v + (3.0 if i % 2 else -4.0) for i, v in enumerate(best)]
    far = [v - 10.0 for v in best]
    study = _scored_study({0: far, 1: best, 2: close}, {0: 500, 1: 9000, 2: 1200})
    best_trial, ties = report.within_noise(study)
    assert best_trial.number == 1 and [t.number for t in ties] == [2]
    assert report.noise_sentence(study) == (
        "The top trials are within noise of each other: trial 2 cannot be told apart from "
        "the best, trial 1 (the paired bootstrap 95% interval of the difference on the same "
        "12 validation documents includes 0), so the ranking among them may be chance. The "
        "smallest adapter among them is trial 2's (1,200 trainable parameters, 9,000 for the "
        "best).")
    # trial 0's own interval is in the trial table, beside its loop rate
    rows = report._trial_rows(study)
    low, high = [float(x) for x in report.trial_interval(study.trials[0]).strip("[]").split(",")]
    assert low < sum(far) / 12 < high and "[" in rows and "25%" in rows
    # and in the size/speed view, each trial with its interval
    fig, note = report.plot_tradeoffs(study, config_from_dict({}))
    points = [line for ax in fig.axes for line in ax.lines if line.get_marker() == "o"]
    assert len(fig.axes) == 1 and len(points) == 3  # no generation times recorded here
    assert {p.get_color() for p in points} == {"tab:red", "tab:blue"} and "within noise" in note


def test_a_best_trial_ahead_beyond_noise_is_said_to_be():
    best = [30.0 + i for i in range(12)]
    study = _scored_study({0: [v - 5.0 for v in best], 1: best}, {0: 500, 1: 9000})
    assert report.within_noise(study)[1] == []
    assert report.noise_sentence(study).startswith(
        "Trial 1 is ahead of every other complete trial beyond noise")
    plain = optuna.create_study(direction="maximize")  # no per-document scores: no claim
    plain.add_trial(_trial(0, TrialState.COMPLETE, value=20.0))
    assert report.within_noise(plain) is None and report.noise_sentence(plain) == ""


def test_the_noise_sentence_says_where_the_default_trial_stands():
    best = [30.0, 20.0, 40.0, 25.0, 35.0, 22.0, 31.0, 28.0, 26.0, 33.0, 29.0, 24.0]
    close = [v + (3.0 if i % 2 else -4.0) for i, v in enumerate(best)]
    far = [v - 10.0 for v in best]
    sizes = {0: 500, 1: 9000, 2: 1200}
    said = {default: report.noise_sentence(_scored_study({0: far, 1: best, 2: close}, sizes,
                                                         default=default))
            for default in (0, 1, 2)}
    assert said[0].endswith(" Trial 0, the default configuration, is behind the best beyond "
                            "noise.")
    assert said[1].endswith(" The best is trial 1, the default configuration itself: no "
                            "searched configuration scored higher on these 12 validation "
                            "documents.")
    assert said[2].endswith(" Trial 2, the default configuration, is one of them.")
    rows = report._trial_rows(_scored_study({0: far, 1: best}, sizes, default=0))
    assert "<td>0 (default)</td>" in rows and "<td>1</td>" in rows


def test_plots_say_what_they_show(tmp_path):
    run, study = make_run(tmp_path, complete=9, pruned=2)
    cfg, _ = report.load_study(run)
    fig, _ = report.plot_loss(study, cfg)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "validation loss" and ax.get_xlabel() == "optimizer step"
    losses = [y for line in ax.get_lines() for y in line.get_ydata()]
    assert min(losses) > 0, "the loss is shown as it was, not as Optuna's negated value"
    fig, _ = report.plot_objective(study, cfg)
    assert fig.axes[0].get_title() == "Validation ROUGE-L per trial"
    assert "8 validation examples" in fig.axes[0].get_ylabel()
    fig, note = report.plot_importances(study, cfg)
    assert fig is not None, note
    assert {t.get_text() for t in fig.axes[0].get_yticklabels()} == {
        "batch_size", "learning_rate", "method"}
    note = report.pruning_savings(study, cfg)
    # 9 complete trials of 60 s; 2 pruned of 15 s each: 2 * 60 - 30 = 90 s saved
    assert "ran 30 s in all" in note and "saved about 90 s" in note


def _chromium() -> str | None:
    return os.environ.get("PEFTUNE_TEST_CHROMIUM") or shutil.which("chromium") \
        or shutil.which("chromium-browser")


def _no_browser(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}")
    pytest.skip(reason)


# Appended to a copy of the page: once everything has loaded, write what the reader sees.
CHECK = """<script>window.addEventListener("load", () => {
  const images = [...document.images];
  const out = document.createElement("pre");
  out.id = "check";
  out.textContent = JSON.stringify({images: images.length,
    loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    text: document.body.innerText});
  document.body.appendChild(out);
});</script>"""


def test_report_renders_in_a_real_browser(tmp_path):
    browser = _chromium()
    if not browser:
        _no_browser("no chromium: scripts/chromium-path.sh installs Debian's chromium package")
    run, _ = make_run(tmp_path, complete=9, pruned=2)
    page = report.write(run)
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    try:
        done = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as err:
        _no_browser(f"{browser} could not be started: {err}")
    found = re.search(r'<pre id="check">(.*?)</pre>', done.stdout, re.S)
    if not found:
        _no_browser(f"{browser} rendered nothing (exit {done.returncode}): "
                    f"{done.stderr.strip()[-300:]}")
    seen = json.loads(html.unescape(found.group(1)))
    assert seen["images"] == 6 and seen["loaded"] == 6, "every plot is drawn"
    for expected in ("Test split: zero-shot, default and best configuration",
                     "cannot tell apart from noise on 12 documents",
                     "<b>Paper 0</b>",  # shown as text, not taken as markup
                     f"peftune export {run}/final --format merged",
                     "Validation loss per step", "Parameters that never changed"):
        assert expected in seen["text"], expected
