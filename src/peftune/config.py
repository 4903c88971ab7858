"""Typed run configuration: one set of dataclasses that is both the YAML file and the CLI flags.

A YAML key ``train.learning_rate`` is the flag ``--train.learning_rate``; a method's options
live under its own name (``lora.r`` / ``--lora.r``) and ``method`` picks which one is used.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftune.atomic import atomic_write
from peftune.errors import ConfigError
from peftune.methods import get_method, registry
from peftune.options import MAX_BATCH, MAX_COUNT, MAX_TOKENS, check_fields
from peftune.options import option as _help


def _lr_schedulers() -> tuple[str, ...]:
    from transformers import SchedulerType  # the Trainer's own list; loaded only when checked

    return tuple(s.value for s in SchedulerType)


@dataclass
class DataConfig:
    source: str = _help("'aclsum' (embedded), a local .jsonl/.csv/.parquet file or folder, "
                        "or a Hugging Face hub dataset name", "aclsum")
    subset: str | None = _help("hub dataset configuration name", None)
    document_column: str = _help("column holding the text to summarize", "document")
    summary_column: str = _help("column holding the reference summary", "summary")
    id_column: str | None = _help("column with a document id (unset: the 'id' column if "
                                  "there is one, else the row number)", None)
    train_split: str = _help("split used for training", "train")
    validation_split: str = _help("split used for eval loss and search", "validation")
    test_split: str = _help("held-out split scored once by `evaluate`", "test")
    max_source_tokens: int = _help("documents are truncated to this many tokens", 512,
                                   within=f"[1, {MAX_TOKENS}]")
    max_train_examples: int | None = _help("use at most this many training rows", None,
                                           within=f"[1, {MAX_COUNT}]")
    max_eval_examples: int | None = _help("use at most this many validation/test rows", None,
                                          within=f"[1, {MAX_COUNT}]")
    instruction: str = _help("instruction placed before the document in the prompt",
                             "Summarize the following text.")

    def __post_init__(self) -> None:
        check_fields(self, "data")


@dataclass
class ModelConfig:
    name: str = _help("'smollm2-135m' (embedded GGUF), a hub id, a local folder or a .gguf "
                      "file", "smollm2-135m")
    gguf_file: str | None = _help("GGUF file name inside `name` when it is a folder/hub id", None)
    revision: str | None = _help("hub revision (branch, tag or commit)", None)
    dtype: str = _help("weights dtype: auto, float32, bfloat16 or float16", "auto",
                       choices=("auto", "float32", "bfloat16", "float16"))
    trust_remote_code: bool = _help("allow model code from the hub (only if you trust it)",
                                    False)

    def __post_init__(self) -> None:
        check_fields(self, "model")


SIGNALS = ("rouge", "loss")


@dataclass
class TrainConfig:
    learning_rate: float | None = _help("peak learning rate (unset: the method's suggested "
                                        "rate, see `peftune methods`)", None,
                                        within="(0, inf)")
    batch_size: int = _help("effective batch size (examples per optimizer step)", 8,
                            within=f"[1, {MAX_BATCH}]")
    micro_batch_size: int | str = _help(
        "examples per forward pass; the rest is gradient accumulation. auto: as many rows as "
        "make about a device's worth of tokens (`peftune plan` shows the choice)", "auto",
        within=f"[1, {MAX_BATCH}]", also=("auto",))
    epochs: float = _help("training epochs", 2.0, within="(0, 100000]")
    max_steps: int = _help("stop after this many optimizer steps (-1: use epochs)", -1,
                           within=f"[1, {MAX_COUNT}]", also=(-1,))
    warmup_ratio: float = _help("fraction of steps with linear warmup", 0.05, within="[0, 1)")
    weight_decay: float = _help("AdamW weight decay", 0.01, within="[0, inf)")
    lr_scheduler: str = _help("transformers scheduler name", "cosine", choices=_lr_schedulers)
    max_grad_norm: float = _help("gradient clipping norm (0: no clipping)", 1.0,
                                 within="[0, inf)")
    precision: str = _help("auto (bf16 where the hardware has it), bf16, fp16 or fp32", "auto",
                           choices=("auto", "bf16", "fp16", "fp32"))
    summary_loss: bool = _help("compute the LM head only at summary positions (same loss, "
                               "less work)", True)
    group_by_length: bool = _help("batch examples of similar length (less padding)", True)
    eval_each_epoch: bool = _help("compute validation loss after every epoch", True)
    eval_steps: int | None = _help("compute validation loss every N steps instead", None,
                                   within=f"[1, {MAX_COUNT}]")
    early_stopping: int = _help("stop after this many evaluations in a row without a better "
                                "train.early_stopping_signal (0: never)", 0,
                                within=f"[0, {MAX_COUNT}]")
    early_stopping_signal: str = _help(
        "what early stopping watches: rouge (ROUGE-L of summaries generated for the first "
        "train.signal_examples validation rows) or loss (validation loss, cheaper)", "rouge",
        choices=SIGNALS)
    signal_examples: int = _help("validation rows generated and scored at each evaluation "
                                 "for a rouge signal", 8, within=f"[1, {MAX_COUNT}]")
    save_checkpoints: bool = _help("write resumable checkpoints during training", True)
    save_total_limit: int = _help("checkpoints kept on disk", 2, within=f"[1, {MAX_COUNT}]")
    save_steps: int | None = _help("checkpoint every N steps (default: every epoch)", None,
                                   within=f"[1, {MAX_COUNT}]")
    resume: bool = _help("resume from the last checkpoint in output_dir if there is one", True)
    logging_steps: int = _help("log the loss every N steps", 5, within=f"[1, {MAX_COUNT}]")
    report_to: list[str] = _help("trackers for the Trainer (tensorboard, mlflow, ...)", [])
    run_name: str | None = _help("run name shown in the trackers (default: the output_dir name)",
                                 None)
    gradient_checkpointing: bool | str = _help(
        "recompute activations in the backward pass: true, false, or auto (on when "
        "`peftune plan` says the micro-batch does not fit the device otherwise)", "auto")

    def __post_init__(self) -> None:
        check_fields(self, "train")
        if self.micro_batch_size != "auto" and self.batch_size % self.micro_batch_size:
            raise ConfigError(f"train.batch_size ({self.batch_size}) must be a multiple of "
                              f"train.micro_batch_size ({self.micro_batch_size})")
        if isinstance(self.gradient_checkpointing, str) and \
                self.gradient_checkpointing.lower() in ("true", "false"):
            self.gradient_checkpointing = self.gradient_checkpointing.lower() == "true"
        if self.gradient_checkpointing not in (True, False, "auto"):
            raise ConfigError("train.gradient_checkpointing must be true, false or auto; got "
                              f"{self.gradient_checkpointing!r}")
        if self.early_stopping and not (self.eval_each_epoch or self.eval_steps):
            raise ConfigError("train.early_stopping needs evaluations: set train.eval_steps or "
                              "train.eval_each_epoch true")


@dataclass
class EvalConfig:
    max_new_tokens: int = _help("generation length bound", 128, within=f"[1, {MAX_TOKENS}]")
    num_beams: int = _help("1 is greedy; more is beam search", 1, within="[1, 1024]")
    batch_size: int = _help("prompts per generation batch", 16, within=f"[1, {MAX_BATCH}]")
    # Off by default: transformers applies both rules over the prompt too, and on ACLSum
    # validation either one cost the embedded model ROUGE-L (BENCHMARKS.md, decoding).
    no_repeat_ngram_size: int = _help("never repeat an n-gram of this size, the prompt's "
                                      "included (0: off)", 0, within=f"[0, {MAX_TOKENS}]")
    repetition_penalty: float = _help("penalty for tokens already in the prompt or output "
                                      "(1.0: off)", 1.0, within="(0, inf)")
    # peftune's own rule: generation_config.json cannot hold it (the model card says so)
    generated_no_repeat_ngram_size: int = _help("never repeat an output n-gram (0: off)", 0,
                                                within=f"[0, {MAX_TOKENS}]")
    zero_shot: bool = _help("`evaluate` also scores the base model without the adapter", False)

    def __post_init__(self) -> None:
        check_fields(self, "eval")


@dataclass
class SpaceConfig:
    """Training hyperparameters searched for every method (each method adds its own)."""

    learning_rate: list[float] = _help("log-uniform range [low, high]", [1e-5, 1e-3],
                                       within="(0, inf)")
    batch_size: list[int] = _help("effective batch sizes to choose from", [4, 8, 16, 32],
                                  within=f"[1, {MAX_BATCH}]")
    epochs: list[float] = _help("epoch counts to choose from", [1.0, 2.0], within="(0, 100000]")
    warmup_ratio: list[float] = _help("uniform range [low, high]", [0.0, 0.1], within="[0, 1)")
    weight_decay: list[float] = _help("uniform range [low, high]", [0.0, 0.1],
                                      within="[0, inf)")

    def __post_init__(self) -> None:
        check_fields(self, "search.space")
        for name in ("learning_rate", "warmup_ratio", "weight_decay"):
            values = getattr(self, name)
            if len(values) != 2 or values[0] > values[1]:
                raise ConfigError(f"search.space.{name} must be [low, high], got {values}")
        for name in ("batch_size", "epochs"):
            if not getattr(self, name):
                raise ConfigError(f"search.space.{name} must be a non-empty list of values > 0")


MEMORY_UNITS = {"": 2**30, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
                "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str, key: str = "plan.device_memory") -> int:
    """Bytes in ``24GiB``, ``24GB`` (10^9), ``24G`` or ``24`` (GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in MEMORY_UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{key} must be auto or a size like 24GiB, 40GB or 80G; got {text!r}")
    return int(float(match.group(1)) * MEMORY_UNITS[match.group(2).lower()])


@dataclass
class PlanConfig:
    """`peftune plan`: memory and time of a run, from the config and tokenizer alone."""

    device_memory: str = _help("memory of one device, e.g. 24GiB or 80GB (auto: this "
                               "machine's GPU, or its RAM without one)", "auto")
    measure: bool = _help("also time a few real training steps (loads the model) and project "
                          "the time of a run, a trial and the whole search", False)
    measure_steps: int = _help("timed optimizer steps for plan.measure (after one warm-up "
                               "step)", 3, within="[1, 100]")
    use_data: bool = _help("measure token lengths on the prepared training data (false: "
                           "assume data.max_source_tokens + eval.max_new_tokens)", True)

    def __post_init__(self) -> None:
        check_fields(self, "plan")
        if self.device_memory != "auto":
            parse_memory(self.device_memory)


METRICS = ("rougeL", "rouge1", "rouge2", "rougeLsum", "eval_loss")


@dataclass
class SearchConfig:
    n_trials: int = _help("total trials in the study (a rerun tops it up to this)", 20,
                          within=f"[1, {MAX_COUNT}]")
    methods: list[str] = _help("methods to choose from (a categorical parameter)", ["lora"])
    metric: str = _help("objective on the validation split: rougeL, rouge1, rouge2, "
                        "rougeLsum or eval_loss", "rougeL", choices=METRICS)
    second_objective: str | None = _help("multi-objective: also minimize 'trainable_params' "
                                         "or 'train_time' (Pareto front)", None,
                                         choices=("trainable_params", "train_time"))
    storage: str | None = _help("Optuna storage URL (default: sqlite in output_dir); "
                                "'journal' for a journal file", None)
    study_name: str | None = _help("study name (default: the output_dir name)", None)
    sampler: str = _help("tpe (multivariate, seeded) or random", "tpe",
                         choices=("tpe", "random"))
    pruner: str = _help("hyperband, median or none", "hyperband",
                        choices=("hyperband", "median", "none"))
    eval_examples: int = _help("validation rows scored with ROUGE per trial", 16,
                               within=f"[1, {MAX_COUNT}]")
    prune_signal: str = _help(
        "the pruner's intermediate value: rouge (search.metric of summaries generated for the "
        "first search.signal_examples validation rows) or loss (validation loss, cheaper); an "
        "eval_loss study always prunes on loss", "rouge", choices=SIGNALS)
    signal_examples: int = _help("validation rows generated and scored at each rung for the "
                                 "rouge signal", 8, within=f"[1, {MAX_COUNT}]")
    intermediate_steps: int = _help("report the prune_signal to the pruner every N steps", 4,
                                    within=f"[1, {MAX_COUNT}]")
    workers: int = _help("local worker processes sharing the study", 1, within="[1, 1024]")
    heartbeat_seconds: int = _help("trial heartbeat; a trial silent for 4x this long is "
                                   "failed and retried", 10, within="[1, 86400]")
    train_examples: int | None = _help("training rows per trial (a cheaper fidelity; the "
                                       "final model uses all)", None,
                                       within=f"[1, {MAX_COUNT}]")
    start_from_default: bool = _help("first trial: the configuration as set", True)
    rescore_examples: int = _help(
        "tied top trials also score this many more validation rows (0: off)", 0,
        within=f"[0, {MAX_COUNT}]")
    keep_adapters: bool = _help("trials on all train rows keep adapters", True)
    tune_method_options: bool = _help("also search each method's own options (rank, alpha, "
                                      "dropout, targets, ...); false keeps the configured ones",
                                      True)
    final: bool = _help("retrain the best configuration and score it on the test split", True)
    baselines: bool = _help("also score zero-shot and the default configuration on the test "
                            "split, trained like the final model", False)
    final_on: str = _help("data for the final model: train or train+validation", "train",
                          choices=("train", "train+validation"))
    space: SpaceConfig = field(default_factory=SpaceConfig)

    def __post_init__(self) -> None:
        check_fields(self, "search")
        if not self.methods:
            raise ConfigError("search.methods must name at least one method")
        for name in self.methods:
            get_method(name)


@dataclass
class Config:
    output_dir: str = _help("run directory: config, adapter, metrics, checkpoints", "runs/default")
    seed: int = _help("seed for data order, initialisation and sampling", 42,
                      within=f"[0, {2**32 - 1}]")
    method: str = _help("PEFT method (see `peftune methods`)", "lora")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    methods: dict[str, Any] = field(default_factory=dict)
    """Options of every PEFT method, by method name (YAML: a top-level key per method)."""

    def __post_init__(self) -> None:
        check_fields(self, "")
        _check_output_dir(self.output_dir)
        method = get_method(self.method)
        if self.train.learning_rate is None:  # written out, so config.yaml says what ran
            self.train = dataclasses.replace(
                self.train, learning_rate=method.learning_rate)
        for name, method in registry().items():
            if not isinstance(self.methods.get(name), method.options):
                self.methods[name] = from_dict(method.options, self.methods.get(name) or {}, name)

    @property
    def method_options(self) -> Any:
        return self.methods[self.method]

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name != "methods"}
        out.update({name: _plain(opts) for name, opts in self.methods.items()})
        return out


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _check_output_dir(output_dir: str) -> None:
    path = Path(output_dir).expanduser()
    try:
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
    except OSError as err:  # a name too long for the file system
        raise ConfigError(f"output_dir {output_dir[:80]!r}... is not a usable path "
                          f"({err.strerror})") from None
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"output_dir {output_dir}: {existing} is a file, not a folder; "
                          "choose another output_dir")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; strings from the CLI are parsed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        last: ConfigError | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as err:
                last = err
        raise last or ConfigError(f"{key}: invalid value {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(v, item, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            number = tp(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{key} must be {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(number, float) and not number.is_integer():
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if not isinstance(number, (int, float)):
            raise ConfigError(f"{key} must be {tp.__name__}, got {value!r}")
        try:
            return tp(number)
        except OverflowError:  # an integer too large for a float
            raise ConfigError(f"{key} is out of range, got a {len(str(number))}-digit "
                              "number") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (YAML) mapping, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{path}' (valid: {valid})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, path)
        else:
            kwargs[key] = coerce(value, tp, path)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{prefix or 'config'}: {err}") from None


def config_from_dict(data: dict[str, Any]) -> Config:
    data = dict(data or {})
    methods = {name: data.pop(name) for name in list(data) if name in registry()}
    for name, opts in methods.items():
        methods[name] = from_dict(registry()[name].options, opts or {}, name)
    cfg = from_dict(Config, data)
    cfg.methods.update(methods)
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        problem = getattr(err, "problem", err)
        raise ConfigError(f"invalid YAML in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys")
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Apply a flag override ``a.b=value`` to a nested mapping."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{key}': '{part}' is not a section")
    node[leaf] = value


def save_yaml(cfg: Config, path: str | Path) -> None:
    atomic_write(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def option_fields() -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every settable key with its type and dataclass field (whose metadata holds its help
    text, range and choices)."""
    out: dict[str, tuple[Any, dataclasses.Field]] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if cls is Config and f.name == "methods":  # method options: walked below
                continue
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], key + ".")
            else:
                out[key] = (hints[f.name], f)

    walk(Config, "")
    for name, method in registry().items():
        walk(method.options, name + ".")
    return out


def flag_specs() -> list[tuple[str, Any, str, Any]]:
    """Every settable key as (dotted key, type, help, default): the CLI builds its flags here."""
    specs: list[tuple[str, Any, str, Any]] = []
    for key, (tp, f) in option_fields().items():
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        specs.append((key, tp, f.metadata.get("help", ""), default))
    return specs
