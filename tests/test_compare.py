import csv

import yaml
from PIL import Image

from peftune.cli import main


def test_compare_writes_one_row_per_method(tiny_cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # see conftest: tiny models, busy machines
    tiny_cfg["train"].update(max_steps=2, eval_each_epoch=False)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg))
    assert main(["-q", "compare", "--config", str(path),
                 "--methods", "prefix,adalora", "--adalora.tinit", "3"]) == 0
    out = tmp_path / "run"
    rows = {r["method"]: r for r in csv.DictReader((out / "compare.csv").open())}
    assert list(rows) == ["prefix", "adalora"]
    row = rows["prefix"]
    assert not row["error"]
    assert 0 <= float(row["rougeL"]) <= 100
    assert int(row["trainable_parameters"]) > 0 and float(row["adapter_mib"]) > 0
    assert float(row["train_tokens_per_s"]) > 0 and float(row["peak_memory_mib"]) > 50
    assert float(rows["prefix"]["learning_rate"]) == 1e-2  # the method's suggested rate
    assert "leave no pruning phase" in rows["adalora"]["error"]  # a failure is a row
    table = (out / "compare.md").read_text()
    assert "| prefix | 0.01 |" in table and "not run: adalora.tinit" in table
    assert Image.open(out / "compare.png").size[0] > 300
    assert "ROUGE-L" in capsys.readouterr().out


def test_methods_lists_every_method_with_its_rate(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("lora", "adalora", "ia3", "prefix", "ptuning", "prompt", "llama-adapter",
                 "lora-int8", "qlora"):
        assert f"\n{name} " in f"\n{out}"
    assert "--qlora.double_quant" in out and "not mergeable" in out


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
