import csv
import json
import re

import pytest
import yaml
from PIL import Image

from peftune.cli import main
from peftune.metrics import rouge


def _suggested_rates(capsys):
    """Each method's suggested learning rate, as `peftune methods` prints it."""
    capsys.readouterr()
    assert main(["methods"]) == 0
    found = re.findall(r"^(\S+) .*suggested --train.learning_rate (\S+)\]$",
                       capsys.readouterr().out, re.M)
    return {name: float(rate) for name, rate in found}


def test_compare_writes_one_row_per_method(tiny_cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # see conftest: tiny models, busy machines
    rates = _suggested_rates(capsys)
    # a rate of its own, so that a row trained at train.learning_rate would show
    tiny_cfg["train"].update(max_steps=2, eval_each_epoch=False, learning_rate=7e-4)
    assert 7e-4 not in rates.values()
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg))
    assert main(["-q", "compare", "--config", str(path),
                 "--methods", "prefix,adalora", "--adalora.tinit", "3"]) == 0
    out = tmp_path / "run"
    rows = {r["method"]: r for r in csv.DictReader((out / "compare.csv").open())}
    assert list(rows) == ["prefix", "adalora"]
    row = rows["prefix"]
    assert not row["error"]
    scored = json.loads((out / "prefix" / "metrics.json").read_text())["test"]
    assert float(row["rougeL"]) == pytest.approx(scored["rougeL"], abs=0.01)
    preds = [json.loads(line) for line in (out / "prefix" / "predictions.jsonl").open()]
    assert scored["rougeL"] == pytest.approx(rouge([r["prediction"] for r in preds],
                                                   [r["reference"] for r in preds])["rougeL"])
    assert int(row["trainable_parameters"]) > 0 and float(row["adapter_mib"]) > 0
    assert float(row["train_tokens_per_s"]) > 0 and float(row["peak_memory_mib"]) > 50
    assert float(row["learning_rate"]) == rates["prefix"]  # what `peftune methods` says
    assert "leave no pruning phase" in rows["adalora"]["error"]  # a failure is a row
    table = (out / "compare.md").read_text()
    assert f"| prefix | {rates['prefix']:g} |" in table and "not run: adalora.tinit" in table
    assert Image.open(out / "compare.png").size[0] > 300
    assert "ROUGE-L" in capsys.readouterr().out


def test_methods_lists_every_method_with_its_rate(capsys):
    rates = _suggested_rates(capsys)
    assert set(rates) == {"lora", "adalora", "ia3", "prefix", "ptuning", "prompt",
                          "llama-adapter", "lora-int8", "qlora"}
    assert all(0 < rate < 1 for rate in rates.values())
    # README: prompt-style methods need far higher rates than LoRA
    assert min(rates[m] for m in ("prefix", "prompt", "ptuning")) >= 3 * rates["lora"]
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "--qlora.double_quant" in out and "not mergeable" in out


def test_compare_with_an_unknown_method_is_one_line_naming_the_valid_ones(tiny_cfg, tmp_path,
                                                                        capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg))
    assert main(["-q", "compare", "--config", str(path), "--methods", "lora,bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "--methods: unknown bogus (valid: " in err and "qlora" in err
    assert not (tmp_path / "run" / "lora").exists()  # refused before training anything


def test_report_on_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert f"{tmp_path}: not a run directory (no config.yaml)" in err
    assert not (tmp_path / "report").exists()


def test_encoder_decoder_train_evaluate_summarize(tiny_cfg, tiny_t5_dir, tmp_path, capsys):
    tiny_cfg["model"]["name"] = str(tiny_t5_dir)
    tiny_cfg.update(method="prompt")
    tiny_cfg["train"]["learning_rate"] = 3e-2
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg))
    assert main(["-q", "train", "--config", str(path)]) == 0
    run = tmp_path / "run"
    assert main(["-q", "evaluate", "--adapter", str(run)]) == 0
    assert 0 <= yaml.safe_load((run / "metrics.json").read_text())["test"]["rougeL"] <= 100
    capsys.readouterr()
    assert main(["-q", "summarize", str(run), "alpha beta gamma delta ."]) == 0
