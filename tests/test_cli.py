import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from peftune.cli import main

ROUGE_KEYS = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


def _scores(metrics):
    return {k: metrics[k] for k in ROUGE_KEYS}


def _rouge_of(rows):
    """ROUGE recomputed from predictions.jsonl rows with rouge_score itself."""
    from rouge_score import rouge_scorer

    from peftune.metrics import split_sentences

    scorer = rouge_scorer.RougeScorer(ROUGE_KEYS, use_stemmer=True)
    scores = [scorer.score(split_sentences(r["reference"]), split_sentences(r["prediction"]))
              for r in rows]
    return {k: pytest.approx(100 * sum(s[k].fmeasure for s in scores) / len(rows), abs=1e-4)
            for k in ROUGE_KEYS}


def _write_cfg(tmp_path, cfg):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_train_evaluate_summarize_end_to_end(tiny_cfg, tmp_path, capsys,
                                                  monkeypatch):
    path = _write_cfg(tmp_path, tiny_cfg)
    assert main(["-q", "train", "--config", str(path), "--lora.r", "4"]) == 0
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lora"]["r"] == 4 and saved["train"]["max_steps"] == 3
    assert main(["-q", "evaluate", "--adapter", str(run), "--eval.zero_shot", "true"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"train", "test", "zero_shot_test"} <= metrics.keys()
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"id", "prediction", "reference"} <= rows[0].keys()
    assert _scores(metrics["test"]) == _rouge_of(rows)
    assert metrics["test"]["num_examples"] == 4
    # the data's own `id` column, although data.id_column is unset
    assert [r["id"] for r in rows] == ["doc16", "doc17", "doc18", "doc19"]
    assert not (run / "adapter" / "training_args.bin").exists()
    captured = capsys.readouterr()
    assert "ROUGE-L" in captured.out and "zero-shot" in captured.out
    # -q: no progress bars, and no log dicts printed instead of them
    assert "{'loss'" not in captured.out and "it/s]" not in captured.err
    assert "settings: lora: r=4, alpha=32, dropout=0.1, target_modules=default" in captured.out
    assert main(["-q", "summarize", str(run), "alpha beta gamma delta ."]) == 0
    # summarize gives the text evaluate scored (fp32: identical on every path), whether the
    # document comes as an argument, from stdin, from a text file or from a .jsonl file
    test_rows = [json.loads(line) for line in
                 (Path(tiny_cfg["data"]["source"]) / "test.jsonl").read_text().splitlines()]
    document, expected = test_rows[1]["document"], rows[1]["prediction"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(document))
    capsys.readouterr()
    assert main(["-q", "summarize", str(run)]) == 0
    assert capsys.readouterr().out == expected + "\n"
    (tmp_path / "doc.txt").write_text(document)
    assert main(["-q", "summarize", str(run), "--input", str(tmp_path / "doc.txt")]) == 0
    assert capsys.readouterr().out == expected + "\n"
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"document": r["document"]}) + "\n" for r in test_rows))
    assert main(["-q", "summarize", str(run / "adapter"), "--input", str(docs)]) == 0
    assert capsys.readouterr().out.splitlines() == [r["prediction"] for r in rows]


@pytest.mark.skipif(not __import__("peftune.devices").devices.bf16_supported(),
                    reason="this CPU has no bf16 arithmetic: precision auto is fp32 here")
def test_default_precision_trains_and_evaluates_an_adapter_in_bf16(tiny_cfg, tmp_path,
                                                                 capsys):
    """What users run: no precision set, so bf16 training and a bf16 evaluation of the
    adapter loaded onto the base; every score is the ROUGE of the texts it wrote."""
    del tiny_cfg["train"]["precision"]
    tiny_cfg["train"].update(learning_rate=5e-2, max_steps=4)
    tiny_cfg["lora"] = {"target_modules": ["all-linear"]}
    path = _write_cfg(tmp_path, tiny_cfg)
    assert main(["-q", "train", "--config", str(path)]) == 0
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["precision"] == "auto"
    assert main(["-q", "evaluate", "--adapter", str(run), "--eval.zero_shot", "true"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    tuned, zero = ([json.loads(line) for line in (run / name).read_text().splitlines()]
                   for name in ("predictions.jsonl", "predictions_zero_shot_test.jsonl"))
    assert _scores(metrics["test"]) == _rouge_of(tuned)
    assert _scores(metrics["zero_shot_test"]) == _rouge_of(zero)
    assert [r["prediction"] for r in tuned] != [r["prediction"] for r in zero], \
        "the adapter changed nothing on the bf16 path"
    assert "Traceback" not in capsys.readouterr().err


@pytest.fixture
def restore_log_level():
    logger = logging.getLogger("peftune")
    level = logger.level
    yield
    logger.setLevel(level)


def test_train_shows_progress_and_says_when_a_budget_trains_next_to_nothing(
        tiny_cfg, tmp_path, capsys, caplog, restore_log_level):
    """8 examples at batch 8: one optimizer step. It warns, and warmup (ceil(0.05 * 1) = 1
    step in transformers) must not make that step's learning rate 0."""
    tiny_cfg["data"]["max_train_examples"] = 8
    tiny_cfg["train"].update(max_steps=-1, epochs=1, batch_size=8, micro_batch_size=4,
                             warmup_ratio=0.05)
    path = _write_cfg(tmp_path, tiny_cfg)
    assert main(["train", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "1/1 [" in err and "loss=" in err and "Loading weights" not in err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("only 1 optimizer step" in w for w in warnings), warnings
    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # B starts at 0: it moved


def test_search_points_at_the_final_model_only_when_there_is_one(tmp_path, capsys,
                                                                monkeypatch):
    from types import SimpleNamespace

    from peftune import commands, config_from_dict, report, search

    cfg = config_from_dict({"output_dir": str(tmp_path)})
    study = SimpleNamespace(study_name="s", trials=[])
    monkeypatch.setattr(search, "run", lambda cfg, argv=None: (study, None))
    monkeypatch.setattr(report, "write", lambda run_dir: run_dir / "report" / "index.html")
    commands.search_command(cfg)
    assert "peftune summarize" not in capsys.readouterr().out
    (tmp_path / "final" / "adapter").mkdir(parents=True)
    commands.search_command(cfg)
    assert f"next:    peftune summarize {tmp_path / 'final'}" in capsys.readouterr().out


@pytest.mark.parametrize("overrides,message", [
    (["--model.name", "./no/such/model"], "model path not found: ./no/such/model"),
    (["--data.source", "./missing.jsonl"], "data file not found: ./missing.jsonl"),
    (["--data.document_column", "article"], "no column 'article'"),
    (["--train.learning_rate", "-0.1"], "train.learning_rate must be > 0"),
    (["--lora.r", "x"], "lora.r must be int"),
])
def test_user_errors_are_one_line_with_exit_2(tiny_cfg, tmp_path, capsys, overrides, message):
    path = _write_cfg(tmp_path, tiny_cfg)
    assert main(["-q", "train", "--config", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("peftune: error: ") and message in last


def test_invalid_yaml_and_unknown_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "invalid YAML in" in capsys.readouterr().err
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  epochz: 3\n")
    assert main(["train", "--config", str(unknown)]) == 2
    assert "unknown config key 'train.epochz'" in capsys.readouterr().err


def test_empty_split_is_an_error(tiny_cfg, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text('{"document": "a b", "summary": "a"}\n' * 3)
    (data / "test.csv").write_text("document,summary\n")
    tiny_cfg["data"]["source"] = str(data)
    path = _write_cfg(tmp_path, tiny_cfg)
    assert main(["-q", "evaluate", "--config", str(path)]) == 2
    assert "test split is empty" in capsys.readouterr().err


def test_summarize_without_adapter_is_an_error(tmp_path, capsys):
    assert main(["summarize", str(tmp_path), "text"]) == 2
    assert "no adapter found" in capsys.readouterr().err


def _help(argv, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def _entry(out, flag):
    """The help text of one option, joined onto one line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(flag + " "))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("--")
                or not lines[i].strip()), len(lines))
    return " ".join(" ".join(lines[start:end]).split())


@pytest.mark.parametrize("command,bound", [
    ("train", 165), ("search", 230), ("compare", 170), ("evaluate", 90), ("summarize", 60),
])
def test_command_help_is_short_and_never_repeats_a_default(command, bound, capsys):
    out = _help([command], capsys)
    assert len(out.splitlines()) <= bound
    assert "peftune methods" in out
    flat = " ".join(out.split())
    assert not re.search(r"\(default: [^()]*\)\s*\(default:", flat)


def test_help_shows_each_command_its_own_keys_and_the_chosen_methods_options(capsys):
    out = _help(["train"], capsys)
    assert "--lora.r" in out and "--train.learning_rate" in out and "--eval.num_beams" in out
    assert "--ia3." not in out and "--search." not in out and "--prefix." not in out
    out = _help(["train", "--method", "ia3"], capsys)
    assert "--ia3.target_modules" in out and "--lora.r" not in out
    out = _help(["search"], capsys)
    assert "--search.n_trials" in out and "--search.space.learning_rate" in out
    out = _help(["evaluate"], capsys)
    assert "--eval.num_beams" in out and "--train.precision" in out
    assert "--train.learning_rate" not in out and "--lora.r" not in out


def test_the_command_table_is_the_command_line(capsys):
    from peftune.cli import COMMANDS

    out = _help([], capsys)
    listed = re.findall(r"^    (\w+)\s+(\S.*)$", out.split("COMMAND")[-1], re.M)
    assert [name for name, _ in listed] == list(COMMANDS)
    for name, first_line in listed:
        assert COMMANDS[name].help.startswith(first_line.strip())
        has_config = "--config FILE.yaml" in _help([name], capsys)
        assert has_config == (COMMANDS[name].keys is not None)


def test_help_shows_the_default_values(capsys):
    out = _help(["train"], capsys)
    assert "0.05" in _entry(out, "--train.warmup_ratio")
    # unset by default: each method's own rate, listed by `peftune methods`
    assert "(unset: the method's suggested rate" in _entry(out, "--train.learning_rate")
    assert "cosine" in _entry(out, "--train.lr_scheduler")
    assert "(default: 8)" in _entry(out, "--lora.r")
    assert "(default: 32)" in _entry(out, "--lora.alpha")
    out = _help(["search"], capsys)
    assert "(default: 20)" in _entry(out, "--search.n_trials")
    assert "(default: lora)" in _entry(out, "--search.methods")
    assert "(default: merged)" in _entry(_help(["export"], capsys), "--format")
    assert "(default: False)" not in _help([], capsys)


@pytest.mark.parametrize("command", ["train", "evaluate", "search", "summarize", "compare"])
def test_every_config_command_accepts_every_key(command):
    """Help is trimmed; parsing is not: one YAML file (or set of flags) serves every command.
    The keys are those of a fully resolved config.yaml (what a run writes), not the list the
    flags are built from."""
    from peftune import config_from_dict
    from peftune.cli import parser

    def flat(data, prefix=""):
        for key, value in data.items():
            if isinstance(value, dict) and value:
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    keys = list(flat(config_from_dict({}).to_dict()))
    assert {"train.learning_rate", "lora.r", "search.space.learning_rate", "seed"} <= set(keys)
    head = [command, "run/adapter"] if command == "summarize" else [command]
    ns = parser().parse_args([*head, *(f"--{key}=1" for key in keys)])
    assert {k[4:] for k in vars(ns) if k.startswith("cfg:")} == set(keys)


def test_start_up_imports_no_heavy_library():
    """Help, `peftune methods` and config errors answer without torch, transformers, peft,
    datasets or optuna (seconds of imports)."""
    code = """
import contextlib, io, sys
from peftune.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    assert main(["methods"]) == 0
    assert main(["train", "--train.learning_rate", "-1"]) == 2
    assert main(["search", "--search.methods", "lora,ia3", "--lora.r", "x"]) == 2
    try:
        main(["train", "--help"])
    except SystemExit:
        pass
print(sorted(m for m in ("torch", "transformers", "peft", "datasets", "optuna")
             if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_key_of_every_shipped_config_is_a_flag():
    """README: every YAML key is also a flag. Flatten each shipped config to dotted keys and
    parse them all as flags of the command the config is for."""
    from pathlib import Path

    from peftune.cli import build_config, parser

    def flat(data, prefix=""):
        for key, value in data.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    configs = sorted(Path(__file__).parents[1].glob("configs/*.yaml"))
    assert configs
    for path in configs:
        argv = ["search"]
        for key, value in flat(yaml.safe_load(path.read_text())):
            shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            argv += [f"--{key}", shown]
        ns = parser().parse_args(argv)
        assert build_config(ns).to_dict() == build_config(
            parser().parse_args(["search", "--config", str(path)])).to_dict(), path
