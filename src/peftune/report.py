"""A self-contained HTML report (plots embedded) and PNG files for a search run directory.

Run it with ``peftune report runs/NAME``. The study itself stays a plain Optuna study, so
``optuna-dashboard sqlite:///runs/NAME/study.db`` opens it as well.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from optuna.visualization import matplotlib as ovm  # noqa: E402

from peftune.assembly import folder_config  # noqa: E402
from peftune.errors import PeftuneError  # noqa: E402
from peftune.rundir import atomic_write  # noqa: E402


def load_study(run_dir: Path) -> tuple[Any, optuna.Study]:
    from peftune.search import storage_for

    if not (run_dir / "config.yaml").is_file():
        raise PeftuneError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = folder_config(run_dir / "config.yaml")
    name = cfg.search.study_name or run_dir.resolve().name
    try:
        return cfg, optuna.load_study(study_name=name, storage=storage_for(cfg))
    except KeyError:
        raise PeftuneError(f"{run_dir}: no study named '{name}' in its storage") from None


def _plots(study: optuna.Study) -> dict[str, Callable[[], Any]]:
    multi = len(study.directions) > 1
    first = {"target": (lambda t: t.values[0]), "target_name": study.metric_names[0]} \
        if multi and study.metric_names else {}
    plots: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: ovm.plot_optimization_history(study, **first),
        "intermediate_values": lambda: ovm.plot_intermediate_values(study),
        "param_importances": lambda: ovm.plot_param_importances(study, **first),
        "parallel_coordinate": lambda: ovm.plot_parallel_coordinate(study, **first),
    }
    if multi:
        plots["pareto_front"] = lambda: ovm.plot_pareto_front(study)
    return plots


def _render(run_dir: Path, study: optuna.Study) -> dict[str, str]:
    """Write each plot as PNG; return name -> base64 PNG (plots that cannot be drawn yet,
    e.g. importances with one trial, are skipped)."""
    images: dict[str, str] = {}
    for name, draw in _plots(study).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ax = draw()
            except (ValueError, RuntimeError, ZeroDivisionError):
                plt.close("all")
                continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
        fig.set_size_inches(8, 4.5)
        fig.tight_layout()
        path = run_dir / "report" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
        plt.close("all")
        images[name] = base64.b64encode(path.read_bytes()).decode()
    return images


def _value(trial: optuna.trial.FrozenTrial) -> str:
    return ", ".join(f"{v:.4g}" for v in trial.values) if trial.values else ""


def _trial_rows(study: optuna.Study) -> str:
    rows = []
    for t in study.trials:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in t.params.items())
        seconds = t.duration.total_seconds() if t.duration else None
        reason = t.user_attrs.get("reason", "")
        rows.append(f"<tr><td>{t.number}</td><td>{t.state.name}</td><td>{_value(t)}</td>"
                    f"<td>{html.escape(params)}</td><td>{seconds or 0:.0f}s</td>"
                    f"<td>{html.escape(reason)}</td></tr>")
    return "".join(rows)


def best_per_method(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    best: dict[str, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        method = t.params.get("method", "?")
        if method not in best or (t.values[0] > best[method].values[0]) == maximize:
            best[method] = t
    return best


def write(run_dir: Path) -> Path:
    """Write ``report/index.html`` (and its PNGs) under ``run_dir``; return the HTML path."""
    cfg, study = load_study(run_dir)
    images = _render(run_dir, study)
    metric = cfg.search.metric
    best_rows = "".join(
        f"<tr><td>{m}</td><td>{t.number}</td><td>{_value(t)}</td>"
        f"<td>{t.user_attrs.get('trainable_params', '')}</td></tr>"
        for m, t in sorted(best_per_method(study).items()))
    final_path = run_dir / "final" / "metrics.json"
    final = json.loads(final_path.read_text()).get("test") if final_path.is_file() else None
    figures = "".join(f"<h2>{name.replace('_', ' ')}</h2><img src='data:image/png;base64,{b}'>"
                      for name, b in images.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>peftune search: {html.escape(study.study_name)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px;font-size:90%}}
img{{max-width:100%}}</style></head><body>
<h1>Search {html.escape(study.study_name)}</h1>
<p>Objective: {metric} on {cfg.search.eval_examples} validation examples
({study.directions[0].name.lower()}); {len(study.trials)} trials.</p>
{"<h2>Final model on the test split</h2><pre>" + html.escape(json.dumps(final, indent=1))
 + "</pre>" if final else ""}
<h2>Best trial per method</h2><table><tr><th>method</th><th>trial</th><th>value</th>
<th>trainable params</th></tr>{best_rows}</table>
{figures}
<h2>All trials</h2><table><tr><th>#</th><th>state</th><th>value</th><th>params</th>
<th>time</th><th>reason</th></tr>{_trial_rows(study)}</table></body></html>"""
    out = run_dir / "report" / "index.html"
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
