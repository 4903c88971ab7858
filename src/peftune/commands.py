"""What each CLI subcommand does, as plain functions over a resolved :class:`Config`.

The stages (and torch, transformers, optuna under them) are imported by the function that
runs them: ``peftune methods``, ``--help`` and config errors need none of them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftune.config import Config, flag_specs
from peftune.errors import ModelError, PeftuneError
from peftune.methods import registry
from peftune.rundir import ADAPTER_SETTINGS, RunDir, folder_settings

if TYPE_CHECKING:
    from peftune.train import TrainResult


def find_adapter(path: str | Path) -> Path:
    """Accept an adapter folder or a run folder that holds ``adapter/``."""
    path = Path(path)
    for candidate in (path, RunDir(path).adapter):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ModelError(f"no adapter found at {path} (expected adapter_config.json there or in "
                     f"{RunDir(path).adapter})")


def adapter_settings(adapter: Path) -> dict[str, Any]:
    """The run settings saved with an adapter, checked first: nothing in the folder is read
    as settings, and no tokenizer or model is loaded, before the adapter passes its checks."""
    from peftune import models

    models.check_adapter_dir(adapter)
    return folder_settings(adapter / ADAPTER_SETTINGS)


def describe(cfg: Config) -> str:
    """The settings runs differ in, on one line: ``lora: r=8, alpha=32, ...; learning_rate
    2e-4, batch 8, epochs 2``."""
    options = []
    for f in dataclasses.fields(cfg.method_options):
        value = getattr(cfg.method_options, f.name)
        if isinstance(value, list):
            value = ",".join(map(str, value)) or "default"
        options.append(f"{f.name}={value:g}" if isinstance(value, float) else
                       f"{f.name}={value}")
    t = cfg.train
    budget = f"max_steps {t.max_steps}" if t.max_steps > 0 else f"epochs {t.epochs:g}"
    return (f"{cfg.method}: {', '.join(options) or 'no options'}; learning_rate "
            f"{t.learning_rate:.2g}, batch {t.batch_size}, {budget}")


def train_command(cfg: Config) -> TrainResult:
    from peftune import lock, train

    if not train.is_main_process():  # rank 0 holds the run's lock for all ranks
        return train.run(cfg)
    with lock.hold(Path(cfg.output_dir), what="training"):
        result = train.run(cfg)
    m = result.metrics
    print(f"\ntrained {cfg.method} on {cfg.data.source} in {m.get('train_runtime', 0):.0f}s: "
          f"train loss {m.get('train_loss', float('nan')):.4f}"
          + (f", validation loss {m['eval_loss']:.4f}" if "eval_loss" in m else ""))
    print(f"settings: {describe(cfg)}")
    print(f"adapter: {result.adapter_dir}")
    print(f"next:    peftune evaluate --adapter {result.adapter_dir}")
    return result


def evaluate_command(cfg: Config, *, adapter: Path | None, split: str = "test") -> dict[str, dict]:
    from peftune import assembly, card, devices, models
    from peftune.generation import score

    out_dir, trained = Path(cfg.output_dir), RunDir.of(cfg).adapter
    if adapter is None and (trained / "adapter_config.json").is_file():
        adapter = trained
    if adapter is not None:
        models.check_adapter_dir(adapter)
    data = assembly.prepare(cfg, roles=(split,))
    ds = data.splits[split]
    base = devices.place(assembly.load_base(cfg, data.tokenizer))
    # the base only generates from here on: it may keep 16-bit weights
    kw = {"precision": models.precision(cfg), "keep_fp32_weights": False}
    results: dict[str, dict] = {}
    if cfg.eval.zero_shot or adapter is None:
        tag = f"zero_shot_{split}" if adapter else split
        results["zero-shot"] = score(base, data.tokenizer, ds, cfg.eval, out_dir=out_dir,
                                     tag=tag, **kw)
    if adapter is not None:
        model = models.load_adapter(base, adapter)
        results[cfg.method] = score(model, data.tokenizer, ds, cfg.eval, out_dir=out_dir,
                                    tag=split, **kw)
        card.update_metrics(adapter, results[cfg.method], cfg=cfg, tokenizer=data.tokenizer,
                            split=split)
    print_rouge(results, title=f"ROUGE on {len(ds)} {split} examples of {cfg.data.source}")
    print(f"predictions and metrics: {out_dir}")
    if adapter is not None:
        print(f"next:    peftune export {adapter} --format merged")
    return results


def print_rouge(results: dict[str, dict], *, title: str) -> None:
    print(f"\n{title}")
    print(f"{'':<20}{'ROUGE-1':>9}{'ROUGE-2':>9}{'ROUGE-L':>9}{'ROUGE-Lsum':>11}")
    for name, m in results.items():
        print(f"{name:<20}{m['rouge1']:>9.2f}{m['rouge2']:>9.2f}{m['rougeL']:>9.2f}"
              f"{m['rougeLsum']:>11.2f}")


def _read_documents(text: str | None, input_file: str | None) -> list[str]:
    if text is not None:
        return [text]
    if input_file is None:
        return [sys.stdin.read()]
    path = Path(input_file)
    if not path.is_file():
        raise PeftuneError(f"input file not found: {input_file}")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PeftuneError(f"{input_file}: not UTF-8 text") from None
    if path.suffix != ".jsonl":
        return [raw]
    docs = []
    for n, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                docs.append(str(json.loads(line)["document"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise PeftuneError(f"{input_file} line {n}: expected a JSON object with a "
                                   "'document' field") from None
    return docs


def summarize_command(adapter: Path, cfg: Config, *, text: str | None = None,
                      input_file: str | None = None) -> list[str]:
    """Summaries of ``text``, of each document of ``input_file`` or of stdin, with the run's
    prompt, decoding settings and precision: the texts ``evaluate`` would score. One
    document or many take the same path (batched generation)."""
    from peftune import assembly, models
    from peftune.generation import generate

    docs = [d for d in _read_documents(text, input_file) if d.strip()]
    if not docs:
        raise PeftuneError("nothing to summarize: the input is empty")
    tokenizer = models.load_tokenizer(cfg.model)
    prompts, _ = models.prompt_format(cfg, tokenizer).prompts(docs, cfg.data.max_source_tokens)
    model = assembly.load_trained(cfg, tokenizer, adapter)
    outputs = generate(model, tokenizer, prompts, cfg.eval, precision=models.precision(cfg),
                       keep_fp32_weights=False, progress=len(prompts) > 1)
    for out in outputs:
        print(out)
    return outputs


def methods_command() -> None:
    specs = flag_specs()
    for name, method in registry().items():
        notes = ["mergeable" if method.mergeable else "not mergeable",
                 "causal and encoder-decoder" if method.seq2seq else "causal LMs only",
                 f"suggested --train.learning_rate {method.learning_rate:g}"]
        print(f"{name:<14} {method.summary} [{'; '.join(notes)}]")
        for key, _, text, default in specs:
            if key.startswith(f"{name}."):
                print(f"    --{key:<38} {default!s:<10} {text}")


def plan_command(cfg: Config) -> str:
    """Memory and time of ``cfg``'s training on one device, without loading weights (unless
    ``plan.measure``)."""
    from peftune import assembly, plan

    data = assembly.prepare(cfg, roles=("train",)) if cfg.plan.use_data or \
        cfg.plan.measure else None
    result = plan.make(cfg, data=data)
    speed = peak = None
    if cfg.plan.measure and data is not None:
        from peftune.measure import training_speed

        speed, peak = training_speed(cfg, data)
    text = plan.render(result, tokens_per_s=speed, measured_peak=peak)
    print(text)
    return text


def search_command(cfg: Config, *, argv: list[str] | None = None) -> None:
    from peftune import report, search

    study, final = search.run(cfg, argv=argv)
    run_dir = RunDir.of(cfg)
    states = [t.state.name.lower() for t in study.trials]
    print(f"\nstudy '{study.study_name}': {len(states)} trials ("
          + ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states))) + ")")
    if final is not None:
        best = final["config"]
        default = study.trials[final["trial"]].user_attrs.get(search.DEFAULT_ATTR)
        print(f"best (trial {final['trial']}{', the default configuration' if default else ''}"
              f"): {describe(best)}")
        noise = report.noise_sentence(study)
        if noise:
            print(noise)
        rows = {**final["baselines"], f"best ({best.method})": final["test"]}
        print_rouge(rows, title="test split: zero-shot, default configuration and the best "
                    "configuration" if final["baselines"] else "final model on the test split")
        if final.get("comparison"):
            print("\n".join(report.difference_lines(
                final["comparison"], metric=report.headline_metric(cfg))))
        print(f"adapter: {final['adapter']}\nconfig:  {run_dir.best_config}")
    html = report.write(run_dir.path)
    print(f"report:  {html}")
    if run_dir.final.adapter.is_dir():
        print(f"next:    peftune summarize {run_dir.final.path} \"text ...\"")
    else:
        print("next:    rerun with --search.final true to retrain and test the best "
              "configuration")


def export_command(adapter_path: str, *, fmt: str = "merged", out: str | None = None,
                   dtype: str | None = None, trust_remote_code: bool = False,
                   parity: Any = None, merge_options: Any = None) -> Path:
    from peftune import export

    adapter = find_adapter(adapter_path)
    allowed = {"adapter": (), "merged": export.MERGED_DTYPES,
               "gguf": tuple(export.GGUF_DTYPES), "ollama": tuple(export.GGUF_DTYPES),
               "gguf-lora": export.LORA_DTYPES}[fmt]
    if dtype is not None and dtype not in allowed:
        raise PeftuneError(f"--dtype {dtype} does not apply to --format {fmt} (valid: "
                           f"{', '.join(allowed) or 'none'})")
    run_dir = adapter.parent if adapter == RunDir(adapter.parent).adapter else adapter
    target = Path(out) if out else RunDir(run_dir).export(fmt)
    done = export.export(adapter, target, fmt=fmt, dtype=dtype,
                         trust_remote_code=trust_remote_code, parity=parity,
                         merge_options=merge_options)
    size = sum(p.stat().st_size for p in ([done.path] if done.path.is_file()
                                          else done.path.rglob("*")) if p.is_file())
    based = f", merged into the {done.merge_base} base" if done.merge_base else ""
    print(f"\nexported {fmt} ({size / 2**20:.1f} MiB{based}): {done.path}")
    print(f"load:    {done.load}")
    if done.parity:
        print(done.parity)
    if fmt == "gguf":
        print(f"next:    llama-cli -m {done.path} -p \"Summarize ...\"")
    elif fmt in ("ollama", "gguf-lora"):
        print(f"next:    ollama create {run_dir.name} -f {target / 'Modelfile'}")
    else:
        print(f"next:    peftune export {adapter_path} --format gguf")
    return done.path


def report_command(run_dir: str) -> None:
    from peftune import report

    print(report.write(Path(run_dir)))
