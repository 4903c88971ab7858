"""PEFT method registry: one module per method, each registering a :class:`Method`.

A method contributes everything method-specific (its options, the ``peft`` config it builds,
its search space, its training callbacks) so that training and search never branch on names.
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
    """What a method needs to know about the base model to configure itself."""

    model_type: str
    is_encoder_decoder: bool
    linear_names: tuple[str, ...]
    num_layers: int
    hidden_size: int


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    options: type
    build: Callable[[Any, ModelInfo], Any]
    """(options, model info) -> a ``peft.PeftConfig``."""
    search_space: Callable[[Any], dict[str, Any]]
    """An Optuna trial -> options for this method (keys of ``options``)."""
    callbacks: Callable[[Any, Any], list[Any]] = field(default=lambda model, options: [])
    """(peft model, options) -> extra ``transformers.TrainerCallback`` instances."""
    mergeable: bool = True
    seq2seq: bool = True


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    _REGISTRY[method.name] = method
    return method


def registry() -> dict[str, Method]:
    if not _REGISTRY:
        for mod in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{mod.name}")
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> Method:
    methods = registry()
    if name not in methods:
        raise ConfigError(f"unknown method '{name}' (valid: {', '.join(methods)})")
    return methods[name]


__all__ = ["Method", "ModelInfo", "get_method", "register", "registry"]
