"""Summarization data: load (embedded ACLSum, local files, hub) -> prompt -> tokens -> batches.

Every example becomes one sequence for a decoder-only model::

    [prompt: template + truncated document] [summary] [EOS]
     labels: -100 ...                        summary   EOS

An encoder-decoder model gets ``[prompt]`` as encoder input and ``[summary] [EOS]`` as labels.

Labels are masked by position, never by token id: SmolLM2's pad token *is* its EOS, and
masking pad ids would erase the one EOS the model must learn to emit.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import importlib.metadata
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import torch
import transformers
from transformers import PreTrainedTokenizerBase

from peftune.config import DataConfig
from peftune.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "val", "dev", "valid"),
                 "test": ("test",)}
IGNORE_INDEX = -100
_CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16] + \
    f"-transformers-{transformers.__version__}"
# Splits this long are tokenized in one process per CPU (see `tokenize`).
PARALLEL_TOKENIZE_ROWS = 50_000
# datasets counts each load_dataset, a local file's too, with an HTTP request to its hub
# (a DNS lookup, then up to 3 s): reading local files must not wait on the network.
datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False


# ---------------------------------------------------------------- loading

def load_splits(cfg: DataConfig) -> dict[str, datasets.Dataset]:
    """Return train/validation/test datasets with columns ``id``, ``document``, ``summary``."""
    files: dict[str, Path] = {}
    if cfg.source == "aclsum":
        raw = _load_aclsum()
        columns = ("document", "summary", "id")
    else:
        if _is_local(cfg.source):
            raw, files = _load_local(cfg.source)
        else:
            raw = _load_hub(cfg)
        columns = (cfg.document_column, cfg.summary_column, cfg.id_column)
    wanted = {"train": cfg.train_split, "validation": cfg.validation_split,
              "test": cfg.test_split}
    if wanted["train"] not in raw:
        raise DataError(f"{cfg.source}: no split named '{cfg.train_split}' "
                        f"(available: {', '.join(raw) or 'none'}); set data.train_split")
    # checked before carving shuffles rows away from their place in the file
    out = {role: _standardise(raw[name], role, cfg.source, columns,
                              where=_row_names(cfg.source, role, files.get(name)))
           for role, name in wanted.items() if name in raw}
    out = _carve_missing(out, seed=17)
    if cfg.max_train_examples:
        out["train"] = out["train"].select(range(min(cfg.max_train_examples, len(out["train"]))))
    if cfg.max_eval_examples:
        for role in ("validation", "test"):
            out[role] = out[role].select(range(min(cfg.max_eval_examples, len(out[role]))))
    return out


def _is_local(source: str) -> bool:
    return Path(source).exists() or source.startswith((".", "/", "~")) or \
        Path(source).suffix in LOCAL_FORMATS


def _detok(sentence: str) -> str:
    """ACLSum stores tokenised sentences ('word , word .'); rejoin punctuation."""
    sentence = re.sub(r" ([.,;:!?%)\]])", r"\1", sentence)
    return re.sub(r"([(\[]) ", r"\1", sentence)


def _load_aclsum() -> dict[str, datasets.Dataset]:
    try:
        files = importlib.metadata.files("aclsum") or []
    except importlib.metadata.PackageNotFoundError:
        raise DataError("the embedded dataset needs `pip install aclsum==0.1.2`") from None
    by_name = {Path(str(f)).name: Path(str(f.locate())) for f in files
               if str(f).endswith(".jsonl") and "dataset" in str(f)}
    out = {}
    for role, fname in (("train", "train.jsonl"), ("validation", "val.jsonl"),
                        ("test", "test.jsonl")):
        rows = []
        for line in by_name[fname].read_text(encoding="utf-8").splitlines():
            paper = json.loads(line)
            rows.append({
                "id": paper["id"],
                "document": " ".join(_detok(s) for s in paper["sentences"]["abstract"]),
                "summary": " ".join(paper["summary"][k] for k in ("challenge", "approach",
                                                                  "outcome")),
            })
        out[role] = datasets.Dataset.from_list(rows)
    return out


def _local_files(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {"train": path}
    found: dict[str, Path] = {}
    for file in sorted(path.iterdir()):
        for role, aliases in SPLIT_ALIASES.items():
            if file.suffix in LOCAL_FORMATS and file.stem.lower() in aliases:
                found[role] = file
    if not found:
        raise DataError(f"{path}: no train/validation/test .jsonl/.csv/.parquet files in folder")
    return found


def _load_local(source: str) -> tuple[dict[str, datasets.Dataset], dict[str, Path]]:
    """The splits of a local file or folder, and the file each split was read from."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {source}")
    out, files = {}, _local_files(path)
    for role, file in files.items():
        if file.suffix not in LOCAL_FORMATS:
            raise DataError(f"{file}: unsupported format (use .jsonl, .csv or .parquet)")
        if file.stat().st_size == 0:
            raise DataError(f"{file}: file is empty")
        kind = LOCAL_FORMATS[file.suffix]
        if kind != "parquet":
            _check_utf8(file)
        try:
            ds = datasets.load_dataset(kind, data_files=str(file), split="train")
        except Exception as err:  # datasets raises many types for malformed files
            if "corresponds to no data" in str(err):
                raise DataError(f"{file}: the {role} split is empty") from None
            # the JSON loader's own error names neither the line nor the problem
            problem = _first_bad_json_line(file) if kind == "json" else None
            raise DataError(f"{file}: {problem}" if problem else f"{file}: cannot be read as "
                            f"{file.suffix[1:]}: {_first_line(err)}") from None
        out[role] = ds
    return out, files


def _check_utf8(file: Path) -> None:
    """Text files must be UTF-8: the JSON loader keeps other bytes and fails much later."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with file.open("rb") as fh:
        try:
            while chunk := fh.read(1 << 24):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
            return
        except UnicodeDecodeError:
            fh.seek(0)
        for number, line in enumerate(fh, 1):  # the slow pass only for a file that fails
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{file}: line {number} is not UTF-8 text (byte "
                                f"0x{line[err.start]:02x}); save the file as UTF-8") from None


def _first_bad_json_line(file: Path) -> str | None:
    """Where a JSON file stops being JSON (Lines) objects, or None if it does not."""
    text = file.read_bytes()
    if text.lstrip()[:1] == b"[":  # one JSON array, not JSON Lines
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return f"line {err.lineno} is not JSON ({err.msg}, column {err.colno})"
        return None
    for number, line in enumerate(text.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number} is not JSON ({err.msg}, column {err.colno})"
        if not isinstance(row, dict):
            return f"line {number} is not a JSON object"
    return None


def _row_names(source: str, role: str, file: Path | None) -> Callable[[int], str]:
    """How an error names row ``i`` of a split as loaded: its line in a JSON Lines or CSV
    file, else its row index. Worked out only when an error needs it."""
    if file is None:
        return lambda i: f"{source} ({role} split): row {i}"
    line: Callable[[Path, int], int | None] | None = None
    if file.suffix == ".csv":
        line = _csv_line
    elif LOCAL_FORMATS[file.suffix] == "json" and _first_byte(file) == b"{":
        line = _json_line

    def name(i: int) -> str:
        number = line(file, i) if line else None
        return f"{file}: line {number}" if number else f"{file}: row {i}"
    return name


def _first_byte(file: Path) -> bytes:
    with file.open("rb") as fh:
        return fh.read(4096).lstrip()[:1]


def _json_line(file: Path, index: int) -> int | None:
    """The line of row ``index`` of a JSON Lines file (the loader skips blank lines)."""
    with file.open("rb") as fh:
        rows = (number for number, line in enumerate(fh, 1) if line.strip())
        return next((number for i, number in enumerate(rows) if i == index), None)


def _csv_line(file: Path, index: int) -> int | None:
    """The line on which CSV record ``index`` starts (after the header; quoted fields may span
    lines, blank lines are skipped as the loader does)."""
    with file.open(encoding="utf-8", newline="") as fh:
        reader, start, record = csv.reader(fh), 1, -1
        for row in reader:
            if row:
                if record == index:
                    return start
                record += 1
            start = reader.line_num + 1
    return None


PARQUET_REVISION = "refs/convert/parquet"


def _load_hub(cfg: DataConfig) -> dict[str, datasets.Dataset]:
    """A hub dataset; one whose repository still has a loading script (which ``datasets``
    >= 4 refuses to run) from the Parquet files the hub converted it to."""
    try:
        return _hub_splits(cfg, revision=None)
    except Exception as err:  # hub errors are many and version dependent
        if "scripts are no longer supported" not in str(err):
            raise DataError(f"cannot load dataset '{cfg.source}': not a local file and not "
                            f"loadable from the hub ({_first_line(err)})") from None
    log.info("%s has a loading script, which datasets %s does not run: reading the hub's "
             "Parquet conversion (revision %s)", cfg.source, datasets.__version__,
             PARQUET_REVISION)
    try:
        return _hub_splits(cfg, revision=PARQUET_REVISION)
    except Exception as err:
        raise DataError(f"cannot load dataset '{cfg.source}': it has a loading script and no "
                        f"Parquet conversion on the hub ({_first_line(err)})") from None


def _hub_splits(cfg: DataConfig, *, revision: str | None) -> dict[str, datasets.Dataset]:
    """Every split; a split with a row limit is streamed and only its first rows are read
    (when the source has its own validation and test splits, so none is carved from
    train)."""
    kw = {"revision": revision} if revision else {}
    names = datasets.get_dataset_split_names(cfg.source, cfg.subset, **kw)
    limits: dict[str, int | None] = {}
    if cfg.validation_split in names and cfg.test_split in names:
        limits = {cfg.train_split: cfg.max_train_examples,
                  cfg.validation_split: cfg.max_eval_examples,
                  cfg.test_split: cfg.max_eval_examples}
    out = {}
    for name in names:
        limit = limits.get(name)
        if limit:
            stream = datasets.load_dataset(cfg.source, cfg.subset, split=name,
                                           streaming=True, **kw)
            out[name] = datasets.Dataset.from_list(list(stream.take(limit)))
        else:
            out[name] = datasets.load_dataset(cfg.source, cfg.subset, split=name, **kw)
    return out


def _carve_missing(splits: dict[str, datasets.Dataset], *, seed: int) -> dict[str, Any]:
    """Split validation/test off train when the source does not provide them (10% each)."""
    n = max(1, len(splits["train"]) // 10)
    for role in ("test", "validation"):
        if role in splits:
            continue
        train = splits["train"]
        if len(train) < n + 1:
            raise DataError(f"training split has {len(train)} rows: too few to hold out a "
                            f"{role} split; provide one")
        parts = train.train_test_split(test_size=n, seed=seed)
        splits["train"], splits[role] = parts["train"], parts["test"]
        log.info("no %s split given: held out %d training rows", role, n)
    return splits


def _standardise(ds: datasets.Dataset, role: str, source: str,
                 columns: tuple[str, str, str | None], *,
                 where: Callable[[int], str]) -> datasets.Dataset:
    doc_col, sum_col, id_col = columns
    for col, key in ((doc_col, "data.document_column"), (sum_col, "data.summary_column"),
                     (id_col, "data.id_column")):
        if col is not None and col not in ds.column_names:
            raise DataError(f"{source} ({role} split): no column '{col}' (columns: "
                            f"{', '.join(ds.column_names)}); set {key}")
    if len(ds) == 0:
        raise DataError(f"{source}: the {role} split is empty")
    if id_col is None and "id" in ds.column_names:  # the usual name, taken without asking
        id_col = "id"
    blanks = [(row, col) for col in (doc_col, sum_col)
              if (row := _first_blank(ds, col)) is not None]
    if blanks:
        row, col = min(blanks, key=lambda b: b[0])
        raise DataError(f"{where(row)} has an empty or non-text '{col}'")
    if len({doc_col, sum_col, id_col} - {None}) < (3 if id_col else 2):  # a column used twice
        ids = [str(i) for i in ds[id_col]] if id_col else [str(i) for i in range(len(ds))]
        return datasets.Dataset.from_dict({"id": ids, "document": ds[doc_col],
                                           "summary": ds[sum_col]})
    # Selected and renamed, not rebuilt in memory: the result stays backed by the cache
    # files of a loaded dataset, so tokenizing it is cached too.
    names = {doc_col: "document", sum_col: "summary", **({id_col: "id"} if id_col else {})}
    ds = ds.select_columns(list(names)).rename_columns(
        {old: new for old, new in names.items() if old != new})
    if not id_col:
        ds = ds.add_column("id", [str(i) for i in range(len(ds))])
    elif ds.features["id"] != datasets.Value("string"):
        ds = ds.cast_column("id", datasets.Value("string"))
    return ds.select_columns(["id", "document", "summary"])


def _first_blank(ds: datasets.Dataset, col: str) -> int | None:
    """The first row whose ``col`` is missing, blank or not text; read from Arrow a batch
    at a time (no Python copy of a whole corpus)."""
    offset = 0
    for batch in ds.select_columns([col]).with_format("arrow").iter(batch_size=50_000):
        values = batch[col]
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0),
                                 True)
            first = pc.index(blank, True).as_py()
        else:
            first = next((i for i, v in enumerate(values.to_pylist())
                          if not isinstance(v, str) or not v.strip()), -1)
        if first >= 0:
            return offset + first
        offset += len(batch)
    return None


# ---------------------------------------------------------------- prompts and tokens

@dataclass
class PromptFormat:
    """How a document becomes a prompt, the same in training, evaluation and serving.

    A chat model gets exactly what ``tokenizer.apply_chat_template([{"role": "user",
    "content": f"{instruction}\\n\\n{document}"}], add_generation_prompt=True)`` gives, which
    is what vLLM, TGI, llama.cpp's chat API and transformers pipelines send. A model without
    a chat template gets the plain text ``f"{instruction}\\n\\n{document}\\n\\nSummary:\\n"``
    tokenized whole after its BOS token; an encoder-decoder gets ``f"{instruction}\\n{document}"``
    and EOS. A document longer than ``max_source_tokens`` is cut to that many tokens and
    decoded back to text first, so the prompt is always the template applied to a text that
    a client can send as it is (the instruction and template are never cut).
    """

    tokenizer: PreTrainedTokenizerBase
    instruction: str
    seq2seq: bool = False

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, instruction: str, *,
                      seq2seq: bool = False) -> PromptFormat:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; a summary could never end")
        return cls(tokenizer=tokenizer, instruction=instruction, seq2seq=seq2seq)

    @property
    def eos(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def chat(self) -> bool:
        return bool(self.tokenizer.chat_template) and not self.seq2seq

    def messages(self, document: str) -> list[dict[str, str]]:
        """The chat messages a client sends for ``document``."""
        return [{"role": "user", "content": f"{self.instruction}\n\n{document}"}]

    def text(self, document: str) -> str:
        """The whole prompt as text (what a completion API is sent)."""
        if self.chat:
            return self.tokenizer.apply_chat_template(
                self.messages(document), tokenize=False, add_generation_prompt=True)
        if self.seq2seq:
            return f"{self.instruction}\n{document}"
        return f"{self.instruction}\n\n{document}\n\nSummary:\n"

    def truncate(self, documents: list[str], max_source_tokens: int
                 ) -> tuple[list[str], list[bool]]:
        """Documents cut to ``max_source_tokens`` tokens, and which ones were cut."""
        documents = list(documents)
        ids = self.tokenizer(documents, add_special_tokens=False)["input_ids"]
        cut = [len(doc) > max_source_tokens for doc in ids]
        texts = [self.tokenizer.decode(doc[:max_source_tokens]) if c else text
                 for text, doc, c in zip(documents, ids, cut, strict=True)]
        return texts, cut

    def encode(self, documents: list[str]) -> list[list[int]]:
        """Prompt token ids of already truncated documents."""
        if not documents:
            return []
        if self.chat:
            out = self.tokenizer.apply_chat_template(
                [self.messages(d) for d in documents], tokenize=True,
                add_generation_prompt=True)
            return [list(ids) for ids in out["input_ids"]]
        ids = self.tokenizer([self.text(d) for d in documents],
                             add_special_tokens=False)["input_ids"]
        if self.seq2seq:
            return [[*row, self.eos] for row in ids]
        bos = self.tokenizer.bos_token_id
        lead = [bos] if bos is not None and bos != self.eos else []
        return [[*lead, *row] for row in ids]

    def prompts(self, documents: list[str], max_source_tokens: int
                ) -> tuple[list[list[int]], list[bool]]:
        """Prompt token ids of raw documents, and which documents were truncated."""
        texts, cut = self.truncate(documents, max_source_tokens)
        return self.encode(texts), cut


def tokenize(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat,
             max_source_tokens: int, *, num_proc: int | None = None) -> datasets.Dataset:
    """Add ``input_ids``, ``labels`` and ``prompt_len``; log how many documents were cut.

    ``num_proc`` worker processes tokenize (default: one per CPU from
    ``PARALLEL_TOKENIZE_ROWS`` rows on, else none); the tokenizer and prompt format are
    pickled to them, so they must be picklable. A fast tokenizer alone kept one of two cores
    busy: 20,000 XSum-sized rows took 24.3 s in one process, 11.7 s in two
    (``benchmarks/scale_data.py --compare-num-proc``).
    """

    def encode(batch: dict[str, list[Any]], code: str = "") -> dict[str, list[Any]]:
        prompts, cut = fmt.prompts(batch["document"], max_source_tokens)
        sums = tokenizer(batch["summary"], add_special_tokens=False)["input_ids"]
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "prompt_len": [],
                                     "truncated": cut}
        for prompt, summ in zip(prompts, sums, strict=True):
            target = [*summ, fmt.eos]
            if fmt.seq2seq:
                out["input_ids"].append(prompt)
                out["labels"].append(target)
            else:
                out["input_ids"].append(prompt + target)
                out["labels"].append([IGNORE_INDEX] * len(prompt) + target)
            out["prompt_len"].append(len(prompt))
        return out

    if num_proc is None:
        num_proc = (os.cpu_count() or 1) if len(ds) >= PARALLEL_TOKENIZE_ROWS else 1
    # ``code`` joins datasets' cache key: a cached tokenization made by other prompt code (an
    # older peftune, another transformers) is never reused
    ds = ds.map(encode, batched=True, desc="tokenizing", fn_kwargs={"code": _CODE_VERSION},
                num_proc=num_proc if num_proc > 1 else None)
    cut = pc.sum(ds.with_format("arrow")["truncated"]).as_py() or 0
    if cut:
        log.info("truncated %d of %d documents to %d tokens (summaries are never cut)",
                 cut, len(ds), max_source_tokens)
    return ds


def token_lengths(ds: datasets.Dataset) -> list[int]:
    """The length of every row's ``input_ids``, read from Arrow (no Python copy of the ids)."""
    return pc.list_value_length(ds.with_format("arrow")["input_ids"]).to_pylist()


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Shuffled order in which each batch holds examples of similar length.

    Shuffle, sort by length inside windows of ``window`` batches, cut into batches, shuffle
    the batches. The order depends only on (seed, epoch, batch_size), so a resumed run
    replays it. Given the examples of an optimizer step as ``batch_size``, any split into
    micro-batches (consecutive slices, longest first) trains on the same examples.
    """

    def __init__(self, lengths: list[int], batch_size: int, *, seed: int, window: int = 8):
        self.lengths, self.batch_size, self.seed, self.window = lengths, batch_size, seed, window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Any:
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=lambda i: -self.lengths[i])
            batches += [chunk[j:j + self.batch_size] for j in range(0, len(chunk),
                                                                    self.batch_size)]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            yield from batches[b]


@dataclass
class Collator:
    """Pads a batch dynamically; labels are padded with -100 by position.

    Not ``DataCollatorForSeq2Seq``: that one takes the padding side from the tokenizer, and
    the same tokenizer is padded on the right for training and on the left for a decoder's
    generation (where changing the shared tokenizer's side would leak into training).
    """

    pad_id: int
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {"input_ids": self._pad([f["input_ids"] for f in features], self.pad_id)}
        batch["attention_mask"] = self._pad([[1] * len(f["input_ids"]) for f in features], 0)
        if "labels" in features[0]:
            batch["labels"] = self._pad([f["labels"] for f in features], IGNORE_INDEX)
        return batch

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.padding_side == "left":
                out[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__
