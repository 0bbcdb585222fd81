"""Input checks shared by the pure modules (allocation, estimates) and the config: one definition of each rule.

:class:`Bounds` is an admissible range of a real parameter. The allocation functions check their arguments against
it, and the config checks its `gvm_*` fields against the same object, so a range is written once
(`gvm_trl.allocation` holds the ranges of the paper's parameters). The ``as_*`` functions turn what a caller passed
(lists, tuples, numpy arrays, torch tensors, numpy/torch scalars) into plain Python numbers, refusing bools, strings
and NaN by the argument's name.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = [
    "Bounds",
    "as_count",
    "as_float_list",
    "as_nonnegative",
    "as_rates",
    "as_real",
    "check_same_length",
    "is_bool",
]


@dataclass(frozen=True)
class Bounds:
    """An interval of admissible real values: ``low``/``high`` (None: unbounded on that side), each closed unless
    ``low_open``/``high_open``; ``finite`` refuses ±inf whatever the bounds."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    finite: bool = True

    def __contains__(self, value: float) -> bool:
        if math.isnan(value) or (self.finite and not math.isfinite(value)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """E.g. "> 0", "≥ 2", "in (0, 1]", with "finite and" where infinities are refused but not excluded by the
        bounds."""
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '≥'} {self.low:g}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '≤'} {self.high:g}"
        else:
            return "a finite real number" if self.finite else "a real number"
        unbounded = self.low is None or self.high is None
        return f"finite and {text}" if self.finite and unbounded else text

    def check(self, value: Any, name: str) -> float:
        """`value` as a float, or a ValueError naming `name` and the range."""
        number = as_real(value, name)
        if number not in self:
            raise ValueError(f"{name} must be {self.describe()}, got {number}")
        return number


def is_bool(value: Any) -> bool:
    """A Python, numpy or torch boolean (which `numbers.Real` and `operator.index` would otherwise accept)."""
    return isinstance(value, bool) or type(value).__name__ in ("bool", "bool_") or (
        "bool" in str(getattr(value, "dtype", ""))
    )


def as_real(value: Any, name: str) -> float:
    """A real number (int, float, numpy/torch scalar) as a float; never bool, str or NaN."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if is_bool(value):
        raise ValueError(f"{name} must be a real number, got bool {value!r}")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if math.isnan(result):
        raise ValueError(f"{name} must not be NaN")
    return result


def as_count(value: Any, name: str) -> int:
    """A non-negative integer: int, numpy/torch integer, or an integral float such as 8.0; never bool."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if is_bool(value):
        raise ValueError(f"{name} must be a non-negative integer, got bool {value!r}")
    try:
        count = operator.index(value)
    except TypeError:
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}") from None
        if not (math.isfinite(as_float) and as_float.is_integer()):
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        count = int(as_float)
    if count < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {count}")
    return count


def as_float_list(values: Iterable[float], name: str) -> list[float]:
    """A 1-D sequence of real numbers as a list of floats."""
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name} must be a 1-D sequence of real numbers, got {type(values).__name__}")
    if hasattr(values, "tolist"):
        values = values.tolist()
    try:
        items = list(values)
    except TypeError:
        raise ValueError(f"{name} must be a 1-D sequence of real numbers, got {type(values).__name__}") from None
    out = []
    for index, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, numbers.Real):
            raise ValueError(f"{name}[{index}] must be a real number, got {item!r}")
        out.append(float(item))
    return out


def as_rates(values: Iterable[float], name: str) -> list[float]:
    """Probabilities: every value in [0, 1]."""
    rates = as_float_list(values, name)
    for index, p in enumerate(rates):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name}[{index}] must lie in [0, 1], got {p}")
    return rates


def as_nonnegative(values: Iterable[float], name: str) -> list[float]:
    """Finite, non-negative values."""
    numbers_ = as_float_list(values, name)
    for index, x in enumerate(numbers_):
        if not (math.isfinite(x) and x >= 0.0):
            raise ValueError(f"{name}[{index}] must be finite and >= 0, got {x}")
    return numbers_


def check_same_length(**sequences: list[float]) -> None:
    lengths = {name: len(seq) for name, seq in sequences.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name} has {length}" for name, length in lengths.items())
        raise ValueError(f"lengths differ: {described}")
