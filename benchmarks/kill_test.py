"""Randomized kill test: ``kill -9`` at seeded random instants, rerun, check the result.

    python benchmarks/kill_test.py                          # 20 kills in each of 4 modes
    python benchmarks/kill_test.py --kills 5 --modes search,train --seed 1 --work DIR

Everything runs on a tiny random LLaMA and a handful of rows (built here, as the tests
build them), so one kill and its rerun take seconds. For each mode an uninterrupted run is
timed first; each kill lands at an instant drawn uniformly over that run's length, so the
kills fall across its whole life (start-up and data preparation, trial creation, training,
generation, study writes, the final retrain, the report).

Modes and what is checked after each kill:

- ``search`` (2 trials, final retrain, report): the search process is killed and the same
  command rerun. The study then holds exactly ``n_trials`` finished trials and no running
  one; the trials finished before the kill are kept as they were (not redone); the final
  adapter and the report exist.
- ``worker``: one of the two workers of ``--search.workers 2`` is killed; the search is not
  rerun (its parent tops the study up). The same checks.
- ``train`` (checkpoints every step): ``peftune train`` is killed and rerun; the adapter's
  weights equal the uninterrupted run's.
- ``evaluate``: ``peftune evaluate`` is killed and rerun; the predictions equal the
  uninterrupted run's.

In every mode the rerun (for ``worker``, the search's whole run) must take no longer than
``remaining work + start-up + grace``: the uninterrupted run's length after the kill
instant, plus the fixed cost of any rerun (measured: a rerun of a finished run), plus the
stale-trial grace period, all with a 25% allowance for a shared machine's noise.
Prints one markdown table per mode, with each kill's clock time and load average. Each run
keeps its output in ``WORK/MODE/kill-NN-A/log.txt``; a worker-mode search still running at
1.25 x its bound gets its processes' stacks dumped beside it (``stacks.txt``; needs
``py-spy`` on the PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.conftest import make_llama, make_rows, make_tokenizer, write_jsonl  # noqa: E402

HEARTBEAT = 2  # seconds; a trial is stale after 4 beats
GRACE = 4 * HEARTBEAT
NOISE = 1.25
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def build_inputs(work: Path) -> tuple[Path, Path]:
    model_dir, data_dir = work / "model", work / "data"
    if not model_dir.is_dir():
        tok = make_tokenizer(chat=True, pad_is_eos=True)
        make_llama(len(tok)).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = make_rows(32)
    write_jsonl(data_dir / "train.jsonl", rows[:12])
    write_jsonl(data_dir / "validation.jsonl", rows[12:16])
    write_jsonl(data_dir / "test.jsonl", rows[16:])
    return model_dir, data_dir


def base_config(model_dir: Path, data_dir: Path) -> dict:
    return {
        "data": {"source": str(data_dir), "max_source_tokens": 24},
        "model": {"name": str(model_dir)},
        "train": {"max_steps": 6, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-2,
                  "logging_steps": 1, "precision": "fp32", "save_steps": 1},
        "eval": {"max_new_tokens": 12, "batch_size": 2},
        "lora": {"dropout": 0.1},
        "search": {"n_trials": 2, "eval_examples": 4, "intermediate_steps": 2,
                   "heartbeat_seconds": HEARTBEAT, "baselines": False},
    }


def command(mode: str, cfg: dict, out: Path, adapter: Path | None) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.in.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output_dir": str(out / "run")}))
    verb = {"search": "search", "worker": "search", "train": "train",
            "evaluate": "evaluate"}[mode]
    cmd = [sys.executable, "-m", "peftune", "-q", verb, "--config", str(path)]
    if mode == "worker":
        cmd += ["--search.workers", "2"]
    if mode == "evaluate":
        cmd += ["--adapter", str(adapter)]
    return cmd


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def kill_at(cmd: list[str], instant: float, *, worker: bool, rng: random.Random,
            snapshot: Callable[[], str], log: Path, overdue: float) -> tuple[str, str]:
    """Start ``cmd``, SIGKILL it (or one of its workers) ``instant`` s later; what was hit
    ("finished first" when it ended before) and ``snapshot()`` just after the kill. The
    run's output goes to ``log``; a worker-mode search still running ``overdue`` s after its
    start gets its processes' stacks dumped next to it (see :func:`dump_stacks`)."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    deadline = start + instant
    while time.perf_counter() < deadline and proc.poll() is None:
        time.sleep(0.01)
    if proc.poll() is not None:
        return "finished first", ""
    if not worker:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return cmd[4], snapshot()
    hit, state = "no worker (search done)", ""
    while proc.poll() is None:  # the workers start a moment after the parent
        workers = children(proc.pid)
        if len(workers) == 2:
            os.kill(rng.choice(workers), signal.SIGKILL)
            hit, state = "worker", snapshot()
            break
        if time.perf_counter() > deadline + 120:
            break
        time.sleep(0.01)
    try:
        proc.wait(timeout=max(1.0, start + overdue - time.perf_counter()))
    except subprocess.TimeoutExpired:
        dump_stacks(proc.pid, log.with_name("stacks.txt"))
        proc.wait()
    return hit, state


def dump_stacks(pid: int, path: Path) -> None:
    """Where process ``pid`` and its children are (``py-spy dump``, when installed)."""
    spy = shutil.which("py-spy")
    if spy is None:
        return
    with path.open("w") as out:
        for p in [pid, *children(pid)]:
            out.write(f"== pid {p} at {time.strftime('%H:%M:%S')}, load "
                      f"{os.getloadavg()[0]:.1f}\n")
            out.flush()
            subprocess.run([spy, "dump", "--pid", str(p)], stdout=out, stderr=out)


def progress(mode: str, run: Path) -> str:
    """How far the killed run had got, from what it left on disk."""
    if mode in ("search", "worker"):
        states = [state for state, _ in study_state(run).values()]
        text = (f"{sum(s in ('COMPLETE', 'PRUNED') for s in states)} trials done, "
                f"{states.count('RUNNING')} running")
        if (run / "final" / "adapter").is_dir():
            text += ", final saved"
        return text + (", report" if (run / "report" / "index.html").is_file() else "")
    if mode == "train":
        steps = [int(p.parent.name.split("-")[1])
                 for p in (run / "checkpoints").glob("checkpoint-*/*") if "complete" in p.name]
        text = f"checkpoint {max(steps)}" if steps else "no checkpoint"
        return text + (", adapter saved" if (run / "adapter").is_dir() else "")
    partial = list(run.glob("predictions*.partial-*.jsonl"))
    lines = sum(len(p.read_text().splitlines()) for p in partial)
    return "predictions written" if (run / "predictions.jsonl").is_file() else \
        f"{lines} predictions kept"


# ---------------------------------------------------------------- what each mode checks

def study_state(run: Path) -> dict:
    import optuna

    storage = f"sqlite:///{run / 'study.db'}"
    if not (run / "study.db").exists():
        return {}
    try:
        study = optuna.load_study(study_name=run.resolve().name, storage=storage)
    except KeyError:
        return {}
    return {t.number: (t.state.name, t.values) for t in study.trials}


def check_search(run: Path, before: dict, n_trials: int) -> list[str]:
    after = study_state(run)
    problems = []
    finished = [n for n, (state, _) in after.items() if state in ("COMPLETE", "PRUNED")]
    if len(finished) != n_trials:
        problems.append(f"{len(finished)} finished trials")
    if any(state == "RUNNING" for state, _ in after.values()):
        problems.append("a trial left running")
    redone = [n for n, (state, values) in before.items()
              if state in ("COMPLETE", "PRUNED") and after.get(n) != (state, values)]
    if redone:
        problems.append(f"trials {redone} changed")
    for path in ("final/adapter/adapter_model.safetensors", "report/index.html"):
        if not (run / path).is_file():
            problems.append(f"no {path}")
    return problems


def adapter_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def check_train(run: Path, reference: Path) -> list[str]:
    import torch

    if not (run / "adapter").is_dir():
        return ["no adapter"]
    mine, ref = adapter_weights(run), adapter_weights(reference)
    same = mine.keys() == ref.keys() and all(
        torch.allclose(mine[k], ref[k], atol=1e-6, rtol=0) for k in ref)
    return [] if same else ["adapter differs"]


def predictions(run: Path) -> list:
    path = run / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def check_evaluate(run: Path, reference: Path) -> list[str]:
    mine = predictions(run)
    return [] if mine and mine == predictions(reference) else ["predictions differ"]


# ---------------------------------------------------------------- driver

def run_mode(mode: str, cfg: dict, work: Path, kills: int, rng: random.Random,
             adapter: Path | None) -> list[dict]:
    ref = work / mode / "reference"
    ref_cmd = command(mode, cfg, ref, adapter)
    baseline = timed(ref_cmd)
    # the fixed cost of any rerun: the same command on the finished run
    startup = timed(ref_cmd + (["--search.final", "false"] if mode in ("search", "worker")
                               else []))
    print(f"\n### {mode}: uninterrupted run {baseline:.1f} s, rerun of a finished run "
          f"{startup:.1f} s, grace {GRACE} s\n\n"
          f"| {mode} kill | started (UTC) | load | at s | killed | left on disk | rerun s "
          "| bound s | result |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for i in range(kills):
        # a busy machine may run faster than the baseline did: a run that ends before its
        # kill is started afresh with an instant drawn over the length it actually took
        length = baseline
        for attempt in range(3):
            instant = rng.uniform(0.0, length)
            out = work / mode / f"kill-{i:02d}-{attempt}"
            cmd = command(mode, cfg, out, adapter)
            start, clock = time.perf_counter(), time.strftime("%H:%M:%S", time.gmtime())
            hit, state = kill_at(cmd, instant, worker=mode == "worker", rng=rng,
                                 snapshot=lambda out=out: progress(mode, out / "run"),
                                 log=out / "log.txt",
                                 overdue=NOISE * (instant + baseline + GRACE))
            load = os.getloadavg()[0]  # the 1-minute load average just after the kill
            if hit != "finished first":
                break
            length = time.perf_counter() - start
        if mode == "worker":  # at worst the lost trial is redone from scratch by the parent
            rerun = time.perf_counter() - start
            bound = instant + baseline + GRACE
        else:
            before = study_state(out / "run") if mode == "search" else {}
            rerun = timed(cmd)
            bound = max(0.0, baseline - instant) + startup + GRACE
        run = out / "run"
        problems = (check_search(run, before if mode == "search" else {},
                                 cfg["search"]["n_trials"]) if mode in ("search", "worker")
                    else check_train(run, ref / "run") if mode == "train"
                    else check_evaluate(run, ref / "run"))
        if rerun > NOISE * bound:
            problems.append(f"rerun {rerun:.1f} s > {NOISE} x {bound:.1f} s")
        rows.append({"kill": i, "started": clock, "load": load, "at_s": instant, "hit": hit,
                     "state": state, "rerun_s": rerun, "bound_s": bound, "ok": not problems,
                     "problems": problems, "dir": str(out)})
        print(f"| {i} | {clock} | {load:.1f} | {instant:.1f} | {hit} | {state} | {rerun:.1f} "
              f"| {bound:.1f} | {'clean' if not problems else '; '.join(problems)} |",
              flush=True)
    clean = sum(r["ok"] for r in rows)
    print(f"{mode}: {clean}/{len(rows)} clean resumes", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--modes", default="search,worker,train,evaluate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kill-test-"))
    model_dir, data_dir = build_inputs(work)
    cfg = base_config(model_dir, data_dir)
    rng = random.Random(args.seed)
    adapter = None
    modes = args.modes.split(",")
    if "evaluate" in modes:  # the adapter every evaluation scores
        timed(command("train", cfg, work / "adapter", None))
        adapter = work / "adapter" / "run" / "adapter"
    results = {}
    for mode in modes:
        results[mode] = run_mode(mode, cfg, work, args.kills, rng, adapter)
    (work / "kill_test.json").write_text(json.dumps(results, indent=1))
    print("\n" + "\n".join(f"{m}: {sum(r['ok'] for r in rows)}/{len(rows)} clean"
                           for m, rows in results.items()))
    if not all(r["ok"] for rows in results.values() for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
