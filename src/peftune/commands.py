"""What each CLI subcommand does, as plain functions over a resolved :class:`Config`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from peft import PeftModel
from transformers import TextStreamer

from peftune import models
from peftune import train as training
from peftune.config import Config, config_from_dict, load_yaml
from peftune.errors import ModelError, PeftuneError
from peftune.evaluate import generate, kv_cache_compat, prompts_of, score
from peftune.methods import registry


def find_adapter(path: str | Path) -> Path:
    """Accept an adapter folder or a run folder that holds ``adapter/``."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ModelError(f"no adapter found at {path} (expected adapter_config.json there or in "
                     f"{path / 'adapter'})")


def adapter_config(adapter: Path) -> dict:
    meta = adapter / "peftune.yaml"
    return load_yaml(meta) if meta.is_file() else {}


def train(cfg: Config) -> training.TrainResult:
    result = training.run(cfg)
    m = result.metrics
    print(f"\ntrained {cfg.method} on {cfg.data.source} in {m.get('train_runtime', 0):.0f}s: "
          f"train loss {m.get('train_loss', float('nan')):.4f}"
          + (f", validation loss {m['eval_loss']:.4f}" if "eval_loss" in m else ""))
    print(f"adapter: {result.adapter_dir}")
    print(f"next:    peftune evaluate --adapter {result.adapter_dir}")
    return result


def evaluate(cfg: Config, *, adapter: Path | None, split: str = "test") -> dict[str, dict]:
    out_dir = Path(cfg.output_dir)
    if adapter is None and (out_dir / "adapter" / "adapter_config.json").is_file():
        adapter = out_dir / "adapter"
    tokenizer = models.load_tokenizer(cfg.model)
    base = training.load_base(cfg, tokenizer)
    data = training.prepare(cfg, tokenizer, seq2seq=base.config.is_encoder_decoder,
                            roles=(split,))
    ds = data.splits[split]
    kw = dict(batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
              num_beams=cfg.eval.num_beams,
              precision=training.resolve_precision(cfg.train.precision))
    results: dict[str, dict] = {}
    if cfg.eval.zero_shot or adapter is None:
        tag = f"zero_shot_{split}" if adapter else split
        results["zero-shot"] = score(base, tokenizer, ds, out_dir=out_dir, tag=tag, **kw)
    if adapter is not None:
        model = PeftModel.from_pretrained(base, str(adapter))
        results[cfg.method] = score(model, tokenizer, ds, out_dir=out_dir, tag=split, **kw)
    print_rouge(results, title=f"ROUGE on {len(ds)} {split} examples of {cfg.data.source}")
    print(f"predictions and metrics: {out_dir}")
    return results


def print_rouge(results: dict[str, dict], *, title: str) -> None:
    print(f"\n{title}")
    print(f"{'':<14}{'ROUGE-1':>9}{'ROUGE-2':>9}{'ROUGE-L':>9}{'ROUGE-Lsum':>11}")
    for name, m in results.items():
        print(f"{name:<14}{m['rouge1']:>9.2f}{m['rouge2']:>9.2f}{m['rougeL']:>9.2f}"
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


def summarize(adapter_path: str, *, text: str | None = None, input_file: str | None = None,
              max_new_tokens: int = 128) -> list[str]:
    adapter = find_adapter(adapter_path)
    cfg = config_from_dict(adapter_config(adapter))
    docs = [d for d in _read_documents(text, input_file) if d.strip()]
    if not docs:
        raise PeftuneError("nothing to summarize: the input is empty")
    tokenizer = models.load_tokenizer(cfg.model)
    model = PeftModel.from_pretrained(training.load_base(cfg, tokenizer), str(adapter))
    fmt = training.PromptFormat.for_tokenizer(
        tokenizer, cfg.data.instruction, seq2seq=model.config.is_encoder_decoder)
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    prompts = [fmt.prompt(doc, cfg.data.max_source_tokens) for doc in ids]
    precision = training.resolve_precision(cfg.train.precision)
    if len(prompts) == 1:
        return [_stream(model, tokenizer, prompts[0], max_new_tokens)]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                       precision=precision, batch_size=cfg.eval.batch_size)
    for out in outputs:
        print(out)
    return outputs


def _stream(model: PeftModel, tokenizer, prompt: list[int], max_new_tokens: int) -> str:
    """Print tokens as they are generated (one document)."""
    import torch

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.eval()
    with torch.inference_mode(), kv_cache_compat(model):
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                             do_sample=False, streamer=streamer,
                             pad_token_id=tokenizer.pad_token_id)
    start = 0 if model.config.is_encoder_decoder else len(prompt)
    return tokenizer.decode(out[0, start:], skip_special_tokens=True).strip()


def methods() -> None:
    from peftune.config import flag_specs

    specs = flag_specs()
    for name, method in registry().items():
        notes = ["mergeable" if method.mergeable else "not mergeable",
                 "causal and encoder-decoder" if method.seq2seq else "causal LMs only",
                 f"suggested --train.learning_rate {method.learning_rate:g}"]
        print(f"{name:<14} {method.summary} [{'; '.join(notes)}]")
        for key, _, text, default in specs:
            if key.startswith(f"{name}."):
                print(f"    --{key:<38} {default!s:<10} {text}")


__all__ = ["evaluate", "find_adapter", "methods", "prompts_of", "summarize", "train"]
