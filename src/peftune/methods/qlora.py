"""LoRA on a quantized base through ``transformers.BitsAndBytesConfig`` and
``peft.prepare_model_for_kbit_training``: ``lora-int8`` (LLM.int8() base) and ``qlora``
(4-bit NF4 base, Dettmers et al., 2023). The adapter itself is plain LoRA.

bitsandbytes 0.50 has CPU kernels, so both train (slowly) without a GPU too. Merged into
quantized weights, the update would be rounded away: ``peftune export`` merges into the base
dequantized (or the full-precision one, ``--merge-base``; :mod:`peftune.merging`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from peftune.errors import ConfigError
from peftune.methods import Method, register
from peftune.methods.lora import LoraOptions
from peftune.methods.lora import build as build_lora
from peftune.methods.lora import params_of as lora_params_of
from peftune.methods.lora import search_space as lora_space
from peftune.options import option

if TYPE_CHECKING:
    pass


@dataclass
class KbitOptions(LoraOptions):
    SECTION: ClassVar[str] = "lora-int8"

    gradient_checkpointing: bool = option("recompute activations in the backward pass (the "
                                         "usual memory saving of k-bit training)", True)


@dataclass
class QLoraOptions(KbitOptions):
    SECTION: ClassVar[str] = "qlora"

    double_quant: bool = option("quantize the quantization constants too", True)


def _require_bitsandbytes(name: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"method '{name}' needs bitsandbytes: pip install "
                          "bitsandbytes==0.50.2")


def int8_load_kwargs(options: KbitOptions) -> dict[str, Any]:
    _require_bitsandbytes("lora-int8")
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}


def nf4_load_kwargs(options: QLoraOptions) -> dict[str, Any]:
    _require_bitsandbytes("qlora")
    import torch
    from transformers import BitsAndBytesConfig

    from peftune.devices import compute_dtype

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=options.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(), bnb_4bit_quant_storage=torch.uint8)}


def prepare_kbit_base(model: Any, options: KbitOptions) -> Any:
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=options.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})


def base_key_for(name: str) -> Any:
    def base_key(options: KbitOptions) -> tuple[Any, ...]:
        # what the quantized load and prepare_model_for_kbit_training depend on
        return (name, getattr(options, "double_quant", None), options.gradient_checkpointing)
    return base_key


def search_space_for(name: str) -> Any:
    def search_space(trial: Any) -> dict[str, Any]:
        return lora_space(_Prefixed(trial, name))
    return search_space


def params_of_for(name: str) -> Any:
    def params_of(options: KbitOptions) -> dict[str, Any]:
        return {key.replace("lora.", f"{name}.", 1): value
                for key, value in lora_params_of(options).items()}
    return params_of


class _Prefixed:
    """Renames LoRA's ``lora.*`` parameters to ``<name>.*`` so search spaces never collide."""

    def __init__(self, trial: Any, name: str) -> None:
        self.trial, self.name = trial, name

    def __getattr__(self, attr: str) -> Any:
        suggest = getattr(self.trial, attr)

        def renamed(param: str, *args: Any, **kwargs: Any) -> Any:
            return suggest(param.replace("lora.", f"{self.name}.", 1), *args, **kwargs)
        return renamed


# FSDP and ZeRO-3 flatten (or partition) each layer's parameters as one tensor of one dtype.
# Int8 weights cannot be flattened at all; 4-bit ones only packed in the compute dtype and
# with no upcast norms, which prepare_model_for_kbit_training leaves in fp32. Neither was
# tried on a GPU, so both are refused; DDP keeps a whole base on every GPU.
for _name, _options, _load, _summary, _why in (
        ("lora-int8", KbitOptions, int8_load_kwargs, "LoRA on an 8-bit (LLM.int8) base",
         "its int8 base weights cannot be flattened with the rest of a layer"),
        ("qlora", QLoraOptions, nf4_load_kwargs, "QLoRA: LoRA on a 4-bit NF4 base",
         "its 4-bit base weights cannot be flattened with the fp32 norms "
         "prepare_model_for_kbit_training leaves")):
    register(Method(name=_name, summary=_summary, options=_options, build=build_lora,
                    search_space=search_space_for(_name), params_of=params_of_for(_name),
                    learning_rate=1e-3,
                    load_kwargs=_load, prepare_base=prepare_kbit_base, base_key=base_key_for(_name),
                    refused_sharding=(("fsdp", _why), ("zero3", _why))))
