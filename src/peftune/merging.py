"""What an adapter trained on a quantized base (``qlora``, ``lora-int8``) is merged into.

``dequantized``: the base quantized exactly as training loaded it, dequantized to the export's
dtype, so the merged weights are the weights the adapter was trained and evaluated against
(plus its update). ``original``: the full-precision base checkpoint, which the adapter never
saw: each weight then differs by its quantization error. ``auto`` (the CLI's default) is
``dequantized`` for methods that quantize the base (measured in BENCHMARKS.md) and the
only base there is for the others; ``dequantized`` for a method that does not quantize is
refused. A leaf: the CLI reads :class:`MergeOptions` without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftune.errors import PeftuneError
from peftune.options import check_fields, option

MERGE_BASES = ("auto", "dequantized", "original")


@dataclass
class MergeOptions:
    SECTION: ClassVar[str] = "merge"

    base: str = option("what a qlora or lora-int8 adapter is merged into: dequantized (the "
                       "quantized base it trained on, dequantized to --dtype) or original "
                       "(the full-precision checkpoint); auto: dequantized for methods that "
                       "quantize the base, else the one base there is", "auto",
                       choices=MERGE_BASES)

    def __post_init__(self) -> None:
        check_fields(self, self.SECTION)


def resolve(options: MergeOptions, *, method: str, quantizes: bool) -> str | None:
    """The merge base for an adapter of ``method``: ``dequantized`` or ``original`` where the
    method quantizes the base, None (nothing to choose) where it does not."""
    if not quantizes:
        if options.base == "dequantized":
            raise PeftuneError(f"--merge-base dequantized applies to methods that quantize "
                               f"the base (qlora, lora-int8); '{method}' trained on the "
                               "full-precision base: leave --merge-base at auto")
        return None
    return "dequantized" if options.base == "auto" else options.base


__all__ = ["MERGE_BASES", "MergeOptions", "resolve"]
