"""XSum-sized data on one machine: generate an XSum-shaped corpus, then time preparing it.

    python benchmarks/scale_data.py                  # make bench-scale (full size)
    python benchmarks/scale_data.py --scale 0.25     # a quarter of the rows
    python benchmarks/scale_data.py --generate-only --out DIR
    python benchmarks/scale_data.py --compare-num-proc 20000   # tokenizing: 1 vs all CPUs

The corpus has XSum's row counts (204,045 / 11,332 / 11,334) and lengths drawn to match its
published statistics (Narayan et al., 2018: documents 431.07 words, summaries 23.26 words on
average). Lengths are lognormal (documents sigma 0.6, summaries sigma 0.25, mean set to the
targets; documents at least 20 words, summaries at least 5). Words come from a fixed
vocabulary (common English words, then 2,000 seeded made-up words) with Zipf frequencies, in
sentences of about 20 words; the same seed writes the same files. Written as Parquet
(train/validation/test.parquet, columns id, document, summary) to a folder outside the
repository (default /tmp/peftune-xsum-synthetic), never shipped.

Preparing is what `train` and `search` do before the first step: load and validate the
splits, tokenize them with the embedded SmolLM2 tokenizer (`assembly.prepare`) and build the
length-grouped training order (`LengthGroupedSampler`). It runs twice, each in its own
process (peak RSS is its own): first on an empty datasets cache, then on the filled one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = Path("/tmp/peftune-xsum-synthetic")
ROWS = {"train": 204_045, "validation": 11_332, "test": 11_334}
DOCUMENT_WORDS, SUMMARY_WORDS = 431.07, 23.26
DOCUMENT_SIGMA, SUMMARY_SIGMA = 0.6, 0.25
DOCUMENT_MIN, SUMMARY_MIN = 20, 5
SENTENCE_WORDS = 20
COMMON = """the of and to a in that is for on was with he it as at by said his be from
have has are an not they this but had who were their been will would after one year
two new first more about up also last out people over government police told could
its other when into than some there time all years three which we there she her what
world can after before him if or so no just now them such being being during under
while week day country city state says minister president club team game season match
home back against between since found made three four five many most make show added
told report officials court case public party local school family company market group
plans health service water police officers still because where found work life news
football league win won second half goal goals players manager cup final police chief
""".split()
MADE_UP = 2000


# ---------------------------------------------------------------- the corpus

def vocabulary(seed: int) -> list[str]:
    """Common English words first (most frequent), then made-up words of 1-3 syllables."""
    rng = random.Random(seed)
    onsets, vowels = "b c d f g h k l m n p r s t v w z br ch dr st tr".split(), "aeiou"
    common = list(dict.fromkeys(COMMON))
    seen, made = set(common), []
    while len(made) < MADE_UP:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 3)))
        if word not in seen:
            seen.add(word)
            made.append(word)
    return common + made


def lognormal_lengths(rng: random.Random, n: int, mean: float, sigma: float,
                      low: int) -> list[int]:
    """``n`` lengths from a lognormal with the given mean (not median) and sigma."""
    mu = math.log(mean) - sigma * sigma / 2
    return [max(low, round(rng.lognormvariate(mu, sigma))) for _ in range(n)]


def text(rng: random.Random, words: list[str], cum_weights: list[float], n: int) -> str:
    """``n`` words in sentences: capitalised first word, a full stop at the end."""
    drawn = rng.choices(words, cum_weights=cum_weights, k=n)
    out = []
    for start in range(0, n, SENTENCE_WORDS):
        sentence = drawn[start:start + SENTENCE_WORDS]
        out.append(sentence[0].capitalize() + "".join(" " + w for w in sentence[1:]) + ".")
    return " ".join(out)


def rows(split: str, n: int, *, seed: int) -> dict[str, list[str]]:
    """The columns of one split; each split has its own stream of the seed."""
    words = vocabulary(seed)
    cum, total = [], 0.0
    for rank in range(1, len(words) + 1):  # Zipf: frequency ~ 1 / rank
        total += 1 / rank
        cum.append(total)
    rng = random.Random(f"{seed}-{split}")
    docs = lognormal_lengths(rng, n, DOCUMENT_WORDS, DOCUMENT_SIGMA, DOCUMENT_MIN)
    sums = lognormal_lengths(rng, n, SUMMARY_WORDS, SUMMARY_SIGMA, SUMMARY_MIN)
    return {"id": [f"{split}-{i}" for i in range(n)],
            "document": [text(rng, words, cum, k) for k in docs],
            "summary": [text(rng, words, cum, k) for k in sums]}


def generate(out: Path, *, scale: float = 1.0, seed: int = 0) -> dict[str, int]:
    """Write train/validation/test.parquet to ``out``; return the row counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    counts = {split: max(1, round(n * scale)) for split, n in ROWS.items()}
    for split, n in counts.items():
        part = out / f"{split}.parquet.part"
        with pq.ParquetWriter(part, pa.schema([("id", pa.string()), ("document", pa.string()),
                                               ("summary", pa.string())])) as writer:
            # written in chunks (each with its own seed stream) so memory stays flat
            for chunk, start in enumerate(range(0, n, 20_000)):
                columns = rows(f"{split}-{chunk}", min(20_000, n - start), seed=seed)
                columns["id"] = [f"{split}-{start + i}" for i in range(len(columns["id"]))]
                writer.write_table(pa.table(columns))
        part.rename(out / f"{split}.parquet")
    (out / "corpus.json").write_text(json.dumps({"scale": scale, "seed": seed, **counts}))
    return counts


# ---------------------------------------------------------------- preparing it

def time_preparation(source: Path) -> dict[str, Any]:
    """One timed preparation (run in its own process): what `train` does before step one."""
    import datasets

    from peftune import assembly, config_from_dict, models
    from peftune.data import LengthGroupedSampler, token_lengths

    cache_files_before = _cache_files()
    start = time.perf_counter()
    cfg = config_from_dict({"data": {"source": str(source)}})
    tokenizer = models.load_tokenizer(cfg.model)
    t_tokenizer = time.perf_counter()
    prepared = assembly.prepare(cfg, tokenizer, roles=("train", "validation", "test"))
    t_prepare = time.perf_counter()
    lengths = token_lengths(prepared.splits["train"])
    order = list(LengthGroupedSampler(lengths, 8, seed=0))
    end = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    self_rss = usage.ru_maxrss / 1024
    workers_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    train = prepared.splits["train"]
    return {"wall_s": round(end - start, 1), "tokenizer_s": round(t_tokenizer - start, 1),
            "load_tokenize_s": round(t_prepare - t_tokenizer, 1),
            "length_order_s": round(end - t_prepare, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(self_rss), "worker_peak_rss_mb": round(workers_rss),
            "rows": {role: len(ds) for role, ds in prepared.splits.items()},
            "train_tokens": int(sum(lengths)),
            "order_is_permutation": len(set(order)) == len(train),
            "train_cache_files": len(train.cache_files),
            "new_cache_files": len(_cache_files() - cache_files_before),
            "datasets": datasets.__version__, "cpus": os.cpu_count()}


def tokenize_only(source: Path, rows: int, num_proc: int) -> dict[str, Any]:
    """Tokenizing the first ``rows`` training rows with ``num_proc`` processes, timed."""
    from peftune import config_from_dict, models
    from peftune.data import load_splits, tokenize

    cfg = config_from_dict({"data": {"source": str(source), "max_train_examples": rows}})
    tokenizer = models.load_tokenizer(cfg.model)
    train = load_splits(cfg.data)["train"]
    start = time.perf_counter()
    tokenize(train, tokenizer, models.prompt_format(cfg, tokenizer),
             cfg.data.max_source_tokens, num_proc=num_proc)
    return {"num_proc": num_proc, "rows": len(train),
            "tokenize_s": round(time.perf_counter() - start, 1)}


def _cache_files() -> set[str]:
    root = Path(os.environ["HF_DATASETS_CACHE"])
    return {str(p) for p in root.rglob("*.arrow")} if root.exists() else set()


def child(source: Path, cache: Path, *args: str) -> dict[str, Any]:
    """Run one part in its own process on the datasets cache ``cache``; its JSON result."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                       os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, __file__, "--out", str(source), *args],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_num_proc(source: Path, rows: int) -> None:
    """Tokenizing the same rows in one process and in one per CPU, each on an empty cache."""
    times = {}
    for num_proc in (1, os.cpu_count() or 1):
        cache = source / f"hf-datasets-cache-procs{num_proc}"
        shutil.rmtree(cache, ignore_errors=True)
        times[num_proc] = child(source, cache, "--part", "tokenize", "--rows", str(rows),
                                "--num-proc", str(num_proc))["tokenize_s"]
        shutil.rmtree(cache, ignore_errors=True)
    print(f"tokenizing {rows:,} training rows: " +
          ", ".join(f"num_proc={n}: {t} s" for n, t in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="corpus folder (outside the repo)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of XSum's row counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--compare-num-proc", type=int, metavar="ROWS",
                        help="only time tokenizing ROWS training rows with 1 and with one "
                             "process per CPU")
    parser.add_argument("--part", choices=("prepare", "tokenize"), help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--num-proc", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part == "prepare":
        print(json.dumps(time_preparation(args.out)))
        return
    if args.part == "tokenize":
        print(json.dumps(tokenize_only(args.out, args.rows, args.num_proc)))
        return
    manifest = args.out / "corpus.json"
    wanted = {"scale": args.scale, "seed": args.seed}
    if not manifest.exists() or {k: json.loads(manifest.read_text()).get(k)
                                 for k in wanted} != wanted:
        start = time.perf_counter()
        counts = generate(args.out, scale=args.scale, seed=args.seed)
        print(f"generated {counts} in {time.perf_counter() - start:.0f} s -> {args.out}")
    if args.generate_only:
        return
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"scale {args.scale}", flush=True)
    if args.compare_num_proc:
        compare_num_proc(args.out, args.compare_num_proc)
        return
    cache = args.out / "hf-datasets-cache"
    shutil.rmtree(cache, ignore_errors=True)
    cold = child(args.out, cache, "--part", "prepare")
    print("empty cache:", json.dumps(cold), flush=True)
    warm = child(args.out, cache, "--part", "prepare")
    print("filled cache:", json.dumps(warm))
    hit = warm["new_cache_files"] == 0 and warm["wall_s"] < cold["wall_s"] / 3
    print("| run | wall (s) | load+validate+tokenize (s) | length order (s) | peak RSS (MB) "
          "| largest worker RSS (MB) |\n|---|---|---|---|---|---|")
    for name, r in (("empty cache", cold), ("filled cache", warm)):
        print(f"| {name} | {r['wall_s']} | {r['load_tokenize_s']} | {r['length_order_s']} | "
              f"{r['peak_rss_mb']} | {r['worker_peak_rss_mb']} |")
    print(f"second run hit the cache: {'yes' if hit else 'NO'} "
          f"({cold['wall_s'] / max(warm['wall_s'], 0.1):.1f}x faster, "
          f"{warm['new_cache_files']} new cache files); train tokens {cold['train_tokens']:,}")


if __name__ == "__main__":
    main()
