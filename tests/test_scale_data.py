"""The XSum-shaped corpus generator of benchmarks/scale_data.py: files, columns, lengths."""

import importlib.util
import statistics
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("scale_data", ROOT / "benchmarks" / "scale_data.py")
scale_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale_data)


def test_generator_writes_the_three_splits_at_a_scale_factor(tmp_path):
    counts = scale_data.generate(tmp_path, scale=0.001, seed=3)
    assert counts == {"train": 204, "validation": 11, "test": 11}
    for split, n in counts.items():
        table = pq.read_table(tmp_path / f"{split}.parquet")
        assert table.column_names == ["id", "document", "summary"]
        assert table.num_rows == n
        assert len(set(table.column("id").to_pylist())) == n
        assert all(text.strip() for text in table.column("summary").to_pylist())


def test_same_seed_same_corpus_other_seed_other_corpus():
    assert scale_data.rows("train", 5, seed=1) == scale_data.rows("train", 5, seed=1)
    assert scale_data.rows("train", 5, seed=1) != scale_data.rows("train", 5, seed=2)


def test_lengths_match_xsum_means():
    columns = scale_data.rows("train", 3000, seed=0)
    doc_words = statistics.mean(len(d.split()) for d in columns["document"])
    sum_words = statistics.mean(len(s.split()) for s in columns["summary"])
    assert abs(doc_words - scale_data.DOCUMENT_WORDS) < 0.03 * scale_data.DOCUMENT_WORDS
    assert abs(sum_words - scale_data.SUMMARY_WORDS) < 0.03 * scale_data.SUMMARY_WORDS
