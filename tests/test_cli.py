import json

import pytest
import yaml

from peftune.cli import main


def _write_cfg(tmp_path, cfg):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_train_evaluate_summarize_end_to_end(tiny_cfg, tmp_path, capsys):
    path = _write_cfg(tmp_path, tiny_cfg)
    assert main(["-q", "train", "--config", str(path), "--lora.r", "4"]) == 0
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lora"]["r"] == 4 and saved["train"]["max_steps"] == 3
    assert main(["-q", "evaluate", "--adapter", str(run), "--eval.zero_shot", "true"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"train", "test", "zero_shot_test"} <= metrics.keys()
    assert 0 <= metrics["test"]["rougeL"] <= 100
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"id", "prediction", "reference"} <= rows[0].keys()
    out = capsys.readouterr().out
    assert "ROUGE-L" in out and "zero-shot" in out
    assert main(["-q", "summarize", str(run), "alpha beta gamma delta ."]) == 0
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"document": "alpha beta"}\n{"document": "gamma delta"}\n')
    capsys.readouterr()
    assert main(["-q", "summarize", str(run / "adapter"), "--input", str(docs)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


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


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--train.learning_rate" in out and "(default: 0.0002)" in out


@pytest.mark.parametrize("command", ["train", "evaluate", "search", "summarize", "export"])
def test_every_subcommand_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "(default: " in capsys.readouterr().out


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
