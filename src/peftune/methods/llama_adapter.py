"""LLaMA-Adapter (Zhang et al., 2023) through ``peft.AdaptionPromptConfig``: learned prompts
with zero-initialised gates in the top attention layers. LLaMA-family decoders only; not
mergeable. The zero gates make the first steps slow by design."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftune.errors import ConfigError
from peftune.methods import Method, ModelInfo, register
from peftune.options import check_fields, option

if TYPE_CHECKING:
    from peft import AdaptionPromptConfig

# peft's adaption prompt patches LLaMA-style attention (k/v/o projections, rotary queries)
LLAMA_FAMILY = ("llama", "mistral")


@dataclass
class LlamaAdapterOptions:
    adapter_len: int = option("adaption prompt length per layer", 10, within="[1, 65536]")
    adapter_layers: int | None = option("top layers that get an adaption prompt (default: all)",
                                       None, within="[1, 65536]")

    def __post_init__(self) -> None:
        check_fields(self, "llama-adapter")


def build(options: LlamaAdapterOptions, info: ModelInfo) -> AdaptionPromptConfig:
    from peft import AdaptionPromptConfig

    if info.model_type not in LLAMA_FAMILY:
        raise ConfigError(f"method 'llama-adapter' needs a LLaMA-family model "
                          f"({', '.join(LLAMA_FAMILY)}); '{info.name_or_path or 'the model'}' "
                          f"is '{info.model_type}': pick another --method")
    layers = options.adapter_layers or info.num_layers
    if not 0 < layers <= info.num_layers:
        raise ConfigError(f"llama-adapter.adapter_layers must be in [1, {info.num_layers}] for "
                          f"this model, got {layers}")
    return AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=options.adapter_len,
                                adapter_layers=layers)


def search_space(trial: Any) -> dict[str, Any]:
    return {"adapter_len": trial.suggest_categorical("llama-adapter.adapter_len", [5, 10, 20])}


def params_of(options: LlamaAdapterOptions) -> dict[str, Any]:
    return {"llama-adapter.adapter_len": options.adapter_len}


register(Method(name="llama-adapter", summary="LLaMA-Adapter: gated adaption prompts in the "
                "top layers (LLaMA family)", options=LlamaAdapterOptions, build=build,
                search_space=search_space, params_of=params_of, learning_rate=9e-3,
                mergeable=False, seq2seq=False,
                trains_inside_base_layers=True))
