"""(IA)^3 (Liu et al., 2022) through ``peft.IA3Config``: learned vectors that rescale the
keys, values and feed-forward activations. The fewest trainable parameters of any method here;
mergeable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftune.errors import ConfigError
from peftune.methods import Method, ModelInfo, register, task_type
from peftune.options import option

if TYPE_CHECKING:
    from peft import IA3Config


@dataclass
class IA3Options:
    target_modules: list[str] = option("modules whose output (or, for feed-forward modules, "
                                      "input) is rescaled; empty: the architecture's default "
                                      "(k_proj,v_proj,down_proj on LLaMA)", [])
    feedforward_modules: list[str] = option("the target modules that are feed-forward layers "
                                           "(a subset of target_modules); empty: the "
                                           "architecture's default (down_proj on LLaMA)", [])


def modules(options: IA3Options, info: ModelInfo) -> tuple[list[str], list[str]]:
    """(target, feed-forward) module names: the options, else peft's defaults for the model."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD_DEFAULTS,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGET_DEFAULTS,
    )

    targets = options.target_modules or list(TARGET_DEFAULTS.get(info.model_type, []))
    feedforward = options.feedforward_modules or (
        [] if options.target_modules else list(FEEDFORWARD_DEFAULTS.get(info.model_type, [])))
    if not targets:
        raise ConfigError(f"no (IA)^3 default for model type '{info.model_type}'; set "
                          "ia3.target_modules and ia3.feedforward_modules (linear layers: "
                          f"{', '.join(info.linear_names)})")
    extra = sorted(set(feedforward) - set(targets))
    if extra:
        raise ConfigError(f"ia3.feedforward_modules must be a subset of ia3.target_modules; "
                          f"{', '.join(extra)} is not a target")
    return targets, feedforward


def build(options: IA3Options, info: ModelInfo) -> IA3Config:
    from peft import IA3Config

    targets, feedforward = modules(options, info)
    return IA3Config(task_type=task_type(info), target_modules=targets,
                     feedforward_modules=feedforward)


def search_space(trial: Any) -> dict[str, Any]:
    # (IA)^3 has no size option and its modules are architecture specific; the learning
    # rate, which the search tunes for every method, is what matters
    return {}


register(Method(name="ia3", summary="(IA)^3: learned rescaling of keys, values and "
                "feed-forward activations", options=IA3Options, build=build,
                search_space=search_space, learning_rate=5e-3, trains_inside_base_layers=True))
