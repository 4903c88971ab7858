"""Prefix tuning (Li & Liang, 2021) through ``peft.PrefixTuningConfig``: learned key/value
vectors prepended to every attention layer. Not mergeable.

Generation goes through the KV cache; :func:`peftune.generation.kv_cache_compat` makes peft's
prefix reach the cache of current transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftune.methods import Method, ModelInfo, register, task_type
from peftune.options import check_fields, option

if TYPE_CHECKING:
    from peft import PrefixTuningConfig


@dataclass
class PrefixOptions:
    num_virtual_tokens: int = option("length of the learned prefix in every layer", 16,
                                    within="[1, 65536]")
    prefix_projection: bool = option("reparameterise the prefix through a two-layer MLP "
                                    "(more stable, more parameters while training)", False)
    encoder_hidden_size: int = option("hidden size of that MLP", 256, within="[1, 65536]")

    def __post_init__(self) -> None:
        check_fields(self, "prefix")


def build(options: PrefixOptions, info: ModelInfo) -> PrefixTuningConfig:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type=task_type(info),
                              num_virtual_tokens=options.num_virtual_tokens,
                              prefix_projection=options.prefix_projection,
                              encoder_hidden_size=options.encoder_hidden_size)


def search_space(trial: Any) -> dict[str, Any]:
    return {
        "num_virtual_tokens": trial.suggest_categorical("prefix.num_virtual_tokens",
                                                        [8, 16, 32]),
        "prefix_projection": trial.suggest_categorical("prefix.prefix_projection",
                                                       [False, True]),
    }


def params_of(options: PrefixOptions) -> dict[str, Any]:
    return {"prefix.num_virtual_tokens": options.num_virtual_tokens,
            "prefix.prefix_projection": options.prefix_projection}


register(Method(name="prefix", summary="Prefix tuning: learned keys/values in every layer",
                options=PrefixOptions, build=build, search_space=search_space, params_of=params_of,
                learning_rate=1e-2, mergeable=False))
