"""AdaLoRA (Zhang et al., 2023) through ``peft.AdaLoraConfig``: LoRA whose rank budget is
pruned from ``init_r`` towards ``target_r`` per module while training.

The pruning only happens if ``update_and_allocate`` runs after every optimizer step, while
the gradients are still there; the Hugging Face Trainer never calls it, so
:class:`RankBudget` does, and sets ``total_step`` from the run's real number of steps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftune.errors import ConfigError
from peftune.methods import Method, ModelInfo, register, task_type
from peftune.methods.lora import target_modules
from peftune.options import MAX_COUNT, check_fields, option

if TYPE_CHECKING:
    from peft import AdaLoraConfig


@dataclass
class AdaLoraOptions:
    init_r: int = option("rank every module starts with", 12, within="[1, 65536]")
    target_r: int = option("average rank per module once the budget is spent", 4,
                          within="[1, 65536]")
    tinit: float = option("steps before pruning starts; below 1: a fraction of total_step", 0.1,
                         within=f"[0, {MAX_COUNT}]")
    tfinal: float = option("steps at the end with the final ranks fixed; below 1: a fraction "
                          "of total_step", 0.2, within=f"[0, {MAX_COUNT}]")
    deltaT: int = option("prune every deltaT optimizer steps", 1, within=f"[1, {MAX_COUNT}]")
    total_step: int | None = option("optimizer steps of the schedule (default: the run's real "
                                   "number of optimizer steps)", None,
                                   within=f"[1, {MAX_COUNT}]")
    alpha: int = option("scaling numerator of the update", 32, within="[1, 1048576]")
    dropout: float = option("dropout on the adapter input", 0.1, within="[0, 1)")
    beta1: float = option("EMA factor of the weight sensitivity", 0.85, within="[0, 1]")
    beta2: float = option("EMA factor of the sensitivity uncertainty", 0.85, within="[0, 1]")
    orth_reg_weight: float = option("weight of the orthogonality penalty on P and Q", 0.5,
                                   within="[0, inf)")
    target_modules: list[str] = option(
        "module names to adapt; empty: the architecture's default; 'attention' or "
        "'all-linear' for presets", [])

    def __post_init__(self) -> None:
        check_fields(self, "adalora")
        if self.target_r > self.init_r:
            raise ConfigError(f"adalora.target_r must be in [1, adalora.init_r={self.init_r}], "
                              f"got {self.target_r}")


def schedule(options: AdaLoraOptions, total_step: int) -> dict[str, int]:
    """``tinit``/``tfinal``/``total_step`` in steps, checked to leave a pruning phase."""
    def steps(value: float) -> int:
        return int(value * total_step) if value < 1 else int(value)

    tinit, tfinal = steps(options.tinit), steps(options.tfinal)
    if tinit >= total_step - tfinal:
        raise ConfigError(f"adalora.tinit ({tinit} steps) + adalora.tfinal ({tfinal} steps) "
                          f"leave no pruning phase in {total_step} steps; lower them or train "
                          "longer")
    return {"tinit": tinit, "tfinal": tfinal, "total_step": total_step}


def build(options: AdaLoraOptions, info: ModelInfo) -> AdaLoraConfig:
    from peft import AdaLoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING

    # Without an explicit total_step the schedule is a placeholder that RankBudget replaces
    # with the real one when training starts (peft insists on a valid one now).
    planned = schedule(options, options.total_step) if options.total_step else \
        {"tinit": 0, "tfinal": 0, "total_step": 1}
    return AdaLoraConfig(
        task_type=task_type(info),
        init_r=options.init_r,
        target_r=options.target_r,
        deltaT=options.deltaT,
        beta1=options.beta1,
        beta2=options.beta2,
        orth_reg_weight=options.orth_reg_weight,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=target_modules(options.target_modules, info,
                                      mapping=TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING),
        **planned,
    )


@functools.cache
def _rank_budget() -> type:
    # defined on first use: subclassing TrainerCallback imports torch, and listing the
    # methods or checking a config must not
    from transformers import TrainerCallback

    class RankBudget(TrainerCallback):
        """Runs AdaLoRA's budget schedule inside the Hugging Face Trainer."""

        def __init__(self, model: Any, options: AdaLoraOptions) -> None:
            self.model = model
            self.options = options

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.options.total_step is None:
                config = self.model.peft_config[self.model.active_adapter]
                for key, value in schedule(self.options, state.max_steps).items():
                    setattr(config, key, value)

        def on_optimizer_step(self, args: Any, state: Any, control: Any,
                              **kwargs: Any) -> None:
            # after optimizer.step(), before zero_grad(): the sensitivities need the
            # gradients; global_step is incremented after this hook, so +1 counts the step
            # just taken
            self.model.base_model.update_and_allocate(state.global_step + 1)

    return RankBudget


def __getattr__(name: str) -> Any:
    if name == "RankBudget":
        return _rank_budget()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def callbacks(model: Any, options: AdaLoraOptions) -> list[Any]:
    return [_rank_budget()(model, options)]


def search_space(trial: Any) -> dict[str, Any]:
    init_r = trial.suggest_categorical("adalora.init_r", [8, 12, 16])
    return {
        "init_r": init_r,
        "target_r": init_r // trial.suggest_categorical("adalora.shrink", [2, 3, 4]),
        "tinit": trial.suggest_float("adalora.tinit", 0.0, 0.3),
        "tfinal": trial.suggest_float("adalora.tfinal", 0.0, 0.3),
        "dropout": trial.suggest_float("adalora.dropout", 0.0, 0.2),
    }


def params_of(options: AdaLoraOptions) -> dict[str, Any]:
    shrink = options.init_r / options.target_r
    return {"adalora.init_r": options.init_r,
            "adalora.shrink": int(shrink) if shrink.is_integer() else shrink,
            "adalora.tinit": options.tinit, "adalora.tfinal": options.tfinal,
            "adalora.dropout": options.dropout}


register(Method(name="adalora", summary="LoRA with a rank budget pruned during training",
                options=AdaLoraOptions, build=build, search_space=search_space,
                params_of=params_of, learning_rate=1e-3, callbacks=callbacks,
                trains_inside_base_layers=True,
                # its rank allocator reads and masks every lora_E in place each step, which
                # ZeRO-3's partitioned (empty) parameters do not allow; not tried on GPUs
                refused_sharding=(("zero3", "its rank allocator edits every layer's "
                                   "parameters in place, which ZeRO-3 partitions away"),)))
