"""Prompt tuning (Lester et al., 2021) through ``peft.PromptTuningConfig``: learned virtual
token embeddings prepended to the input, by default initialised from the embeddings of the
instruction's tokens. Not mergeable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftune.errors import ConfigError
from peftune.methods import Method, ModelInfo, choice, register, task_type
from peftune.options import check_fields, option

if TYPE_CHECKING:
    from peft import PromptTuningConfig

INITS = ("TEXT", "RANDOM")


@dataclass
class PromptOptions:
    num_virtual_tokens: int = option("virtual tokens prepended to the input", 16,
                                    within="[1, 65536]")
    prompt_tuning_init: str = option("TEXT: start from the embeddings of init_text's tokens "
                                    "(repeated to fill); RANDOM: random embeddings", "TEXT")
    init_text: str = option("text the TEXT init starts from; empty: data.instruction", "")

    def __post_init__(self) -> None:
        check_fields(self, "prompt")
        self.prompt_tuning_init = choice(self.prompt_tuning_init, INITS,
                                         "prompt.prompt_tuning_init")


def build(options: PromptOptions, info: ModelInfo) -> PromptTuningConfig:
    from peft import PromptTuningConfig

    if options.prompt_tuning_init == "RANDOM":
        return PromptTuningConfig(task_type=task_type(info),
                                  num_virtual_tokens=options.num_virtual_tokens,
                                  prompt_tuning_init="RANDOM")
    text = options.init_text or info.instruction
    if not text.strip() or not info.name_or_path:
        raise ConfigError("prompt.prompt_tuning_init TEXT needs prompt.init_text (or "
                          "data.instruction) and a model loaded from a path or hub id")
    return PromptTuningConfig(task_type=task_type(info),
                              num_virtual_tokens=options.num_virtual_tokens,
                              prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                              tokenizer_name_or_path=info.name_or_path)


def search_space(trial: Any) -> dict[str, Any]:
    return {
        "num_virtual_tokens": trial.suggest_categorical("prompt.num_virtual_tokens",
                                                        [8, 16, 32, 64]),
        "prompt_tuning_init": trial.suggest_categorical("prompt.prompt_tuning_init",
                                                        list(INITS)),
    }


def params_of(options: PromptOptions) -> dict[str, Any]:
    return {"prompt.num_virtual_tokens": options.num_virtual_tokens,
            "prompt.prompt_tuning_init": options.prompt_tuning_init}


register(Method(name="prompt", summary="Prompt tuning: learned virtual token embeddings",
                options=PromptOptions, build=build, search_space=search_space, params_of=params_of,
                learning_rate=3e-2, mergeable=False))
