import json

import pytest
import torch

from peftune.config import DataConfig
from peftune.data import IGNORE_INDEX, Collator, PromptFormat, load_splits, tokenize
from peftune.errors import DataError
from tests.conftest import make_rows, make_tokenizer, write_jsonl


def _encode(tok, rows, max_source_tokens=64):
    import datasets

    fmt = PromptFormat.for_tokenizer(tok, "Summarize the following text.")
    return fmt, tokenize(datasets.Dataset.from_list(rows), tok, fmt, max_source_tokens)


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_labels_cover_summary_and_eos_only(chat, pad_is_eos):
    tok = make_tokenizer(chat=chat, pad_is_eos=pad_is_eos)
    rows = make_rows(3)
    fmt, ds = _encode(tok, rows)
    batch = Collator(pad_id=tok.pad_token_id)([ds[i] for i in range(3)])
    for i, row in enumerate(rows):
        summary = tok(row["summary"], add_special_tokens=False)["input_ids"]
        n_prompt, n = ds[i]["prompt_len"], len(ds[i]["input_ids"])
        labels = batch["labels"][i]
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert labels[n_prompt:n].tolist() == summary + [tok.eos_token_id]
        assert (labels[n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
    if pad_is_eos:  # the real EOS survives even though padding uses the same id
        assert (batch["labels"] == tok.eos_token_id).sum() == 3


def test_chat_template_wraps_the_document():
    tok = make_tokenizer(chat=True)
    fmt, ds = _encode(tok, make_rows(1))
    text = tok.decode(ds[0]["input_ids"][:ds[0]["prompt_len"]])
    assert text.startswith("<|user|>") and text.rstrip().endswith("<|assistant|>")


def test_truncation_cuts_the_document_never_the_summary(caplog):
    tok = make_tokenizer()
    rows = make_rows(4)
    with caplog.at_level("INFO", logger="peftune"):
        fmt, ds = _encode(tok, rows, max_source_tokens=5)
    assert "truncated 4 of 4 documents" in caplog.text
    for i, row in enumerate(rows):
        summary = tok(row["summary"], add_special_tokens=False)["input_ids"]
        ids, n_prompt = ds[i]["input_ids"], ds[i]["prompt_len"]
        cut = tok.decode(tok(row["document"], add_special_tokens=False)["input_ids"][:5])
        assert cut.split() == row["document"].split()[:5]
        assert ids[:n_prompt] == fmt.encode([cut])[0]
        assert ids[n_prompt:] == summary + [tok.eos_token_id]


def test_left_padding_for_generation():
    batch = Collator(pad_id=0, padding_side="left")([{"input_ids": [5, 6, 7]},
                                                     {"input_ids": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert Collator(pad_id=0, pad_to_multiple_of=8)([{"input_ids": [1]}])["input_ids"].shape \
        == torch.Size([1, 8])


def test_local_folder_and_single_file(tmp_path, tiny_data_dir):
    splits = load_splits(DataConfig(source=str(tiny_data_dir)))
    assert {k: len(v) for k, v in splits.items()} == {"train": 12, "validation": 4, "test": 4}
    rows = make_rows(30)
    single = write_jsonl(tmp_path / "all.jsonl", rows)
    splits = load_splits(DataConfig(source=str(single)))
    assert {k: len(v) for k, v in splits.items()} == {"train": 24, "validation": 3, "test": 3}
    # held-out rows are carved out of the file: disjoint, and together every row once
    ids = {k: list(v["id"]) for k, v in splits.items()}
    assert sorted(sum(ids.values(), [])) == sorted(r["id"] for r in rows)
    assert not set(ids["train"]) & (set(ids["validation"]) | set(ids["test"]))
    assert not set(ids["validation"]) & set(ids["test"])
    by_id = {r["id"]: r for r in rows}
    for ds in splits.values():
        assert all(by_id[r["id"]]["document"] == r["document"]
                   and by_id[r["id"]]["summary"] == r["summary"] for r in ds)
    assert load_splits(DataConfig(source=str(single)))["test"]["id"] == ids["test"]  # seeded


def test_reading_local_files_looks_up_no_host(tmp_path, tiny_data_dir, monkeypatch):
    import socket

    looked_up = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: looked_up.append(host))
    load_splits(DataConfig(source=str(tiny_data_dir)))
    assert looked_up == []


def test_csv_and_parquet_with_renamed_columns(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(make_rows(20)).rename(columns={"document": "article",
                                                        "summary": "highlights"})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        cfg = DataConfig(source=str(tmp_path / name), document_column="article",
                         summary_column="highlights", id_column="id")
        splits = load_splits(cfg)
        assert set(splits["train"].column_names) == {"id", "document", "summary"}
        # each column lands where it was named to go (swapping them must show)
        by_id = {r["id"]: r for r in make_rows(20)}
        for ds in splits.values():
            for row in ds:
                assert row["document"] == by_id[row["id"]]["document"], name
                assert row["summary"] == by_id[row["id"]]["summary"], name
        swapped = load_splits(DataConfig(source=str(tmp_path / name), document_column="highlights",
                                         summary_column="article", id_column="id"))
        row = swapped["train"][0]
        assert row["document"] == by_id[row["id"]]["summary"]


def test_embedded_aclsum_splits():
    splits = load_splits(DataConfig())
    assert {k: len(v) for k, v in splits.items()} == {"train": 100, "validation": 50,
                                                      "test": 100}
    row = splits["test"][0]
    assert " ." not in row["document"] and row["summary"].count(". ") >= 2


@pytest.mark.parametrize("rows,kwargs,message", [
    ([{"text": "a", "summary": "b"}], {}, "no column 'document'"),
    ([{"document": "", "summary": "b"}] * 12, {}, "line 1 has an empty or non-text 'document'"),
])
def test_bad_rows_name_the_culprit(tmp_path, rows, kwargs, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows * 12 if len(rows) == 1 else rows)
    with pytest.raises(DataError, match=message):
        load_splits(DataConfig(source=str(path), **kwargs))


def test_empty_file_and_missing_path(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_splits(DataConfig(source=str(tmp_path / "empty.jsonl")))
    with pytest.raises(DataError, match="not found"):
        load_splits(DataConfig(source=str(tmp_path / "nope.jsonl")))


def test_length_grouped_sampler_is_a_seeded_permutation_with_similar_lengths():
    from peftune.data import LengthGroupedSampler

    lengths = [(i * 37) % 101 for i in range(64)]
    sampler = LengthGroupedSampler(lengths, 4, seed=1, window=4)
    first = list(sampler)
    assert sorted(first) == list(range(64)) and first == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    spread = [max(lengths[i] for i in first[j:j + 4]) - min(lengths[i] for i in first[j:j + 4])
              for j in range(0, 64, 4)]
    assert sum(spread) / len(spread) < 20  # random batches of 4 would spread ~50


def _rows_with_a_bad_one(n, bad):
    rows = make_rows(n)
    rows[bad]["document"] = " "
    return rows


def test_a_bad_jsonl_row_names_its_line_in_the_file_not_in_a_shuffled_split(tmp_path):
    rows = [json.dumps(r) for r in _rows_with_a_bad_one(30, 21)]
    # blank lines do not count as rows but do count as lines
    text = "\n".join(rows[:3] + ["", "  "] + rows[3:]) + "\n"
    (tmp_path / "all.jsonl").write_text(text)
    with pytest.raises(DataError, match=r"all.jsonl: line 24 has an empty or non-text "
                                        r"'document'$"):
        load_splits(DataConfig(source=str(tmp_path / "all.jsonl")))


def test_a_bad_csv_row_names_the_line_it_starts_on(tmp_path):
    import pandas as pd

    rows = _rows_with_a_bad_one(30, 12)
    rows[4]["summary"] = "first line\nsecond line\nthird line"  # one record, three lines
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match=r"d.csv: line 16 has an empty or non-text 'document'"):
        load_splits(DataConfig(source=str(tmp_path / "d.csv"), id_column="id"))


def test_a_bad_row_in_a_given_split_names_its_file_and_line(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", make_rows(10))
    write_jsonl(tmp_path / "validation.jsonl", _rows_with_a_bad_one(5, 2))
    with pytest.raises(DataError, match=r"validation.jsonl: line 3 has an empty"):
        load_splits(DataConfig(source=str(tmp_path)))


def test_a_bad_parquet_row_names_its_row_index(tmp_path):
    import pandas as pd

    pd.DataFrame(_rows_with_a_bad_one(30, 17)).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet: row 17 has an empty"):
        load_splits(DataConfig(source=str(tmp_path / "d.parquet")))


@pytest.mark.parametrize("line,message", [
    ('{"document": "a", "summary": "b"', r"line 7 is not JSON \(Expecting ',' delimiter"),
    ("not json at all", r"line 7 is not JSON \(Expecting value, column 1\)"),
    ('["document", "summary"]', "line 7 is not a JSON object"),
])
def test_a_line_that_is_not_json_is_named(tmp_path, line, message):
    rows = [json.dumps(r) for r in make_rows(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(rows[:6] + [line] + rows[6:]) + "\n")
    with pytest.raises(DataError, match=f"d.jsonl: {message}"):
        load_splits(DataConfig(source=str(tmp_path / "d.jsonl")))


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv"])
def test_non_utf8_bytes_name_the_line(tmp_path, name):
    import pandas as pd

    rows = make_rows(20)
    rows[8]["document"] = "caf\u00e9 " + rows[8]["document"]
    if name.endswith(".csv"):
        pd.DataFrame(rows).to_csv(tmp_path / name, index=False, encoding="latin-1")
    else:
        (tmp_path / name).write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                              for r in rows).encode("latin-1"))
    line = 10 if name.endswith(".csv") else 9
    with pytest.raises(DataError, match=f"{name}: line {line} is not UTF-8 text \\(byte 0xe9\\)"):
        load_splits(DataConfig(source=str(tmp_path / name)))


def test_a_cached_tokenization_is_keyed_by_the_prompt_code(tmp_path, monkeypatch):
    """Local files stay on datasets' cache, so tokenizing is cached; a cache written by other
    prompt code (another peftune or transformers version) must never be reused."""
    import peftune.data as data_module

    path = write_jsonl(tmp_path / "train.jsonl", make_rows(12))
    cfg = DataConfig(source=str(path))
    tok = make_tokenizer()
    fmt = PromptFormat.for_tokenizer(tok, "Summarize the following text.")
    first = tokenize(load_splits(cfg)["train"], tok, fmt, 64)
    again = tokenize(load_splits(cfg)["train"], tok, fmt, 64)
    assert again.cache_files == first.cache_files  # cached: the same files
    monkeypatch.setattr(data_module, "_CODE_VERSION", "other-code")
    changed = tokenize(load_splits(cfg)["train"], tok, fmt, 64)
    assert changed.cache_files != first.cache_files
