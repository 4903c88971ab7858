"""PEFT method registry: one module per method, each registering a :class:`Method`.

A method contributes everything method-specific (its options, the ``peft`` config it builds,
its search space, its training callbacks, how the base model must be loaded) so that
training, evaluation and search never branch on names.

Method modules import peft, torch and transformers inside the functions that use them: the
registry (``peftune methods``, ``--help``, config checks) loads in milliseconds, not seconds.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peftune.errors import ConfigError


@dataclass(frozen=True)
class ModelInfo:
    """What a method needs to know about the base model (and its prompt) to configure itself."""

    model_type: str
    is_encoder_decoder: bool
    linear_names: tuple[str, ...]
    num_layers: int
    hidden_size: int
    name_or_path: str = ""
    """Where the model and its tokenizer were loaded from."""
    instruction: str = ""
    """The instruction every prompt starts with (text-initialised prompts start from it)."""


def _no_callbacks(model: Any, options: Any) -> list[Any]:
    return []


def _no_load_kwargs(options: Any) -> dict[str, Any]:
    return {}


def _unchanged(model: Any, options: Any) -> Any:
    return model


def _plain_base(options: Any) -> tuple[Any, ...]:
    return ()


def _no_params(options: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    options: type
    build: Callable[[Any, ModelInfo], Any]
    """(options, model info) -> a ``peft.PeftConfig``."""
    search_space: Callable[[Any], dict[str, Any]]
    """An Optuna trial -> options for this method (keys of ``options``)."""
    params_of: Callable[[Any], dict[str, Any]] = field(default=_no_params)
    """options -> the trial parameters :attr:`search_space` turns into these options (its
    inverse: the search queues the configured options as its first trial)."""
    learning_rate: float = 2e-4
    """A learning rate that trains this method well (``peftune compare`` uses it)."""
    callbacks: Callable[[Any, Any], list[Any]] = field(default=_no_callbacks)
    """(peft model, options) -> extra ``transformers.TrainerCallback`` instances."""
    load_kwargs: Callable[[Any], dict[str, Any]] = field(default=_no_load_kwargs)
    """options -> extra ``from_pretrained`` arguments for the base model (quantization)."""
    prepare_base: Callable[[Any, Any], Any] = field(default=_unchanged)
    """(base model, options) -> the base model made ready for this method's adapter."""
    base_key: Callable[[Any], tuple[Any, ...]] = field(default=_plain_base)
    """options -> a key of the loaded (and prepared) base: trials whose keys are equal can
    share one base model; the plain base's key is ``()``."""
    mergeable: bool = True
    seq2seq: bool = True
    trains_inside_base_layers: bool = False
    """Its trainable parameters sit inside the base's layers (not in leaf modules of their
    own), so FSDP flattens them into one tensor with the frozen weights: one dtype for both."""
    refused_sharding: tuple[tuple[str, str], ...] = ()
    """(``devices.sharding()`` value, why) for each sharded launch the method cannot train
    under."""

    def check_sharding(self, sharding: str, *, model_dtype: str) -> None:
        """Refuse, before any model is loaded, a sharded launch this method cannot train
        under (``sharding`` as :func:`peftune.devices.sharding` names it)."""
        label = SHARDING_LABELS.get(sharding, sharding)
        for refused, why in self.refused_sharding:
            if refused == sharding:
                raise ConfigError(f"method '{self.name}' cannot train under {label}: {why}; "
                                  "launch with configs/accelerate/multi-gpu.yaml (DDP) instead")
        if sharding == "fsdp" and self.trains_inside_base_layers and \
                model_dtype not in ("auto", "float32"):
            raise ConfigError(f"method '{self.name}' under FSDP needs model.dtype auto or "
                              f"float32, not {model_dtype}: its fp32 parameters share FSDP "
                              "units with the base weights, which must have one dtype (FSDP's "
                              "mixed_precision still computes in 16 bits)")

    def check_mergeable(self, peft_config: Any) -> None:
        """The one mergeability rule (``export`` and ``merge`` use it): weight deltas fold
        into the base; virtual tokens and adapter attention cannot."""
        if not self.mergeable:
            raise ConfigError(f"method '{self.name}' cannot be merged into the base weights "
                              "(it adds virtual tokens or attention, not weight deltas); "
                              "use --format adapter")
        if peft_config.is_prompt_learning:
            raise ConfigError(f"{peft_config.peft_type.value} adapters cannot be merged: they "
                              "add learned virtual tokens to the input instead of changing "
                              "weights; use --format adapter")

    def merge(self, model: Any) -> Any:
        """The base model with the adapter folded into its weights."""
        self.check_mergeable(model.active_peft_config)
        return model.merge_and_unload()


SHARDING_LABELS = {"fsdp": "FSDP", "zero3": "DeepSpeed ZeRO-3", "deepspeed": "DeepSpeed"}

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    _REGISTRY[method.name] = method
    return method


def registry() -> dict[str, Method]:
    # import every method module, even when one was imported directly before (it registered
    # itself then, but not the others); imports after the first are dictionary look-ups
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> Method:
    methods = registry()
    if name not in methods:
        raise ConfigError(f"unknown method '{name}' (valid: {', '.join(methods)})")
    return methods[name]


def task_type(info: ModelInfo) -> Any:
    from peft import TaskType

    return TaskType.SEQ_2_SEQ_LM if info.is_encoder_decoder else TaskType.CAUSAL_LM


def choice(value: str, choices: tuple[str, ...], key: str) -> str:
    """``value`` upper-cased if it is one of ``choices``, else a ConfigError naming ``key``."""
    if value.upper() not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
    return value.upper()


__all__ = ["Method", "ModelInfo", "choice", "get_method", "register", "registry", "task_type"]
