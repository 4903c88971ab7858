"""P-tuning (Liu et al., 2021) through ``peft.PromptEncoderConfig``: virtual token embeddings
produced by a small MLP or LSTM prompt encoder and prepended to the input. Not mergeable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftune.methods import Method, ModelInfo, choice, register, task_type
from peftune.options import check_fields, option

if TYPE_CHECKING:
    from peft import PromptEncoderConfig

ENCODERS = ("MLP", "LSTM")


@dataclass
class PTuningOptions:
    num_virtual_tokens: int = option("virtual tokens prepended to the input", 16,
                                    within="[1, 65536]")
    encoder_reparameterization_type: str = option("prompt encoder: MLP or LSTM", "MLP")
    encoder_hidden_size: int = option("hidden size of the prompt encoder", 128,
                                     within="[1, 65536]")
    encoder_dropout: float = option("dropout in the prompt encoder", 0.0, within="[0, 1)")

    def __post_init__(self) -> None:
        check_fields(self, "ptuning")
        self.encoder_reparameterization_type = choice(
            self.encoder_reparameterization_type, ENCODERS,
            "ptuning.encoder_reparameterization_type")


def build(options: PTuningOptions, info: ModelInfo) -> PromptEncoderConfig:
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(
        task_type=task_type(info),
        num_virtual_tokens=options.num_virtual_tokens,
        encoder_reparameterization_type=options.encoder_reparameterization_type,
        encoder_hidden_size=options.encoder_hidden_size,
        encoder_dropout=options.encoder_dropout,
    )


def search_space(trial: Any) -> dict[str, Any]:
    return {
        "num_virtual_tokens": trial.suggest_categorical("ptuning.num_virtual_tokens",
                                                        [8, 16, 32]),
        "encoder_reparameterization_type": trial.suggest_categorical(
            "ptuning.encoder_reparameterization_type", list(ENCODERS)),
        "encoder_hidden_size": trial.suggest_categorical("ptuning.encoder_hidden_size",
                                                         [64, 128, 256]),
    }


def params_of(options: PTuningOptions) -> dict[str, Any]:
    return {"ptuning.num_virtual_tokens": options.num_virtual_tokens,
            "ptuning.encoder_reparameterization_type": options.encoder_reparameterization_type,
            "ptuning.encoder_hidden_size": options.encoder_hidden_size}


register(Method(name="ptuning", summary="P-tuning: virtual tokens from an MLP/LSTM prompt "
                "encoder", options=PTuningOptions, build=build, search_space=search_space,
                params_of=params_of,
                learning_rate=3e-3, mergeable=False))
