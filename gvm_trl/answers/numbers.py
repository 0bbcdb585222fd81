r"""Numbers without SymPy: exact rationals plus the resolution of the decimal they were written as.

Shared by the in-process comparison and the SymPy worker (``symbolic.py``), so this module imports only the
standard library.
"""
from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["Number", "numbers_close", "parse_number"]

_SPACES = re.compile(r"\s+")
_INT = r"[-+]?\d+"
_DEC = r"[-+]?(?:\d+\.\d*|\.\d+)"
_NUM = rf"(?:{_DEC}|{_INT})"


class Number:
    """An exact rational value plus the resolution of the decimal it was written as (None: exact)."""

    __slots__ = ("value", "ulp")

    def __init__(self, value: Fraction, ulp: Fraction | None):
        self.value, self.ulp = value, ulp


def _decimal(text: str) -> Number:
    """A plain integer or decimal literal."""
    if "." in text:
        places = len(text.split(".", 1)[1])
        return Number(Fraction(text), Fraction(1, 10**places))
    return Number(Fraction(int(text)), None)


_NUM_RE = re.compile(_NUM)
_SCI_RE = re.compile(rf"({_NUM})(?:[eE]|\*10\^|\\times10\^|\\cdot10\^)\{{?([-+]?\d{{1,3}})\}}?")
_FRAC_RE = re.compile(rf"([-+]?)(\d+)?\\frac\{{({_NUM})\}}\{{({_NUM})\}}")
_SLASH_RE = re.compile(rf"([-+]?)()({_NUM})/({_NUM})")
_MIXED_RE = re.compile(r"\s*([-+]?)(\d+)\s+(\d+)\s*/\s*(\d+)\s*")


def parse_number(s: str) -> Number | None:
    r"""Read integers, decimals, a/b, ``\frac{a}{b}``, mixed numbers and scientific notation."""
    if len(s) > 120:
        return None
    mixed = _MIXED_RE.fullmatch(s)
    if mixed:
        s = f"{mixed.group(1)}{mixed.group(2)}\\frac{{{mixed.group(3)}}}{{{mixed.group(4)}}}"
    t = _SPACES.sub("", s)
    if len(t) > 60:
        return None
    if _NUM_RE.fullmatch(t):
        return _decimal(t)
    m = _SCI_RE.fullmatch(t)
    if m:
        mant, exp = _decimal(m.group(1)), int(m.group(2))
        scale = Fraction(10) ** exp
        return Number(mant.value * scale, mant.ulp * scale if mant.ulp is not None else None)
    m = _FRAC_RE.fullmatch(t) or _SLASH_RE.fullmatch(t)
    if m is None:
        return None
    sign, whole, num, den = m.groups()
    n, d = _decimal(num), _decimal(den)
    if d.value == 0 or (whole and (n.value < 0 or d.value < 0)):
        return None
    value = n.value / d.value + (int(whole) if whole else 0)
    exact = n.ulp is None and d.ulp is None
    return Number(-value if sign == "-" else value, None if exact else Fraction(1, 10**12))


def numbers_close(a: Number, b: Number) -> bool:
    """Exact equality, or within 1e-4 relative with the coarser value the other one rounded or truncated."""
    if a.ulp is None and b.ulp is None:
        return a.value == b.value
    diff = abs(a.value - b.value)
    scale = max(abs(a.value), abs(b.value))
    if diff > Fraction(1, 10**4) * scale:
        return False
    if a.ulp is None or b.ulp is None:
        decimal, exact = (a, b) if a.ulp is not None else (b, a)
    else:  # two decimals: the coarser one must be the finer one rounded or truncated (671.02 != 671.03)
        decimal, exact = (a, b) if a.ulp >= b.ulp else (b, a)
    truncated = abs(decimal.value) <= abs(exact.value) and diff < decimal.ulp
    return diff <= decimal.ulp / 2 or truncated

