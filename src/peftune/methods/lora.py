"""LoRA (Hu et al., 2021) through ``peft.LoraConfig``, with the rsLoRA and DoRA switches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from peftune.methods import Method, ModelInfo, register, task_type
from peftune.options import check_fields, option

if TYPE_CHECKING:
    from peft import LoraConfig

TARGET_PRESETS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj", "q", "k", "v", "o"),
    "all-linear": "all-linear",
}


@dataclass
class LoraOptions:
    SECTION: ClassVar[str] = "lora"

    r: int = option("rank of the update matrices", 8, within="[1, 65536]")
    alpha: int = option("scaling numerator: the update is scaled by alpha / r", 32,
                       within="[1, 1048576]")
    dropout: float = option("dropout on the LoRA input", 0.1, within="[0, 1)")
    target_modules: list[str] = option(
        "module names to adapt; empty: the architecture's default (q_proj,v_proj on LLaMA); "
        "'attention' or 'all-linear' for presets", [])
    use_rslora: bool = option("rank-stabilised scaling alpha / sqrt(r)", False)
    use_dora: bool = option("weight-decomposed LoRA (DoRA)", False)

    def __post_init__(self) -> None:
        check_fields(self, self.SECTION)


def target_modules(requested: list[str], info: ModelInfo, *, mapping: dict | None = None) -> Any:
    """Resolve user or preset target modules against the model's linear layer names."""
    if mapping is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    if not requested:
        default = mapping.get(info.model_type)
        return list(default) if default else "all-linear"
    if requested == ["all-linear"]:
        return "all-linear"
    if requested == ["attention"]:
        return [n for n in TARGET_PRESETS["attention"] if n in info.linear_names]
    return list(requested)


def build(options: LoraOptions, info: ModelInfo) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type(info),
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=target_modules(options.target_modules, info),
        use_rslora=options.use_rslora,
        use_dora=options.use_dora,
    )


def search_space(trial: Any) -> dict[str, Any]:
    r = trial.suggest_categorical("lora.r", [4, 8, 16, 32])
    return {
        "r": r,
        "alpha": r * trial.suggest_categorical("lora.alpha_over_r", [1, 2, 4]),
        "dropout": trial.suggest_float("lora.dropout", 0.0, 0.2),
        "target_modules": _targets(trial),
    }


def params_of(options: LoraOptions) -> dict[str, Any]:
    targets, ratio = options.target_modules, options.alpha / options.r
    return {"lora.r": options.r, "lora.alpha_over_r": int(ratio) if ratio.is_integer() else ratio,
            "lora.dropout": options.dropout,
            "lora.targets": "default" if not targets else targets[0] if len(targets) == 1
            else ",".join(targets)}


def _targets(trial: Any) -> list[str]:
    choice = trial.suggest_categorical("lora.targets", ["default", "attention", "all-linear"])
    return [] if choice == "default" else [choice]


register(Method(name="lora", summary="LoRA: low-rank updates of linear layers",
                options=LoraOptions, build=build, search_space=search_space, params_of=params_of,
                learning_rate=1e-3))
