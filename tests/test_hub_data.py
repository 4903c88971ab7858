"""Hub datasets: a repository with a loading script is read from the hub's Parquet
conversion, one without directly; a row limit streams only the rows it needs."""

import logging

import datasets
import pytest

from peftune import data
from peftune.config import DataConfig

from .conftest import make_rows

SCRIPT_ERROR = "Dataset scripts are no longer supported, but found xsum.py"


class FakeHub:
    """``datasets``' hub entry points over local rows; ``script`` makes the main revision
    fail as a repository with a loading script does."""

    def __init__(self, *, script: bool) -> None:
        self.script = script
        self.calls: list[dict] = []
        self.rows = {"train": make_rows(30), "validation": make_rows(6, seed=1),
                     "test": make_rows(6, seed=2)}
        self.streamed: dict[str, int] = {}

    def _check(self, revision):
        if self.script and revision != data.PARQUET_REVISION:
            raise RuntimeError(SCRIPT_ERROR)

    def split_names(self, path, name=None, revision=None, **kw):
        self._check(revision)
        return list(self.rows)

    def load_dataset(self, path, name=None, split=None, streaming=False, revision=None, **kw):
        self._check(revision)
        self.calls.append({"split": split, "streaming": streaming, "revision": revision})
        ds = datasets.Dataset.from_list(self.rows[split])
        if not streaming:
            return ds
        fake = self

        class Stream:
            def take(self, n):
                fake.streamed[split] = n
                return ds.to_iterable_dataset().take(n)
        return Stream()


@pytest.fixture
def hub(monkeypatch, request):
    fake = FakeHub(script=request.param)
    monkeypatch.setattr(datasets, "load_dataset", fake.load_dataset)
    monkeypatch.setattr(datasets, "get_dataset_split_names", fake.split_names)
    return fake


@pytest.mark.parametrize("hub", [True, False], indirect=True, ids=["script", "parquet"])
def test_hub_dataset_with_a_script_reads_the_parquet_conversion(hub, caplog):
    with caplog.at_level(logging.INFO, logger="peftune"):
        splits = data.load_splits(DataConfig(source="someone/xsum-like", id_column="id"))
    assert [len(splits[r]) for r in ("train", "validation", "test")] == [30, 6, 6]
    revisions = {c["revision"] for c in hub.calls}
    notes = [r for r in caplog.records if "Parquet conversion" in r.getMessage()]
    if hub.script:
        assert revisions == {data.PARQUET_REVISION} and len(notes) == 1
    else:
        assert revisions == {None} and not notes


@pytest.mark.parametrize("hub", [False], indirect=True)
def test_row_limits_stream_only_the_rows_they_need(hub):
    splits = data.load_splits(DataConfig(source="someone/xsum-like", max_train_examples=5,
                                         max_eval_examples=2))
    assert hub.streamed == {"train": 5, "validation": 2, "test": 2}
    assert [len(splits[r]) for r in ("train", "validation", "test")] == [5, 2, 2]
    assert splits["train"]["document"] == [r["document"] for r in hub.rows["train"][:5]]


def test_a_hub_error_that_is_not_a_script_stays_an_error(monkeypatch):
    def fail(*args, **kwargs):
        raise FileNotFoundError("no such dataset")
    monkeypatch.setattr(datasets, "get_dataset_split_names", fail)
    with pytest.raises(data.DataError, match="cannot load dataset 'nobody/nothing'"):
        data.load_splits(DataConfig(source="nobody/nothing"))
