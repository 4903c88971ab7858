"""The run folder's layout has one owner, RunDir: the paths, the settings and the metrics."""

import ast
import logging
from pathlib import Path

import pytest
import yaml

from peftune import rundir
from peftune.rundir import RunDir

SRC = Path(rundir.__file__).parent


def test_a_search_folder_nests_run_folders():
    run = RunDir(Path("runs/demo"))
    assert run.final.predictions() == Path("runs/demo/final/predictions.jsonl")
    assert run.final.predictions("validation") == Path(
        "runs/demo/final/predictions_validation.jsonl")
    assert run.baseline("zero-shot").metrics_file == Path("runs/demo/zero-shot/metrics.json")
    assert run.trial(7).adapter == Path("runs/demo/trials/trial-0007/adapter")
    assert run.best_config.parent == run.study_db.parent == run.path


def test_metrics_keep_what_other_stages_recorded(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.metrics() == {}
    run.record_metrics("train", {"train_loss": 1.5})
    run.record_metrics("test", {"rougeL": 30.0})
    run.record_metrics("train", {"train_loss": 1.25})
    assert run.metrics() == {"train": {"train_loss": 1.25}, "test": {"rougeL": 30.0}}


def test_saved_settings_never_allow_remote_code(tmp_path, caplog):
    run = RunDir(tmp_path)
    run.config_file.write_text(yaml.safe_dump(
        {"seed": 3, "model": {"name": "x/y", "trust_remote_code": True}}))
    with caplog.at_level(logging.WARNING, logger="peftune.rundir"):
        cfg = run.config()
    assert cfg.seed == 3 and cfg.model.trust_remote_code is False
    assert "trust_remote_code; ignored" in caplog.text
    assert RunDir(tmp_path / "none").settings() == {}


# the files RunDir owns: their names appear in no other module's code (a baseline's folder
# is named after it, so "zero-shot" and "default" stay the systems' names elsewhere)
LAYOUT = {"metrics.json", "predictions.jsonl", "best.yaml", "config.yaml", "study.db",
          "study.journal", "examples.jsonl", "peftune.yaml", "final", "trials", "checkpoints"}


def _literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings}


def test_only_rundir_names_the_run_folders_files():
    found = {f"{path.relative_to(SRC)}: {name}" for path in SRC.rglob("*.py")
             if path.name != "rundir.py" for name in _literals(path) & LAYOUT}
    assert not found, f"run folder layout outside rundir.py: {sorted(found)}"


def _imported(path: Path) -> set[str]:
    """Modules ``path`` imports, ``from peftune import x`` counted as ``peftune.x``."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
    return out


@pytest.mark.parametrize("module", ["report.py", "card.py"])
def test_report_and_card_read_the_run_folder_without_assembly(module):
    imported = _imported(SRC / module)
    assert "peftune.assembly" not in imported and "peftune.rundir" in imported
