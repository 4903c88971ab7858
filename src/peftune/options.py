"""Typed options with their help text and the values they accept, declared next to each field.

A leaf module: the run configuration (:mod:`peftune.config`) and every PEFT method's options
(:mod:`peftune.methods`) declare their fields with :func:`option` and check them with
:func:`check_fields`, so a range lives in one place, beside the field it bounds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peftune.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: an interval such as ``(0, inf)`` or ``[0, 1)``,
    plus any special values outside it (``-1`` for "use epochs", ``"auto"``). Floats must be
    finite."""

    low: float
    high: float
    low_open: bool
    high_open: bool
    also: tuple[float | str, ...] = ()

    @classmethod
    def parse(cls, text: str, also: tuple[float | str, ...] = ()) -> Range:
        low, high = (float(part) for part in text[1:-1].split(","))
        if text[0] not in "([" or text[-1] not in ")]" or low > high:
            raise ValueError(f"not an interval: {text!r}")
        return cls(low, high, text[0] == "(", text[-1] == ")", also)

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool):
            return False
        if value in self.also:
            return True
        if not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            text = f"{'>' if self.low_open else '>='} {_number(self.low)} and finite"
        else:
            text = (f"in {'(' if self.low_open else '['}{_number(self.low)}, "
                    f"{_number(self.high)}{')' if self.high_open else ']'}")
        return "".join(f"{_number(v)} or " for v in self.also) + text


def _number(value: float | str) -> str:
    if isinstance(value, str):
        return repr(value)
    return str(int(value)) if float(value).is_integer() else str(value)


def option(text: str, default: Any = dataclasses.MISSING, *, within: str | None = None,
          also: tuple[float | str, ...] = (),
          choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
          **kw: Any) -> Any:
    """A field with its ``--help`` text and, checked by :func:`check_fields`, the interval a
    number (or each number of a list) must lie ``within`` and the ``choices`` of a string."""
    metadata: dict[str, Any] = {"help": text}
    if within is not None:
        metadata["range"] = Range.parse(within, also)
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def check_fields(obj: Any, section: str) -> None:
    """Reject a value outside its field's declared range or choices, naming the key."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{section}.{f.name}" if section else f.name
        bounds = f.metadata.get("range")
        if bounds is not None:
            for item in value if isinstance(value, list) else [value]:
                if item is not None and item not in bounds:
                    raise ConfigError(f"{key} must be {bounds}, got {item!r}")
        choices = f.metadata.get("choices")
        if choices is not None and value is not None:
            valid = choices() if callable(choices) else choices
            if value not in valid:
                raise ConfigError(f"{key} must be one of {', '.join(valid)}; got {value!r}")


# Counts of steps, rows and examples stop where the Trainer's and torch's int32 sizes do;
# batch and token counts far below that, where a typo (1e20) would still look plausible.
MAX_COUNT = 2**31 - 1
MAX_BATCH = 2**20
MAX_TOKENS = 2**20
