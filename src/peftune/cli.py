"""Command line: ``peftune SUBCOMMAND [--config FILE.yaml] [--section.key VALUE ...]``.

Each subcommand maps to one function in :mod:`peftune.commands`; every YAML key is also a
flag (``train.learning_rate`` <-> ``--train.learning_rate``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Any

from peftune import commands
from peftune.config import Config, config_from_dict, flag_specs, load_yaml, set_dotted
from peftune.errors import Interrupted, PeftuneError

CONFIG_COMMANDS = {
    "train": "fine-tune a base model with a PEFT method and save the adapter",
    "evaluate": "generate summaries for a held-out split and score them with ROUGE",
    "search": "search methods and hyperparameters with Optuna, then retrain the best",
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML config; flags override it")
    group = parser.add_argument_group("config keys (also valid as YAML keys)")
    for key, tp, text, default in flag_specs():
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        group.add_argument(f"--{key}", dest=f"cfg:{key}", default=argparse.SUPPRESS,
                           metavar=_type_name(tp).upper().replace(" | NONE", ""),
                           help=f"{text} (default: {shown})")


def build_config(ns: argparse.Namespace, base: dict[str, Any] | None = None) -> Config:
    data = load_yaml(ns.config) if getattr(ns, "config", None) else dict(base or {})
    for key, value in vars(ns).items():
        if key.startswith("cfg:"):
            set_dotted(data, key[4:], value)
    return config_from_dict(data)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="peftune", description="Parameter-efficient fine-tuning for summarization, "
        "scored with ROUGE on generated text.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    top.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in CONFIG_COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        add_config_flags(p)
        if name == "evaluate":
            p.add_argument("--adapter", help="adapter folder or run folder (default: "
                           "OUTPUT_DIR/adapter; no adapter scores the base model)")
            p.add_argument("--split", default="test", choices=("validation", "test"),
                           help="split to score (default: test)")
    p = sub.add_parser("summarize", help="summarize text with a trained adapter",
                       description="summarize text with a trained adapter, with the run's "
                       "prompt and decoding settings (flags override them)")
    p.add_argument("adapter", help="adapter folder or run folder")
    p.add_argument("text", nargs="?", help="text to summarize (else --input or stdin)")
    p.add_argument("--input", help="a text file, or a .jsonl file with a 'document' field")
    p.add_argument("--max-new-tokens", type=int, dest="cfg:eval.max_new_tokens",
                   default=argparse.SUPPRESS, help="same as --eval.max_new_tokens")
    add_config_flags(p)
    sub.add_parser("methods", help="list the PEFT methods and their default options")
    p = sub.add_parser("export", help="export an adapter: as is, merged, or as GGUF",
                       description="export a trained adapter for serving: the PEFT adapter as "
                       "is, merged into its base (safetensors), or a LLaMA GGUF file")
    p.add_argument("adapter", help="adapter folder or run folder")
    p.add_argument("--format", default="merged", choices=("adapter", "merged", "gguf"),
                   help="what to write (default: merged)")
    p.add_argument("--out", help="output folder (default: RUN/export-FORMAT)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the base model's "
                   "own code from the hub (never taken from the adapter folder)")
    p.add_argument("--dtype", help="merged: auto, float32, bfloat16 or float16 (default: auto, "
                   "the precision the run generated in; at least bfloat16 for a quantized "
                   "base); gguf: f32, f16 or bf16 (default: f16)")
    p = sub.add_parser("report", help="HTML report and plots of a search run",
                       description="HTML report and plots of a search run")
    p.add_argument("run_dir", help="the search's output_dir")
    text = "train and score several methods on the same data, budget and seed; write a table"
    p = sub.add_parser("compare", help=text, description=text)
    add_config_flags(p)
    p.add_argument("--methods", help="comma-separated methods (default: all)")
    p.add_argument("--split", default="test", choices=("validation", "test"),
                   help="split to score (default: test)")
    p.add_argument("--shared-lr", action="store_true", help="use train.learning_rate for every "
                   "method instead of each method's suggested rate")
    return top


def setup_logging(quiet: bool) -> None:
    import datasets
    import transformers

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("peftune").setLevel(logging.WARNING if quiet else logging.INFO)
    import optuna

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING if quiet else optuna.logging.INFO)
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    if quiet:
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()


def _adapter_and_config(ns: argparse.Namespace) -> tuple[Any, Config]:
    adapter = commands.find_adapter(ns.adapter)
    return adapter, build_config(ns, commands.adapter_settings(adapter))


def _evaluate(ns: argparse.Namespace, argv: list[str]) -> None:
    if not ns.adapter:
        commands.evaluate(build_config(ns), adapter=None, split=ns.split)
        return
    adapter, cfg = _adapter_and_config(ns)
    commands.evaluate(cfg, adapter=adapter, split=ns.split)


def _summarize(ns: argparse.Namespace, argv: list[str]) -> None:
    adapter, cfg = _adapter_and_config(ns)
    commands.summarize(adapter, cfg, text=ns.text, input_file=ns.input)


def _compare(ns: argparse.Namespace, argv: list[str]) -> None:
    from peftune import compare

    methods = [m.strip() for m in (ns.methods or "").split(",") if m.strip()] or None
    compare.run(build_config(ns), split=ns.split, shared_lr=ns.shared_lr, quiet=ns.quiet,
                methods=methods)


COMMANDS = {
    "train": lambda ns, argv: commands.train(build_config(ns)),
    "evaluate": _evaluate,
    "summarize": _summarize,
    "search": lambda ns, argv: commands.search(build_config(ns), argv=argv),
    "export": lambda ns, argv: commands.export(ns.adapter, fmt=ns.format, out=ns.out,
                                               dtype=ns.dtype,
                                               trust_remote_code=ns.trust_remote_code),
    "report": lambda ns, argv: commands.report(ns.run_dir),
    "methods": lambda ns, argv: commands.methods(),
    "compare": _compare,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    ns = parser().parse_args(argv)
    setup_logging(ns.quiet)
    try:
        COMMANDS[ns.command](ns, argv)
    except Interrupted as err:
        print(f"peftune: {err}", file=sys.stderr)
        return 130
    except PeftuneError as err:
        print(f"peftune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftune: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
