"""Command line: ``peftune SUBCOMMAND [--config FILE.yaml] [--section.key VALUE ...]``.

Each subcommand maps to one function in :mod:`peftune.commands`; every YAML key is also a
flag (``train.learning_rate`` <-> ``--train.learning_rate``). Every config command accepts
every key; its ``--help`` shows the keys it uses and the options of the chosen ``--method``.

Nothing imported here loads torch, transformers or optuna (seconds of start-up): help and
config errors come back at once, and the libraries are set up once the config is checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from peftune import commands
from peftune.config import Config, config_from_dict, flag_specs, load_yaml, set_dotted
from peftune.errors import ConfigError, Interrupted, PeftuneError
from peftune.logs import setup_libraries, setup_logging
from peftune.merging import MergeOptions
from peftune.parity import ParityOptions

# The config keys that the commands which train or score show in --help (a trailing dot: the
# whole section). Every command accepts every key, so one YAML file serves them all.
RUN_KEYS = ("output_dir", "seed", "method", "data.", "model.", "train.", "eval.")


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its help, its arguments and the function that runs it."""

    help: str
    run: Callable[[argparse.Namespace, list[str]], None]
    """(the parsed command line, the raw one) -> runs the command."""
    description: str | None = ""
    """The opening text of its ``--help``: "" repeats ``help``, None shows none."""
    keys: tuple[str, ...] | None = None
    """The config keys its ``--help`` shows (a trailing dot: the whole section); None: it
    takes no config flags at all."""
    method_help: bool = False
    """Its ``--help`` also lists the options of the chosen ``--method``."""
    arguments: Callable[[argparse.ArgumentParser], Any] | None = None
    """Adds the arguments it has besides the config keys."""
    own_arguments_first: bool = False
    """Its own arguments come before ``--config`` in ``--help``."""
    positionals: str = ""
    """Its positional arguments, as the usage line of a config command names them."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _shown(key: str, command: Command, method: str) -> bool:
    if command.method_help and key.startswith(f"{method}."):
        return True
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in command.keys or ())


def chosen_method(argv: list[str]) -> str:
    """The ``--method`` of a command line (else its ``--config`` file's, else the default),
    read before parsing so that ``--help`` can show that method's options."""
    found: dict[str, str] = {}
    for i, arg in enumerate(argv):
        for flag in ("--method", "--config"):
            if arg == flag and i + 1 < len(argv):
                found[flag] = argv[i + 1]
            elif arg.startswith(flag + "="):
                found[flag] = arg.split("=", 1)[1]
    if "--method" in found:
        return found["--method"]
    if "--config" in found:
        try:
            return str(load_yaml(found["--config"]).get("method", Config.method))
        except ConfigError:
            pass  # reported when the config is built
    return Config.method


def add_config_flags(parser: argparse.ArgumentParser, name: str, *,
                     method: str = Config.method) -> None:
    """``--config`` and one flag per config key; ``--help`` shows the keys command ``name``
    uses (:attr:`Command.keys`)."""
    command = COMMANDS[name]
    # the keys listed once, in the help below, rather than again in the usage line
    parser.usage = (f"%(prog)s {command.positionals}[options] [--config FILE.yaml] "
                    "[--KEY VALUE ...]")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML config; flags override it")
    if command.method_help:
        note = (f"Shown: the keys {name} uses and the options of --method {method}. Every "
                "key is accepted. `peftune methods` lists the methods and their options; "
                f"`peftune {name} --method NAME --help` shows a method's options here.")
    else:
        note = (f"Shown: the keys {name} uses. Every key is accepted (`peftune search "
                "--help` lists the others, `peftune methods` the methods' options).")
    group = parser.add_argument_group("config keys (also valid as YAML keys)", note)
    for key, tp, text, default in flag_specs():
        shown = (",".join(map(str, default)) or "empty") if isinstance(default, list) \
            else default
        group.add_argument(f"--{key}", dest=f"cfg:{key}", default=argparse.SUPPRESS,
                           metavar=_type_name(tp).upper().replace(" | NONE", ""),
                           help=argparse.SUPPRESS if not _shown(key, command, method)
                           else text if "(default:" in text else f"{text} (default: {shown})")


def build_config(ns: argparse.Namespace, base: dict[str, Any] | None = None) -> Config:
    data = load_yaml(ns.config) if getattr(ns, "config", None) else dict(base or {})
    for key, value in vars(ns).items():
        if key.startswith("cfg:"):
            set_dotted(data, key[4:], value)
    return config_from_dict(data)


def _option_flags(parser: argparse.ArgumentParser, options: type, prefix: str, *,
                  bare: str | None = None) -> None:
    """One flag per field of an options dataclass: ``--PREFIX-FIELD`` (``--PREFIX`` for the
    field named ``bare``), with the field's help, default and choices."""
    for f in dataclasses.fields(options):
        flag = f"--{prefix}" if f.name == bare else f"--{prefix}-{f.name.replace('_', '-')}"
        choices = f.metadata.get("choices")
        parser.add_argument(flag, dest=f"{prefix}_{f.name}", default=f.default,
                            type=type(f.default),
                            choices=choices() if callable(choices) else choices,
                            help=f"{f.metadata['help']} (default: {f.default})")


def _options_of(ns: argparse.Namespace, options: type, prefix: str) -> Any:
    """The options dataclass from the flags :func:`_option_flags` added."""
    return options(**{f.name: getattr(ns, f"{prefix}_{f.name}")
                      for f in dataclasses.fields(options)})


def parser(*, method: str = Config.method) -> argparse.ArgumentParser:
    """The command line; ``method`` picks whose options the commands' ``--help`` shows."""
    top = argparse.ArgumentParser(
        prog="peftune", description="Parameter-efficient fine-tuning for summarization, "
        "scored with ROUGE on generated text.")
    top.add_argument("-q", "--quiet", action="store_true",
                     help="only warnings and results: no progress bars")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help
                           if command.description == "" else command.description)
        if command.arguments and command.own_arguments_first:
            command.arguments(p)
        if command.keys is not None:
            add_config_flags(p, name, method=method)
        if command.arguments and not command.own_arguments_first:
            command.arguments(p)
    return top


def _config(ns: argparse.Namespace) -> Config:
    """The checked config; then the libraries' logging, which imports them."""
    cfg = build_config(ns)
    setup_libraries(ns.quiet)
    return cfg


def _adapter_and_config(ns: argparse.Namespace) -> tuple[Any, Config]:
    adapter = commands.find_adapter(ns.adapter)
    setup_libraries(ns.quiet)
    return adapter, build_config(ns, commands.adapter_settings(adapter))


def _split_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="test", choices=("validation", "test"),
                   help="split to score (default: test)")


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="adapter folder or run folder (default: "
                   "OUTPUT_DIR/adapter; no adapter scores the base model)")
    _split_argument(p)


def _evaluate(ns: argparse.Namespace, argv: list[str]) -> None:
    if not ns.adapter:
        commands.evaluate_command(_config(ns), adapter=None, split=ns.split)
        return
    adapter, cfg = _adapter_and_config(ns)
    commands.evaluate_command(cfg, adapter=adapter, split=ns.split)


def _summarize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder or run folder")
    p.add_argument("text", nargs="?", help="text to summarize (else --input or stdin)")
    p.add_argument("--input", help="a text file, or a .jsonl file with a 'document' field")
    p.add_argument("--max-new-tokens", type=int, dest="cfg:eval.max_new_tokens", metavar="N",
                   default=argparse.SUPPRESS, help="same as --eval.max_new_tokens")


def _summarize(ns: argparse.Namespace, argv: list[str]) -> None:
    adapter, cfg = _adapter_and_config(ns)
    commands.summarize_command(adapter, cfg, text=ns.text, input_file=ns.input)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder or run folder")
    p.add_argument("--format", default="merged",
                   choices=("adapter", "merged", "gguf", "gguf-lora", "ollama"),
                   help="what to write (default: merged)")
    p.add_argument("--out", help="output folder (default: RUN/export-FORMAT)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the base model's "
                   "own code from the hub (never taken from the adapter folder)")
    p.add_argument("--dtype", help="merged: auto, float32, bfloat16 or float16 (default: auto, "
                   "the precision the run generated in; at least bfloat16 for a quantized "
                   "base); gguf, ollama: f32, f16, bf16 or q8_0; gguf-lora: f32, f16 or bf16 "
                   "(default: f16)")
    _option_flags(p, MergeOptions, "merge")
    _option_flags(p, ParityOptions, "parity", bare="mode")


def _export(ns: argparse.Namespace, argv: list[str]) -> None:
    setup_libraries(ns.quiet)
    commands.export_command(ns.adapter, fmt=ns.format, out=ns.out, dtype=ns.dtype,
                            trust_remote_code=ns.trust_remote_code,
                            parity=_options_of(ns, ParityOptions, "parity"),
                            merge_options=_options_of(ns, MergeOptions, "merge"))


def _report(ns: argparse.Namespace, argv: list[str]) -> None:
    setup_libraries(ns.quiet)
    commands.report_command(ns.run_dir)


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", help="comma-separated methods (default: all)")
    _split_argument(p)
    p.add_argument("--shared-lr", action="store_true", help="use train.learning_rate for every "
                   "method instead of each method's suggested rate")


def _compare(ns: argparse.Namespace, argv: list[str]) -> None:
    from peftune import compare

    methods = [m.strip() for m in (ns.methods or "").split(",") if m.strip()] or None
    compare.run(_config(ns), split=ns.split, shared_lr=ns.shared_lr, quiet=ns.quiet,
                methods=methods)


COMMANDS: dict[str, Command] = {
    "train": Command(
        "fine-tune a base model with a PEFT method and save the adapter",
        lambda ns, argv: commands.train_command(_config(ns)),
        keys=RUN_KEYS, method_help=True),
    "evaluate": Command(
        "generate summaries for a held-out split and score them with ROUGE", _evaluate,
        keys=("output_dir", "seed", "data.", "model.", "eval.", "train.precision"),
        arguments=_evaluate_arguments),
    "search": Command(
        "search methods and hyperparameters with Optuna, then retrain the best",
        lambda ns, argv: commands.search_command(_config(ns), argv=argv),
        keys=(*RUN_KEYS, "search."), method_help=True),
    "plan": Command(
        "memory per device, largest micro-batch and run time of a config, before running",
        lambda ns, argv: commands.plan_command(_config(ns)),
        keys=(*RUN_KEYS, "plan.", "search.n_trials", "search.train_examples"),
        method_help=True),
    "summarize": Command(
        "summarize text with a trained adapter", _summarize,
        description="summarize text with a trained adapter, with the run's prompt and "
        "decoding settings (flags override them)",
        keys=("model.", "eval.", "data.instruction", "data.max_source_tokens",
              "train.precision"),
        arguments=_summarize_arguments, own_arguments_first=True,
        positionals="ADAPTER [TEXT] "),
    "methods": Command(
        "list the PEFT methods and their default options",
        lambda ns, argv: commands.methods_command(), description=None),
    "export": Command(
        "export an adapter: as is, merged, as GGUF, as a GGUF LoRA or for Ollama", _export,
        description="export a trained adapter for serving: the PEFT adapter as is (with its "
        "vLLM line), merged into its base (safetensors), a LLaMA GGUF file, a llama.cpp GGUF "
        "LoRA beside a GGUF base, or a GGUF file with an Ollama Modelfile; then check it "
        "against peftune's texts",
        arguments=_export_arguments),
    "report": Command(
        "HTML report and plots of a search run", _report,
        arguments=lambda p: p.add_argument("run_dir", help="the search's output_dir")),
    "compare": Command(
        "train and score several methods on the same data, budget and seed; write a table",
        _compare, keys=RUN_KEYS, method_help=True, arguments=_compare_arguments),
}
"""Every subcommand, in the order ``peftune --help`` lists them."""


def main(argv: list[str] | None = None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    ns = parser(method=chosen_method(argv)).parse_args(argv)
    setup_logging(ns.quiet)
    try:
        COMMANDS[ns.command].run(ns, argv)
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
