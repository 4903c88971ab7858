"""A killed evaluation, rerun, generates only the rest and scores what an uninterrupted one
scores; another evaluation never reuses its partial predictions."""

import dataclasses
import json

import pytest

from peftune import config_from_dict, models
from peftune.assembly import prepare
from peftune.config import ModelConfig
from peftune.generation import score


class Killed(Exception):
    pass


def _setup(tiny_cfg):
    cfg = config_from_dict({**tiny_cfg, "eval": {"max_new_tokens": 6, "batch_size": 2}})
    model_cfg = ModelConfig(name=tiny_cfg["model"]["name"])
    tok = models.load_tokenizer(model_cfg)
    model = models.load_model(models.resolve(model_cfg), pad_token_id=tok.pad_token_id)
    ds = prepare(cfg, tok, roles=("test",)).splits["test"]
    return cfg, model, tok, ds


def _counting(model, monkeypatch, *, fail_after: int | None = None):
    rows: list[int] = []
    original = type(model).generate.__get__(model)  # the real one, not an earlier wrapper

    def generate(*args, **kwargs):
        if fail_after is not None and len(rows) >= fail_after:
            raise Killed
        rows.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return rows


def test_killed_evaluation_finishes_only_the_rest(tiny_cfg, tmp_path, monkeypatch):
    cfg, model, tok, ds = _setup(tiny_cfg)
    assert len(ds) == 4
    straight = score(model, tok, ds, cfg.eval, out_dir=tmp_path / "a", tag="test")

    _counting(model, monkeypatch, fail_after=1)  # killed after the first batch
    with pytest.raises(Killed):
        score(model, tok, ds, cfg.eval, out_dir=tmp_path / "b", tag="test")
    partial = list((tmp_path / "b").glob("predictions_test.partial-*.jsonl"))
    assert len(partial) == 1 and len(partial[0].read_text().splitlines()) == 2

    rows = _counting(model, monkeypatch)
    resumed = score(model, tok, ds, cfg.eval, out_dir=tmp_path / "b", tag="test")
    assert sum(rows) == 2  # only the second batch
    assert resumed == straight
    assert (tmp_path / "b" / "predictions.jsonl").read_text() == \
        (tmp_path / "a" / "predictions.jsonl").read_text()
    assert not list((tmp_path / "b").glob("*.partial-*"))


def test_other_settings_do_not_reuse_partial_predictions(tiny_cfg, tmp_path, monkeypatch):
    cfg, model, tok, ds = _setup(tiny_cfg)
    _counting(model, monkeypatch, fail_after=1)
    with pytest.raises(Killed):
        score(model, tok, ds, cfg.eval, out_dir=tmp_path, tag="test")
    (partial,) = tmp_path.glob("predictions_test.partial-*.jsonl")
    lines = [json.loads(line) for line in partial.read_text().splitlines()]
    partial.write_text("".join(json.dumps({**r, "prediction": "STALE"}) + "\n" for r in lines))
    rows = _counting(model, monkeypatch)
    other = dataclasses.replace(cfg.eval, max_new_tokens=5)
    score(model, tok, ds, other, out_dir=tmp_path, tag="test")
    assert sum(rows) == 4
    assert "STALE" not in (tmp_path / "predictions.jsonl").read_text()
