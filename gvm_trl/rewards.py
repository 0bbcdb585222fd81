r"""Rule-based answer verification for maths RL rewards.

Public API
----------
``extract_boxed(text)``        contents of the last ``\boxed{...}`` / ``\fbox{...}`` (nested braces), or None.
``extract_answer(completion)`` the model's final answer: the last box (also ``\boxed 5``); a broken
                               last box means no answer. Without a box: ``#### x`` on the last line
                               (GSM8K), else the last "the answer is x" / "final answer: x" /
                               "Answer: x" line, else the last number in the text.
``grade_answer(completion, gold, *, timeout=5.0)`` True when the completion's final answer is
                               equivalent to ``gold`` (a bare answer, a solution with a box, a GSM8K
                               solution, a number such as ``27.0`` or a list whose element 0 is used).
``make_math_reward(answer_column="answer", timeout=5.0)`` a TRL reward function named ``math_reward``.
``math_reward``                ``make_math_reward()``.

Why parts of this are hand-written
----------------------------------
``latex2sympy2`` turns one LaTeX *expression* into SymPy and SymPy decides symbolic equality, but
benchmark answers are rarely a bare expression: they carry units, ``\text{}`` wrappers, thousands
separators, degree signs, percentages, ``x =`` prefixes, tuples, intervals, unordered answer lists,
matrices and multiple-choice letters, and latex2sympy2 rejects or silently misreads them: ``1.5e3``
becomes ``1.5*e*3``, ``1\frac{4}{5}`` becomes ``4/5``, ``y = 2x`` *assigns* a global variable, and
since its grammar is not anchored at the end of the input it returns a parse of a prefix
(``np.arcsin(10/13)`` becomes ``n*p``). So benchmark conventions are normalised here, each answer is
split into a small structure, and only leaf expressions reach latex2sympy2, wrapped in parentheses
so that the whole leaf must parse.

Equivalence rules (documented decisions)
----------------------------------------
* Numbers: integers and fractions compare exactly. When a side is a decimal it matches when the two
  agree to a relative 1e-4 *and*, against an exact value, the decimal is that value correctly
  rounded to its own number of places: ``0.3333 == 1/3`` but ``0.33 != 1/3`` and ``26.002 != 26``.
  A decimal against an irrational closed form uses the same rule (``1.4142 == \sqrt2``,
  ``3.14 != \pi``).
* A percentage ``p\%`` matches ``p`` and ``p/100`` (``50\% == 50 == 0.5``).
* ``30^\circ == 30``; trailing units (``\text{ cm}``, ``\mathrm{~m/s}``, "inches", "dollars", ...)
  and ``\$`` are ignored; ``x = 3``, ``f(x) = 3``, ``x \in [1, 2]`` match the bare right-hand side
  when the left-hand side is a plain name (``x = 2 + 3 = 5`` gives ``5``).
* ``1,080`` (the whole answer, 3-digit groups), ``1\,080``, ``1{,}080`` and ``1,\!080`` are one
  number; any other top-level comma separates answers.
* A top-level comma list (also "a and b", "a or b") is an unordered multiset of answers
  (OlympiadBench multi-answer style), ``\{...\}`` is a set, ``a \pm b`` is the two-element set
  {a+b, a-b}; parenthesised / bracketed lists are ordered tuples or intervals whose bracket shapes
  must match (``(1,2] != (1,2)``); unions of intervals are compared as multisets; matrices
  entrywise (a column or row vector also matches a tuple of the same entries).
* Equations match when ``lhs - rhs`` of one is a non-zero constant multiple of the other's.
* Plain words compare case-insensitively (``\text{Evelyn} == evelyn``); multiple-choice letters
  A-E match with or without parentheses / ``\text{}`` (``(E) 12`` too, ``C or A`` not); other single
  letters are case-sensitive. A number with a subscript (``204_5``, a base) is compared literally.
* Scientific notation: ``1.5\times10^{3} == 1.5e3 == 1500`` (a digit, ``e``/``E``, optional sign
  and digits is read as scientific notation, never as Euler's number).
* Symbolic leaves (in the worker) need the same variable names on both sides. Closed forms compare
  exactly when both are rational, else by evaluating their difference with adaptive precision
  (``\sqrt8 == 2\sqrt2`` but ``10^{30} != 10^{30}+1``). With variables: ``expand(a - b) == 0``, else
  exact agreement at three rational points in 2.4..100 (variables are treated as positive reals, so
  ``\sqrt{ab} == \sqrt a\sqrt b``), else ``simplify``; step functions (floor, ceiling) skip the
  sampling, which they would pass by chance.

Safety
------
Model output is hostile input. Nothing here calls ``eval``/``sympify``/``parse_expr`` on it: the
only parser is latex2sympy2's ANTLR grammar (its one ``parse_expr`` call only reads the
``variable_values`` argument, which is never passed), and leaves containing relations, ``:=``,
``\in`` or ``\operatorname`` (which would mutate latex2sympy2's globals or build huge matrices) are
refused. SymPy runs in a persistent worker *subprocess* (loaded from this file, so it never imports
the trainer) with a 4 GiB address-space limit; it is killed when a call overruns its ``timeout`` and
restarted on demand, so pathological input cannot hang or exhaust the trainer from any thread.
Answers are capped at ``MAX_ANSWER_CHARS`` and expressions whose size bound exceeds 5000 digits
(power towers, huge factorials) are refused before evaluation. Grading never raises; anything
unparseable is simply not equivalent. Everything that needs no SymPy (integers, decimals,
fractions, strings, structure) is decided in-process in microseconds.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from fractions import Fraction
from typing import Any, Callable, Sequence

__all__ = [
    "MAX_ANSWER_CHARS",
    "extract_answer",
    "extract_boxed",
    "grade_answer",
    "make_math_reward",
    "math_reward",
]

MAX_ANSWER_CHARS = 1000  # longer extracted answers are refused
_MAX_LEAF_CHARS = 400  # longest leaf expression sent to SymPy
_MAX_ITEMS = 256  # longest tuple / answer list compared element by element
_WORKER_START_TIMEOUT = 120.0  # a worker not up after this long is given up on (in-process fall-back)
_WORKER_START_WAIT = 30.0  # longest one call waits for a starting worker (not part of its timeout)
_WORKER_MEMORY_BYTES = 4 << 30
_WORKER_MAX_REQUESTS = 20000  # recycle the worker now and then to bound caches and leaks

# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BOX_OPEN_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_ANY_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS_RE = re.compile(r"(?im)(?:(?:final|the)\s+answer\s*(?:is\s*:?|:)|^[ \t*#>_]*answer\s*\**\s*:)\s*")
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)\s*$")  # only on the last non-empty line
_BRACE_RE = re.compile(r"(?<!\\)[{}]")
_LAST_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")


def _match_brace(text: str, start: int) -> int:
    """Index of the ``}`` closing the group whose content starts at *start*, or -1."""
    depth = 1
    for m in _BRACE_RE.finditer(text, start):
        depth += 1 if m.group(0) == "{" else -1
        if depth == 0:
            return m.start()
    return -1


def extract_boxed(text: str) -> str | None:
    r"""Return the contents of the last ``\boxed{...}``/``\fbox{...}`` in *text* (nested braces), or None.

    None also when that last box is unbalanced (e.g. a truncated completion).
    """
    if not isinstance(text, str):
        return None
    last = None
    for last in _BOX_OPEN_RE.finditer(text):
        pass
    if last is None:
        return None
    end = _match_brace(text, last.end())
    return text[last.end() : end] if end >= 0 else None


def _last_box(text: str) -> str | None:
    r"""Contents of the last ``\boxed``/``\fbox``, braced or not (``\boxed 5``); "" if unparseable."""
    last = None
    for last in _BOX_ANY_RE.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end() : last.end() + MAX_ANSWER_CHARS + 64]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        return extract_boxed(text[last.start() :]) or ""
    if rest[:1].isspace():
        token = re.match(r"[^\s$]+", stripped)
        return token.group(0) if token else ""
    return ""


def _answer_after_phrase(text: str) -> str | None:
    """Text after the last "the answer is"/"answer:" up to the end of its line or sentence."""
    last = None
    for last in _ANSWER_IS_RE.finditer(text):
        pass
    if last is None:
        return None
    tail = text[last.end() : last.end() + MAX_ANSWER_CHARS]
    line = tail.split("\n", 1)[0].strip().strip("*").strip()
    math = re.match(r"\$+([^$]+)\$+", line)
    if math:
        return math.group(1)
    sentence = re.split(r"\.(?:\s|$)", line, maxsplit=1)[0]
    return sentence.strip().strip("*").strip() or None


def extract_answer(completion: str) -> str | None:
    r"""The final answer of a completion (see module docstring for the order of the fall-backs)."""
    if not isinstance(completion, str) or not completion:
        return None
    boxed = _last_box(completion)
    if boxed is not None:
        return boxed.strip() or None  # a broken last box is a broken answer: no fall-back
    gsm8k = _GSM8K_RE.search(completion, max(completion.rfind("####"), 0))
    if gsm8k and gsm8k.group(1).strip():
        return gsm8k.group(1).strip()
    phrase = _answer_after_phrase(completion)
    if phrase:
        return phrase
    last = None
    for last in _LAST_NUMBER_RE.finditer(completion):
        pass
    return last.group(0) if last else None


def _gold_text(gold: Any) -> str | None:
    """A dataset's gold value as a bare answer string (list -> element 0, 27.0 -> "27", box/####)."""
    if isinstance(gold, (list, tuple)):
        gold = gold[0] if gold else None
    if gold is None or isinstance(gold, bool):
        return None
    if isinstance(gold, float):
        if gold != gold or gold in (float("inf"), float("-inf")):
            return None
        return str(int(gold)) if gold.is_integer() else repr(gold)
    if not isinstance(gold, str):
        gold = str(gold)
    if _BOX_ANY_RE.search(gold):
        return _last_box(gold) or None
    if "####" in gold:
        return gold[gold.rfind("####") + 4 :].strip().split("\n", 1)[0] or None
    return gold.strip() or None


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

_UNICODE = {"−": "-", "–": "-", "×": r"\times ", "·": r"\cdot ", "π": r"\pi ", "∞": r"\infty ",
            "°": r"^\circ ", "√": r"\sqrt ", "≤": r"\leq ", "≥": r"\geq ", "≠": r"\neq ", "\u00a0": " ",
            "\u2009": " ", "\u202f": " "}
_TEXT_MACROS = r"text|textbf|textit|textrm|textnormal|textsf|texttt|mbox|mathrm|mathbf|mathit|mathsf|rm|bf|it"
_TEXT_GROUP = r"\\(?:" + _TEXT_MACROS + r")\s*\{[^{}]*\}"
_UNIT_WORDS = (
    r"km/h|km/hr|m/s|ft/s|mi/h|units?|square|sq|cubic|cm|mm|km|meters?|metres?|centimeters?|centimetres?"
    r"|kilometers?|inch(?:es)?"
    r"|feet|foot|ft|yards?|yd|miles?|mph|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?"
    r"|months?|years?|yrs?|dollars?|cents?|degrees?|deg|radians?|rad|grams?|kg|kilograms?|pounds?"
    r"|lbs?|liters?|litres?|ml|mL|gallons?|ounces?|oz|people|persons?|students?|ways|times|points?"
)
_TRAILING_UNIT_RE = re.compile(
    r"(?:\s?(?:(?:/|\\cdot|\\times|per)\s?)?(?:" + _TEXT_GROUP + r"|(?<!\\)\b(?:" + _UNIT_WORDS + r")\b)"
    r"(?:\^\{?-?\d\}?)?)\s?$"
)
_MATHY_RE = re.compile(r"[0-9]|\\(?:pi|frac|sqrt|infty)")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_CHOICE_RE = re.compile(r"\(?([A-E])\)?(?:[\s.:)][^A-Za-z]*)?")
_WORDS_RE = re.compile(r"[A-Za-z]+(?:[ '\-][A-Za-z]+)*")
_SIMPLE_LHS_RE = re.compile(
    r"\\?[A-Za-z]+(?:_(?:\{[^{}=]*\}|\w))?(?:\^(?:\{[^{}=]*\}|\w))?(?:\([^()=]*\))?|\([^()=]*\)"
)
_CMD_RE = re.compile(r"\\[A-Za-z]+")


def _unwrap_text(s: str) -> str:
    r"""Replace ``\text{abc}``-style groups by their contents."""
    for _ in range(8):
        new = re.sub(r"\\(?:" + _TEXT_MACROS + r")\s*\{([^{}]*)\}", r" \1 ", s)
        if new == s:
            break
        s = new
    return s


def _strip_units(s: str) -> str:
    """Drop trailing unit words / ``\\text{}`` groups that follow a numeric answer."""
    for _ in range(6):
        m = _TRAILING_UNIT_RE.search(s)
        if not m or not _MATHY_RE.search(s[: m.start()]):
            break
        s = s[: m.start()].rstrip()
    return s


def _strip_outer(s: str) -> str:
    """Remove one layer of ``{...}`` or ``(...)`` that encloses the whole answer without commas."""
    for _ in range(8):
        if len(s) >= 2 and s[0] in "({" and _closing_index(s, 0) == len(s) - 1:
            inner = s[1:-1].strip()
            if not inner or (s[0] == "(" and _split_top(inner, ",") != [inner]):
                break
            s = inner
        else:
            break
    return s


def _steps(*pairs: tuple[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(pattern), repl) for pattern, repl in pairs]


_SPACES = re.compile(r"\s+")
_BEFORE_UNITS = _steps(
    (r"\s+", " "),
    (r"\\\$|\$", " "),
    (r"(?<!\\)\\(?=\d)", " "),  # "\32" left behind when a loader strips "$" from "\$32"
    (r"(?<!\\)\\[()\[\]]", " "),
    (r"\\[dtc]frac(?![A-Za-z])", r"\\frac"),
    (r"\\(?:left|right)\s*\.", " "),
    (r"\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])", ""),
    (r"\\(?:displaystyle|textstyle|scriptstyle|limits)(?![A-Za-z])", " "),
    # thousands separators written in LaTeX: 1{,}080, 10,\!080, 1\,080
    (r"\{,\}|,\\!\s*", ","),
    (r"(\d)\\[,!: ]\s*(?=\d{3}(?!\d))", r"\1"),
    (r"(?<!\\)\\[,;:! ]|~|\\q?quad(?![A-Za-z])|\\hspace\*?\{[^{}]*\}", " "),
    (r"\s+", " "),
    (r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|\\circ(?![A-Za-z])|\\degree(?![A-Za-z])", " "),
    (r"\\%", "%"),
    (r"^\s*[A-Za-z]\s*\\in(?![A-Za-z])", " "),
    (r"\\mathrm\s*\{\s*([ei])\s*\}", r"\1"),  # upright e and i are constants, not units
)
_AFTER_UNITS = _steps(
    # \frac12, \frac 3 4, \frac{2}3, \frac3{4}, \sqrt2
    (r"\\frac\s*([0-9A-Za-z])\s*([0-9A-Za-z])", r"\\frac{\1}{\2}"),
    (r"\\frac\s*(\{[^{}]*\})\s*([0-9A-Za-z])", r"\\frac\1{\2}"),
    (r"\\frac\s*([0-9A-Za-z])\s*\{", r"\\frac{\1}{"),
    (r"\\sqrt\s*([0-9A-Za-z])", r"\\sqrt{\1}"),
    (r"\\(?:leqslant|leq|le)(?![A-Za-z])", r"\\leq "),
    (r"\\(?:geqslant|geq|ge)(?![A-Za-z])", r"\\geq "),
    (r"\\(?:neq|ne)(?![A-Za-z])", r"\\neq "),
    (r"\\infinity|\\inf(?![A-Za-z])", r"\\infty"),
    (r"\s+", " "),
    (r"(?:\s?[.;,])+$", ""),
)
_AND_OR_RE = re.compile(r"\s+(?:and|or)\s+")
_KEY_GROUP_RE = re.compile(r"([_^])\{(\w|\\[A-Za-z]+)\}")


def _apply(steps: list[tuple[re.Pattern, str]], s: str) -> str:
    for pattern, repl in steps:
        s = pattern.sub(repl, s)
    return s


@functools.lru_cache(maxsize=16384)
def _normalise(s: str) -> str:
    """Canonical LaTeX-ish text of one answer (units, wrappers, spacing, separators removed)."""
    for k, v in _UNICODE.items():
        if k in s:
            s = s.replace(k, v)
    s = _apply(_BEFORE_UNITS, s).strip()
    s = _strip_units(_unwrap_text(_strip_units(s)).strip())
    s = _apply(_AFTER_UNITS, s).strip()
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if any(c.isdigit() or c == "\\" for c in s):
        s = _AND_OR_RE.sub(", ", s)
    s = _strip_outer(s)
    if s.startswith("+") and len(s) > 1:
        s = s[1:].lstrip()
    return s


@functools.lru_cache(maxsize=16384)
def _key(s: str) -> str:
    """String-comparison key: whitespace removed, single-character ``{}`` groups unwrapped."""
    s = _KEY_GROUP_RE.sub(r"\1\2", _SPACES.sub("", s))
    return s.replace(r"\cdot", "*").replace(r"\times", "*")


# --------------------------------------------------------------------------------------------
# Structure: tuples, intervals, sets, unions, matrices, equations
# --------------------------------------------------------------------------------------------

_OPENERS = {"(", "[", "{", r"\{", r"\langle"}
_CLOSERS = {")", "]", "}", r"\}", r"\rangle"}


def _tokens(s: str) -> list[tuple[int, str]]:
    """(position, token) pairs: ``\\name`` commands, escaped characters and single characters."""
    out = []
    i = 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            m = _CMD_RE.match(s, i)
            tok = m.group(0) if m else s[i : i + 2]
        else:
            tok = s[i]
        out.append((i, tok))
        i += len(tok)
    return out


def _closing_index(s: str, start: int) -> int:
    """Position of the bracket token closing the one at *start* (any bracket shapes), or -1."""
    depth = 0
    for pos, tok in _tokens(s[start:]):
        if tok in _OPENERS:
            depth += 1
        elif tok in _CLOSERS:
            depth -= 1
            if depth == 0:
                return start + pos + len(tok) - 1
    return -1


def _split_top(s: str, sep: str) -> list[str]:
    """Split *s* on the token *sep* where it is outside all brackets."""
    parts, depth, last = [], 0, 0
    for pos, tok in _tokens(s):
        if tok in _OPENERS:
            depth += 1
        elif tok in _CLOSERS:
            depth -= 1
        elif depth == 0 and tok == sep:
            parts.append(s[last:pos])
            last = pos + len(tok)
    parts.append(s[last:])
    return [p.strip() for p in parts]


def _outer_brackets(s: str) -> tuple[str, str, str] | None:
    """(open, inner, close) when one bracket pair encloses all of *s*."""
    toks = _tokens(s)
    if len(toks) < 2 or toks[0][1] not in _OPENERS or toks[-1][1] not in _CLOSERS:
        return None
    depth = 0
    for idx, (_, tok) in enumerate(toks):
        if tok in _OPENERS:
            depth += 1
        elif tok in _CLOSERS:
            depth -= 1
            if depth == 0 and idx != len(toks) - 1:
                return None
    if depth != 0:
        return None
    open_tok, close_tok = toks[0][1], toks[-1][1]
    return open_tok, s[len(open_tok) : toks[-1][0]].strip(), close_tok


def _matrix_rows(s: str) -> list[list[str]] | None:
    r"""Entries of a ``\begin{pmatrix}...\end{pmatrix}`` (or b/v/plain matrix, array) answer."""
    m = re.fullmatch(r"\\begin\{([pbvBV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", s, re.S)
    if not m:
        return None
    rows = [r for r in re.split(r"\\\\", m.group(2)) if r.strip()]
    return [[c.strip() for c in r.split("&")] for r in rows]


def _expand_pm(s: str) -> list[str]:
    r"""``a \pm b`` -> [``a + b``, ``a - b``] (one top-level ``\pm``/``\mp``), else [s]."""
    toks = [(p, t) for p, t in _tokens(s) if t in (r"\pm", r"\mp")]
    if len(toks) != 1 or _split_top(s, toks[0][1]) == [s]:
        return [s]
    pos, tok = toks[0]
    signs = ("+", "-") if tok == r"\pm" else ("-", "+")
    return [s[:pos] + sign + s[pos + len(tok) :] for sign in signs]


def _parse(s: str, depth: int = 0) -> tuple:
    """Parse a normalised answer into a small tree of ('leaf'|'seq'|'set'|'union'|'matrix'|'eq', ...)."""
    s = s.strip()
    if depth > 6:
        return ("leaf", s)
    items = _split_top(s, ",")
    if len(items) > 1:
        flat = [v for it in items if it for v in _expand_pm(it)]
        return ("set", [_parse(it, depth + 1) for it in flat[:_MAX_ITEMS]], len(flat))
    pieces = _split_top(s, r"\cup")
    if len(pieces) > 1:
        return ("union", [_parse(p, depth + 1) for p in pieces])
    sides = _split_top(s, "=")
    if len(sides) > 1:
        return ("eq", [_parse(side, depth + 1) for side in sides], sides)
    rows = _matrix_rows(s)
    if rows is not None:
        return ("matrix", [[_parse(c, depth + 1) for c in row] for row in rows])
    outer = _outer_brackets(s)
    if outer is not None:
        open_tok, inner, close_tok = outer
        if open_tok == r"\{":
            inner_items = _split_top(inner, ",") if inner else []
            flat = [v for it in inner_items if it for v in _expand_pm(it)]
            return ("set", [_parse(it, depth + 1) for it in flat[:_MAX_ITEMS]], len(flat))
        inner_items = _split_top(inner, ",")
        if len(inner_items) > 1:
            return ("seq", open_tok, close_tok, [_parse(it, depth + 1) for it in inner_items])
    alternatives = _expand_pm(s)
    if len(alternatives) > 1:
        return ("set", [("leaf", a) for a in alternatives], 2)
    return ("leaf", s)


# --------------------------------------------------------------------------------------------
# Numbers (fast path, no SymPy)
# --------------------------------------------------------------------------------------------

_INT = r"[-+]?\d+"
_DEC = r"[-+]?(?:\d+\.\d*|\.\d+)"
_NUM = rf"(?:{_DEC}|{_INT})"


class _Number:
    """An exact rational value plus the resolution of the decimal it was written as (None: exact)."""

    __slots__ = ("value", "ulp")

    def __init__(self, value: Fraction, ulp: Fraction | None):
        self.value, self.ulp = value, ulp


def _decimal(text: str) -> _Number:
    """A plain integer or decimal literal."""
    if "." in text:
        places = len(text.split(".", 1)[1])
        return _Number(Fraction(text), Fraction(1, 10**places))
    return _Number(Fraction(int(text)), None)


_NUM_RE = re.compile(_NUM)
_SCI_RE = re.compile(rf"({_NUM})(?:[eE]|\*10\^|\\times10\^|\\cdot10\^)\{{?([-+]?\d{{1,3}})\}}?")
_FRAC_RE = re.compile(rf"([-+]?)(\d+)?\\frac\{{({_NUM})\}}\{{({_NUM})\}}")
_SLASH_RE = re.compile(rf"([-+]?)()({_NUM})/({_NUM})")


def _parse_number(s: str) -> _Number | None:
    r"""Read integers, decimals, a/b, ``\frac{a}{b}``, mixed numbers and scientific notation."""
    if len(s) > 120:
        return None
    t = _SPACES.sub("", s)
    if len(t) > 60:
        return None
    if _NUM_RE.fullmatch(t):
        return _decimal(t)
    m = _SCI_RE.fullmatch(t)
    if m:
        mant, exp = _decimal(m.group(1)), int(m.group(2))
        scale = Fraction(10) ** exp
        return _Number(mant.value * scale, mant.ulp * scale if mant.ulp is not None else None)
    m = _FRAC_RE.fullmatch(t) or _SLASH_RE.fullmatch(t)
    if m is None:
        return None
    sign, whole, num, den = m.groups()
    n, d = _decimal(num), _decimal(den)
    if d.value == 0 or (whole and (n.value < 0 or d.value < 0)):
        return None
    value = n.value / d.value + (int(whole) if whole else 0)
    exact = n.ulp is None and d.ulp is None
    return _Number(-value if sign == "-" else value, None if exact else Fraction(1, 10**12))


def _numbers_close(a: _Number, b: _Number) -> bool:
    """Number rule from the module docstring (exact, or decimal within rounding and 1e-4 relative)."""
    if a.ulp is None and b.ulp is None:
        return a.value == b.value
    diff = abs(a.value - b.value)
    scale = max(abs(a.value), abs(b.value))
    if diff > Fraction(1, 10**4) * scale:
        return False
    if a.ulp is None or b.ulp is None:
        ulp = a.ulp if a.ulp is not None else b.ulp
        return diff <= ulp / 2
    return True


# --------------------------------------------------------------------------------------------
# Leaf comparison
# --------------------------------------------------------------------------------------------


def _is_words(s: str) -> bool:
    """True for plain-word answers ("Evelyn", "no solution", "odd", "No") compared case-insensitively."""
    if not _WORDS_RE.fullmatch(s):
        return False
    return s.casefold() == "no" or max(len(w) for w in re.split(r"[ '\-]", s)) >= 3


def _choice_letter(s: str) -> str | None:
    """The letter of a multiple-choice answer such as ``C``, ``(C)`` or ``(C) 12``."""
    m = _CHOICE_RE.fullmatch(s.strip())
    return m.group(1) if m else None


def _variable_letters(s: str) -> frozenset[str]:
    """Variable names (letter + simple subscript) outside ``\\commands``; ``e``, ``i`` are constants."""
    names = _VARIABLE_RE.findall(_CMD_RE.sub(" ", s))
    return frozenset(letter + sub for letter, sub in names if letter + sub not in ("e", "i"))


_VARIABLE_RE = re.compile(r"([A-Za-z])(?:_\{?\s*([A-Za-z0-9]+)\s*\}?)?")


def _percent_variants(s: str) -> list[str]:
    """``p%`` -> [p, p/100]; other answers -> [s]."""
    if not s.endswith("%"):
        return [s]
    base = s[:-1].strip()
    if not base:
        return []
    return [base, rf"\frac{{{base}}}{{100}}"]


class _Context:
    """Deadline and symbolic back-end shared by one ``grade_answer`` call."""

    def __init__(self, deadline: float, symbolic: Callable[[list, float], tuple[bool | None, float]]):
        self.deadline, self.symbolic = deadline, symbolic

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, payload: list) -> bool:
        """One symbolic check within the remaining time (a worker start-up extends the deadline)."""
        remaining = self.remaining()
        if remaining <= 0:
            return False
        result, startup = self.symbolic(payload, remaining)
        self.deadline += startup
        return bool(result)


def _leaf_equal(pred: str, gold: str, ctx: _Context) -> bool:
    """Equivalence of two leaf answers: string, choice, words, numbers, then SymPy."""
    if _key(pred) == _key(gold):
        return True
    letter = _choice_letter(gold)
    if letter is not None and len(_key(gold).strip("()")) == 1:
        return _choice_letter(pred) == letter
    if _is_words(gold) or _is_words(pred):
        return re.sub(r"\W", "", pred).casefold() == re.sub(r"\W", "", gold).casefold()
    if pred.endswith("%") and gold.endswith("%"):
        return _leaf_equal(pred[:-1].strip(), gold[:-1].strip(), ctx)
    if pred.endswith("%") or gold.endswith("%"):
        return any(_leaf_equal(p, g, ctx) for p in _percent_variants(pred) for g in _percent_variants(gold))
    pn, gn = _parse_number(pred), _parse_number(gold)
    if pn is not None and gn is not None:
        return _numbers_close(pn, gn)
    if _variable_letters(pred) != _variable_letters(gold):
        return False  # SymPy would find different free symbols: skip the (slow) parse
    p_sym, g_sym = _sympy_ready(pred), _sympy_ready(gold)
    if p_sym is None or g_sym is None:
        return False
    return ctx.run(["leaf", p_sym, g_sym])


def _simple_lhs(side: str) -> bool:
    """Whether an equation's left side is a plain name such as ``x``, ``f(x)``, ``m_{\\max}``."""
    side = re.sub(r"\s+", "", side)
    return len(side) <= 40 and bool(_SIMPLE_LHS_RE.fullmatch(side))


def _tree_key(node: tuple) -> str:
    """Canonical text of a parsed answer (order-free for sets and unions), for cheap exact matching."""
    kind = node[0]
    if kind == "leaf":
        return _key(node[1])
    if kind == "seq":
        return f"seq{node[1]}{node[2]}(" + ";".join(map(_tree_key, node[3])) + ")"
    if kind == "matrix":
        return "matrix(" + "//".join(";".join(map(_tree_key, row)) for row in node[1]) + ")"
    keys = [_tree_key(n) for n in node[1]]
    return f"{kind}(" + ";".join(sorted(keys) if kind in ("set", "union") else keys) + ")"


def _multiset_equal(preds: list, golds: list, ctx: _Context) -> bool:
    """Match two answer lists: identical items first, then greedily (equivalence is transitive)."""
    if len(preds) != len(golds) or len(golds) > _MAX_ITEMS:
        return False
    unused = list(golds)
    unused_keys = [_tree_key(g) for g in unused]
    pending = []
    for p in preds:
        key = _tree_key(p)
        if key in unused_keys:
            index = unused_keys.index(key)
            del unused[index], unused_keys[index]
        else:
            pending.append(p)
    for p in pending:
        for i, g in enumerate(unused):
            if _tree_equal(p, g, ctx):
                del unused[i]
                break
        else:
            return False
    return True


def _as_vector(node: tuple) -> tuple | None:
    """A one-row or one-column matrix as a parenthesised tuple."""
    rows = node[1]
    if len(rows) == 1:
        return ("seq", "(", ")", rows[0])
    if rows and all(len(r) == 1 for r in rows):
        return ("seq", "(", ")", [r[0] for r in rows])
    return None


def _equation_equal(p: tuple, g: tuple, ctx: _Context) -> bool:
    """Two equations: same left side and equal right sides, else proportional ``lhs - rhs``."""
    p_sides, g_sides = p[2], g[2]
    if len(p_sides) == 2 and len(g_sides) == 2 and _key(p_sides[0]) == _key(g_sides[0]):
        return _tree_equal(p[1][1], g[1][1], ctx)
    if len(p_sides) != 2 or len(g_sides) != 2:
        return False
    if _variable_letters("".join(p_sides)) != _variable_letters("".join(g_sides)):
        return False
    parts = [_sympy_ready(x) for x in (*p_sides, *g_sides)]
    if any(x is None for x in parts):
        return False
    return ctx.run(["eq", *parts])


def _tree_equal(p: tuple, g: tuple, ctx: _Context) -> bool:
    """Structural equivalence of two parsed answers."""
    if ctx.remaining() <= 0:
        return False
    if p[0] == "eq" and g[0] == "eq":
        return _equation_equal(p, g, ctx)
    if g[0] == "eq":
        return _simple_lhs(g[2][0]) and _tree_equal(p, g[1][-1], ctx)
    if p[0] == "eq":
        return _simple_lhs(p[2][0]) and _tree_equal(p[1][-1], g, ctx)
    if p[0] == "matrix" and g[0] == "matrix":
        rp, rg = p[1], g[1]
        return [len(r) for r in rp] == [len(r) for r in rg] and all(
            _tree_equal(a, b, ctx) for ra, rb in zip(rp, rg) for a, b in zip(ra, rb)
        )
    if p[0] == "matrix" or g[0] == "matrix":
        pv = _as_vector(p) if p[0] == "matrix" else p
        gv = _as_vector(g) if g[0] == "matrix" else g
        return pv is not None and gv is not None and pv[0] == gv[0] == "seq" and _seq_equal(pv, gv, ctx, True)
    if p[0] == "set" and g[0] == "set":
        return p[2] == g[2] <= _MAX_ITEMS and _multiset_equal(p[1], g[1], ctx)
    if p[0] == "set" and len(p[1]) == 1 and g[0] != "set":
        return _tree_equal(p[1][0], g, ctx)
    if g[0] == "set" and len(g[1]) == 1 and p[0] != "set":
        return _tree_equal(p, g[1][0], ctx)
    if p[0] == "union" and g[0] == "union":
        return _multiset_equal(p[1], g[1], ctx)
    if p[0] == "seq" and g[0] == "seq":
        return _seq_equal(p, g, ctx, False)
    if p[0] == "leaf" and g[0] == "leaf":
        return _leaf_equal(p[1], g[1], ctx)
    return False


def _seq_equal(p: tuple, g: tuple, ctx: _Context, any_brackets: bool) -> bool:
    """Ordered tuples / intervals: same bracket shapes (unless *any_brackets*), equal items in order."""
    if not any_brackets and (p[1], p[2]) != (g[1], g[2]):
        return False
    return len(p[3]) == len(g[3]) <= _MAX_ITEMS and all(_tree_equal(a, b, ctx) for a, b in zip(p[3], g[3]))


# --------------------------------------------------------------------------------------------
# SymPy side (runs in the worker process)
# --------------------------------------------------------------------------------------------

_REFUSED_IN_SYMPY = re.compile(
    r":=|\\in(?![A-Za-z])|\\operatorname|\\begin|\\end|\\mathbb|=|<|>|\\[lg]eq|\\neq|\\approx|\\sim|\\to"
    r"|\\cup|\\cap|\\setminus|\\pm|\\mp|%|\\\\|&|\\text|\\mbox|[^\x20-\x7e]"
    r"|\d\s*_"  # 204_5: a numeral in another base is compared literally
    r"|'|\d\.\d*\."  # primes (latex2sympy2 drops them) and malformed numbers such as 3.5.1
)


def _sympy_ready(s: str) -> str | None:
    """Leaf text rewritten for latex2sympy2, or None when it must not / cannot be parsed."""
    s = s.strip()
    if not s or len(s) > _MAX_LEAF_CHARS or _REFUSED_IN_SYMPY.search(s):
        return None
    depth = 0
    for ch in s:
        depth += ch in "({["
        depth -= ch in ")}]"
        if depth > 24 or depth < 0:
            return None
    if depth != 0:
        return None
    s = re.sub(r"(?<![A-Za-z\\])(\d+(?:\.\d+)?)[eE]([-+]?\d+)(?![\d.])", r"\1\\times10^{\2}", s)
    s = re.sub(r"^([-+]?)(\d+)\s*(\\frac\{\d+\}\{\d+\})$", r"\1(\2+\3)", s)
    s = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", s)
    return s


_MAX_DIGITS = 5000.0  # refuse closed forms whose numeric size bound exceeds this many digits


def _digits_bound(node) -> float:
    """Cheap upper bound on log10|value| of an (unevaluated) SymPy tree; inf for towers."""
    import math

    import sympy

    if node.is_Rational:
        return math.log10(max(abs(int(node.p)), int(node.q), 1)) + 1
    if node.is_Float:
        return math.log10(max(abs(float(node)), 10.0))
    if isinstance(node, sympy.Pow):
        base, exp = _digits_bound(node.base), _digits_bound(node.exp)
        if node.base in (0, 1, -1):
            return 1.0
        if exp > 5:  # exponent may exceed 1e5: power tower or huge power
            return math.inf
        return (base + 1) * 10**exp
    if isinstance(node, (sympy.factorial, sympy.factorial2, sympy.binomial)):
        arg = max((_digits_bound(a) for a in node.args), default=1.0)
        return math.inf if arg > 5 else 10**arg * (arg + 1)
    if not node.args:
        return 1.0
    bounds = [_digits_bound(a) for a in node.args]
    if isinstance(node, sympy.Mul):
        return sum(bounds)
    return max(bounds) + 1


@functools.lru_cache(maxsize=4096)
def _latex_to_expr(s: str):
    """latex2sympy2 + imaginary unit + size guard; None when unusable (cached: golds repeat)."""
    import sympy
    from latex2sympy2 import latex2sympy

    try:
        expr = latex2sympy("(" + s + ")")  # the parentheses force the grammar to consume all of s
    except TimeoutError:
        raise
    except Exception:  # noqa: BLE001 - the grammar rejected it (cached as unusable)
        return None
    if not isinstance(expr, sympy.Expr) or _digits_bound(expr) > _MAX_DIGITS:
        return None
    swaps = {sym: sympy.I for sym in expr.free_symbols if sym.name == "i"}
    return expr.xreplace(swaps) if swaps else expr


def _numeric_value(expr):
    """(real, imag) 50-digit Floats of a closed form, or None when not a finite number."""
    import sympy

    val = sympy.N(expr, 50)
    if not val.is_number or val.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan):
        return None
    re_part, im_part = val.as_real_imag()
    if not (re_part.is_Number and im_part.is_Number):
        return None
    return re_part, im_part


def _closed_forms_equal(a, b) -> bool | None:
    """Equality of two closed forms; None when they do not evaluate to finite numbers.

    Exact when both reduce to rationals; otherwise ``a - b`` is evaluated with SymPy's adaptive
    precision (which resolves cancellation) and must vanish to 1e-90 relative to the operands, so
    ``10^{30}`` and ``10^{30}+1`` differ while ``\\sqrt{8}`` and ``2\\sqrt{2}`` agree.
    """
    import sympy

    a, b = a.doit(), b.doit()
    if a.is_Rational and b.is_Rational:
        return a == b
    if a.has(sympy.zoo, sympy.nan) or b.has(sympy.zoo, sympy.nan):
        return False  # undefined (1/0, 0/0) never matches, not even itself
    if a == b:
        return True
    values = [sympy.N(x, 15) for x in (a, b)]
    diff = sympy.N(a - b, 15, maxn=200)
    for v in (*values, diff):
        if not v.is_number or v.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan):
            return None
    scale = max(abs(values[0]), abs(values[1]))
    return bool(scale == 0 or abs(diff) <= scale * sympy.Float("1e-90", 20))


_SAMPLE_VALUES = ((17, 7), (143, 11), (419, 13), (1009, 17), (73, 29), (2311, 23))


def _sample_points(symbols, count: int):
    """Deterministic rational points for free symbols: positive, spread from 2.4 to 100, distinct."""
    import sympy

    names = sorted(symbols, key=lambda x: x.name)
    for k in range(count):
        yield {
            sym: sympy.Rational(*_SAMPLE_VALUES[(k + i) % len(_SAMPLE_VALUES)]) + sympy.Rational(i, 101)
            for i, sym in enumerate(names)
        }


def _exprs_equal(a, b) -> bool:
    """Symbolic equality of two SymPy expressions (see module docstring)."""
    import sympy
    from sympy.core.function import AppliedUndef

    if a == b:
        return True
    if {s.name for s in a.free_symbols} != {s.name for s in b.free_symbols}:
        return False
    diff = a - b
    if not a.free_symbols:
        same = _closed_forms_equal(a, b)
        return same if same is not None else sympy.simplify(diff) == 0
    if sympy.expand(diff) == 0:
        return True
    if diff.has(sympy.floor, sympy.ceiling, sympy.frac, sympy.Mod):
        return sympy.simplify(diff) == 0  # step functions agree at most sample points by chance
    agree = 0
    for point in _sample_points(a.free_symbols | b.free_symbols, 6):
        same = _closed_forms_equal(a.subs(point), b.subs(point))
        if same is None:
            continue  # a singular or non-numeric point
        if not same:
            return False
        agree += 1
        if agree >= 3:
            return True
    if diff.atoms(AppliedUndef):
        return False  # unknown functions such as f(x), delta(t): only the expansion above can tell
    return sympy.simplify(diff) == 0


def _number_vs_expr(number: _Number, expr) -> bool:
    """A decimal literal against a closed form, under the numeric rule."""
    val = _numeric_value(expr)
    if val is None or val[1] != 0:
        return False
    return _numbers_close(number, _Number(Fraction(str(val[0])), Fraction(1, 10**40)))


def _symbolic_leaf(pred: str, gold: str) -> bool:
    """Leaf equivalence through latex2sympy2 + SymPy."""
    pn, gn = _parse_number(pred), _parse_number(gold)
    a, b = _latex_to_expr(pred), _latex_to_expr(gold)
    if a is None or b is None:
        return False
    if pn is not None and gn is not None:
        return _numbers_close(pn, gn)
    if pn is not None and pn.ulp is not None and not b.free_symbols:
        return _number_vs_expr(pn, b)
    if gn is not None and gn.ulp is not None and not a.free_symbols:
        return _number_vs_expr(gn, a)
    return _exprs_equal(a, b)


def _symbolic_equation(l1: str, r1: str, l2: str, r2: str) -> bool:
    """Equations equal when ``l1 - r1`` is a non-zero constant multiple of ``l2 - r2``."""
    import sympy

    exprs = [_latex_to_expr(x) for x in (l1, r1, l2, r2)]
    if any(e is None for e in exprs):
        return False
    d1, d2 = exprs[0] - exprs[1], exprs[2] - exprs[3]
    if {s.name for s in d1.free_symbols} != {s.name for s in d2.free_symbols} or not d1.free_symbols:
        return False
    if sympy.expand(d1 - d2) == 0 or sympy.expand(d1 + d2) == 0:
        return True
    ratios = []
    for point in _sample_points(d1.free_symbols | d2.free_symbols, 6):
        v1, v2 = d1.subs(point).doit(), d2.subs(point).doit()
        if not (v1.is_number and v2.is_number) or _closed_forms_equal(v2, sympy.S.Zero) is not False:
            continue
        ratios.append(v1 / v2)
        if len(ratios) >= 3:
            break
    if len(ratios) < 3 or _closed_forms_equal(ratios[0], sympy.S.Zero) is not False:
        return False
    return all(_closed_forms_equal(r, ratios[0]) for r in ratios[1:])


def _symbolic(request: list) -> bool:
    """Dispatch one worker request: ["leaf", a, b] or ["eq", l1, r1, l2, r2]."""
    kind, *args = request
    if kind == "leaf":
        return _symbolic_leaf(*args)
    if kind == "eq":
        return _symbolic_equation(*args)
    return False


def _worker_main() -> None:
    """Worker loop: JSON request per line on stdin -> "1"/"0" per line on stdout."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, _WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    import latex2sympy2  # noqa: F401  (slow import, done before "ready")

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            result = _symbolic(json.loads(line))
        except BaseException:  # noqa: BLE001 - any failure means "not equivalent"
            result = False
        out.write("1\n" if result else "0\n")
        out.flush()


_WORKER_BOOT = (
    "import importlib.util, sys\n"
    "sys.path[:] = [p for p in sys.path if p not in ('', '.')]\n"
    "spec = importlib.util.spec_from_file_location('_gvm_rewards_worker', sys.argv[1])\n"
    "mod = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(mod)\n"
    "mod._worker_main()\n"
)


class _SymbolicWorker:
    """A persistent SymPy subprocess, killed and restarted when a request overruns its time."""

    def __init__(self) -> None:
        self._reset()
        self.failed_to_start = False

    def _reset(self) -> None:
        """Fresh state (also used in a forked child, which must never touch the parent's pipes)."""
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue | None = None
        self._ready = False
        self._served = 0
        self._spawned = 0.0

    def start(self) -> None:
        """Start the subprocess if it is not running, without waiting for it."""
        if not self.failed_to_start and self._lock.acquire(blocking=False):
            try:
                self._ensure_started()
            finally:
                self._lock.release()

    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._kill()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOT, os.path.abspath(__file__)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env=env, text=True, bufsize=1,
            )
        except OSError:
            self.failed_to_start = True
            self._proc = None
            return
        self._ready = False
        self._served = 0
        self._spawned = time.monotonic()
        self._lines = queue.Queue()
        threading.Thread(target=self._pump, args=(self._proc, self._lines), daemon=True).start()

    @staticmethod
    def _pump(proc: subprocess.Popen, lines: queue.Queue) -> None:
        """Forward the worker's stdout lines to a queue (None at end of stream)."""
        try:
            for line in proc.stdout:
                lines.put(line.strip())
        except (OSError, ValueError):
            pass
        lines.put(None)

    def _kill(self) -> None:
        if self._proc is not None:
            try:
                self._proc.kill()
                self._proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._proc = None

    def _await_ready(self) -> float:
        """Wait (a bounded time) for the worker's start-up; returns the seconds waited."""
        if self._ready:
            return 0.0
        began = time.monotonic()
        give_up = self._spawned + _WORKER_START_TIMEOUT
        try:
            line = self._lines.get(timeout=max(min(_WORKER_START_WAIT, give_up - began), 0.01))
        except queue.Empty:
            line = ""  # still importing: this call gives up, the next one waits again
        self._ready = line == "ready"
        if line is None or (not self._ready and time.monotonic() >= give_up):
            self._kill()  # it died or never came up
            self.failed_to_start = True
        return time.monotonic() - began

    def request(self, payload: list, timeout: float) -> tuple[bool | None, float]:
        """(result or None on timeout / no worker, seconds spent starting the worker)."""
        began = time.monotonic()
        if timeout <= 0 or not self._lock.acquire(timeout=timeout):
            return None, 0.0
        try:
            self._ensure_started()
            if self._proc is None:
                return None, 0.0
            startup = self._await_ready()
            if not self._ready:
                return None, startup
            remaining = timeout - (time.monotonic() - began - startup)
            try:
                self._proc.stdin.write(json.dumps(payload) + "\n")
                self._proc.stdin.flush()
                line = self._lines.get(timeout=max(remaining, 0.01))
            except (OSError, ValueError, queue.Empty):
                line = None
            self._served += 1
            if line not in ("0", "1") or self._served >= _WORKER_MAX_REQUESTS:
                self._kill()  # overran, died or is due for recycling
                self._ensure_started()  # the replacement imports SymPy while the caller moves on
            return (line == "1" if line in ("0", "1") else None), startup
        finally:
            self._lock.release()

    def close(self) -> None:
        """Stop the worker (waits at most a few seconds for a request in flight)."""
        locked = self._lock.acquire(timeout=5)
        try:
            self._kill()
        finally:
            if locked:
                self._lock.release()


_WORKER = _SymbolicWorker()
atexit.register(_WORKER.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WORKER._reset)

_CACHE: OrderedDict = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 20000


def _symbolic_remote(payload: list, timeout: float) -> tuple[bool | None, float]:
    """Cached symbolic check in the worker (in-process fall-back if the worker cannot start)."""
    key = json.dumps(payload)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key], 0.0
    result, startup = (None, 0.0) if _WORKER.failed_to_start else _WORKER.request(payload, timeout)
    if result is None and _WORKER.failed_to_start:
        result = _symbolic_in_process(payload, timeout)
    if result is not None:
        with _CACHE_LOCK:
            _CACHE[key] = result
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return result, startup


def _symbolic_in_process(payload: list, timeout: float) -> bool | None:
    """Last resort without a worker: main thread only, bounded by SIGALRM."""
    import signal

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return None

    def _alarm(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, max(timeout, 0.01))
        return _symbolic(payload)
    except BaseException:  # noqa: BLE001
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------
# Public grading API
# --------------------------------------------------------------------------------------------

_PLAIN_INT_RE = re.compile(r"-?\d+")


def _answers_equal(pred: str, gold: str, ctx: _Context) -> bool:
    """Full comparison of two extracted answers."""
    if pred == gold:
        return True
    if _PLAIN_INT_RE.fullmatch(pred) and _PLAIN_INT_RE.fullmatch(gold):
        return int(pred) == int(gold)
    pn, gn = _parse_number(pred), _parse_number(gold)
    if pn is not None and gn is not None:
        return _numbers_close(pn, gn)
    p, g = _normalise(pred), _normalise(gold)
    if not p or not g:
        return False
    if _key(p) == _key(g):
        return True
    return _tree_equal(_parse(p), _parse(g), ctx)


def grade_answer(completion: str, gold: str | float | int | list, *, timeout: float = 5.0) -> bool:
    """True when the final answer of *completion* is equivalent to *gold*; never raises.

    *timeout* bounds the symbolic (SymPy) part of the call in seconds. Not counted: waiting for the
    SymPy worker to start (a second or so, once per process and after a worker is killed for
    overrunning), which one call waits for at most 30 s before answering False.
    """
    try:
        deadline = time.monotonic() + max(float(timeout), 0.0)
        gold_text = _gold_text(gold)
        pred = extract_answer(completion)
        if not pred or not gold_text or len(pred) > MAX_ANSWER_CHARS or len(gold_text) > MAX_ANSWER_CHARS:
            return False
        return _answers_equal(pred.strip(), gold_text.strip(), _Context(deadline, _symbolic_remote))
    except Exception:  # noqa: BLE001 - a grader must never take training down
        return False


def _completion_text(completion: Any) -> str:
    """Text of a completion: a string, or the last assistant message of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)):
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role", "assistant") == "assistant"] or messages
        if assistant:
            content = assistant[-1].get("content", "")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content if isinstance(content, str) else ""
    return ""


def make_math_reward(answer_column: str = "answer", timeout: float = 5.0) -> Callable[..., list[float]]:
    """A TRL reward function (``__name__ == "math_reward"``) reading gold answers from *answer_column*.

    TRL calls it as ``math_reward(prompts=..., completions=..., completion_ids=..., **columns)``;
    ``math_reward(completions, golds)`` also works. Completions are strings or conversations (the
    last assistant message is graded). Returns 1.0 for an answer equivalent to the gold, else 0.0.
    """

    def math_reward(completions: Sequence[Any], *gold_list: Sequence[Any], **kwargs: Any) -> list[float]:
        if gold_list:
            golds = gold_list[0]
        elif answer_column in kwargs:
            golds = kwargs[answer_column]
        else:
            columns = sorted(
                k for k, v in kwargs.items()
                if isinstance(v, (list, tuple)) and k not in ("prompts", "completion_ids")
            )
            raise KeyError(
                f"math_reward: gold answer column {answer_column!r} was not passed to the reward "
                f"function; available keyword columns: {columns}. Use "
                f"make_math_reward(answer_column=...) to pick the column."
            )
        if len(golds) != len(completions):
            raise ValueError(f"math_reward: {len(completions)} completions but {len(golds)} gold answers")
        _WORKER.start()  # overlap the worker's start with the fast-path grading below
        return [
            1.0 if grade_answer(_completion_text(c), g, timeout=timeout) else 0.0
            for c, g in zip(completions, golds)
        ]

    math_reward.__name__ = math_reward.__qualname__ = "math_reward"
    return math_reward


math_reward = make_math_reward()
