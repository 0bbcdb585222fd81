r"""Canonical text of one answer, and bracket-aware splitting of it.

``normalise`` removes what never changes an answer's value: math delimiters, ``\left``/``\right``,
spacing macros, ``\text{}`` wrappers, trailing units, ``\$``, thousands separators, a text written with
doubled backslashes (``\\frac``); it spells relations one way (``>=``, ``\ge``, ``≥`` -> ``\geq``), percent
words as ``%``, ``\quad``, "and", "or" between answers as commas, and turns degrees inside trigonometric
functions into radians (``\cos(90^\circ - t)`` -> ``\cos((90\pi/180) - t)``) while a bare ``30^\circ`` is 30.
"""
from __future__ import annotations

import functools
import re

__all__ = ["RELATIONS", "closing_index", "key", "normalise", "outer_brackets", "split_relations", "split_top", "tokens"]

_UNICODE = {"−": "-", "–": "-", "×": r"\times ", "·": r"\cdot ", "π": r"\pi ", "∞": r"\infty ",
            "°": r"^\circ ", "√": r"\sqrt ", "≤": r"\leq ", "≥": r"\geq ", "≠": r"\neq ", "≈": r"\approx ",
            "∈": r"\in ", "∪": r"\cup ", "²": "^2", "³": "^3", "€": " ", "£": " ", "：": ":", "，": ",",
            "\u00a0": " ", "\u2009": " ", "\u202f": " "}
_TEXT_MACROS = r"text|textbf|textit|textrm|textnormal|textsf|texttt|mbox|mathrm|mathbf|mathit|mathsf|rm|bf|it"
_TEXT_GROUP = r"\\(?:" + _TEXT_MACROS + r")\s*\{[^{}]*\}"
_UNIT_WORDS = (
    r"km/h|km/hr|m/s|ft/s|mi/h|units?|square|sq|cubic|cm|mm|km|meters?|metres?|centimeters?|centimetres?"
    r"|kilometers?|inch(?:es)?"
    r"|feet|foot|ft|yards?|yd|miles?|mph|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?"
    r"|months?|years?|yrs?|dollars?|cents?|degrees?|deg|radians?|rad|grams?|kg|kilograms?|pounds?"
    r"|lbs?|liters?|litres?|ml|mL|gallons?|ounces?|oz|people|persons?|students?|ways|times|points?|yuan|euros?"
)
_LONG_UNIT_WORDS = r"weeks?|days?|hours?|minutes?|seconds?|months?|years?|dollars?|cents?|miles?|meters?|inches|feet|degrees?"
_TRAILING_UNIT_RE = re.compile(
    r"(?:\s?(?:(?:/|\\cdot|\\times|per)\s?)?(?:" + _TEXT_GROUP + r"|(?<!\\)\b(?:" + _UNIT_WORDS + r")\b"
    r"|(?<=\d)(?:" + _LONG_UNIT_WORDS + r")\b)(?:\^\{?-?\d\}?)?)\s?$"
)
_MATHY_RE = re.compile(r"[0-9]|\\(?:pi|frac|sqrt|infty)")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_CMD_RE = re.compile(r"\\[A-Za-z]+")
_SPACES = re.compile(r"\s+")
_TRIG_RE = re.compile(r"\\(?:sin|cos|tan|cot|sec|csc)(?![A-Za-z])")
_DOUBLED_COMMAND_RE = re.compile(r"(?<!\\)\\\\[A-Za-z]{2,}")
_SINGLE_COMMAND_RE = re.compile(r"(?<!\\)\\[A-Za-z]")
_DOUBLED_KNOWN_RE = re.compile(r"(?<!\\)\\\\(?=(?:[dtc]?frac|sqrt|left|right|pi|cdot|times|text|infty)(?![A-Za-z]))")
RELATIONS = ("=", "<", ">", r"\leq", r"\geq", r"\neq", r"\approx")


def _steps(*pairs: tuple[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(pattern), repl) for pattern, repl in pairs]


def _apply(steps: list[tuple[re.Pattern, str]], s: str) -> str:
    for pattern, repl in steps:
        s = pattern.sub(repl, s)
    return s


_BEFORE_UNITS = _steps(
    (r"\s+", " "),
    (r"\\\$|\$|\\?\"", " "),
    (r"(?<!\\)\\(?=\d)", " "),  # "\32" left behind when a loader strips "$" from "\$32"
    (r"(?<!\\)\\[()\[\]]", " "),
    (r"\\[dtc]frac(?![A-Za-z])", r"\\frac"),
    (r"\\(?:left|right)\s*\.", " "),
    (r"\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])", ""),
    (r"\\(?:displaystyle|textstyle|scriptstyle|limits|hline)(?![A-Za-z])", " "),
    # thousands separators written in LaTeX: 1{,}080, 10,\!080, 1\,080
    (r"\s*\{\s*,\s*\}\s*|,\\!\s*", ","),
    (r"(\d)\\[,!: ]\s*(?=\d{3}(?!\d))", r"\1"),
    (r"(\d:[0-5]\d)\s*(?:\\(?:text|mathrm)\s*\{\s*)?([apAP])\.?\s*[mM]\.?\s*\}?", r"\1\2m"),  # 7:20 p.m.
    (r"\\q?quad", r" \\quad "),
    (r"(?<!\\)\\[,;:! ]|~|\\hspace\*?\{[^{}]*\}", " "),
    (r"\s+", " "),
    (r"\\text\s*\{\s*(?:percent(?:age)?|pct|per ?cent)\s*\}|(?<=[\d}\s])(?:percent(?:age)?|pct|per ?cent)\b", "%"),
    (r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|\\circ(?![A-Za-z])|\\degree(?![A-Za-z])", " "),
    (r"\\%", "%"),
    (r"^\s*(?:[A-Za-z](?:_\{?\w+\}?)?|[A-Za-z]\([A-Za-z]\))\s*\\in(?![A-Za-z])", " "),
    (r"\\mathrm\s*\{\s*([ei])\s*\}", r"\1"),  # upright e and i are constants, not units
)
_DEGREES_IN_TRIG = re.compile(r"(\d+(?:\.\d+)?)\s*(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|\\degree(?![A-Za-z])|°)")
_AFTER_UNITS = _steps(
    # \frac12, \frac 3 4, \frac{2}3, \frac3{4}, \sqrt2, \binom62
    (r"\\(frac|binom)\s*([0-9A-Za-z])\s*([0-9A-Za-z])", r"\\\1{\2}{\3}"),
    (r"\\(frac|binom)\s*(\{[^{}]*\})\s*([0-9A-Za-z])", r"\\\1\2{\3}"),
    (r"\\(frac|binom)\s*([0-9A-Za-z])\s*\{", r"\\\1{\2}{"),
    (r"\\sqrt\s*([0-9A-Za-z])", r"\\sqrt{\1}"),
    (r"\\(?:leqslant|leq|le)(?![A-Za-z])|<=|=<", r" \\leq "),
    (r"\\(?:geqslant|geq|ge)(?![A-Za-z])|>=", r" \\geq "),
    (r"\\(?:neq|ne)(?![A-Za-z])|!=", r" \\neq "),
    (r"\\lt(?![A-Za-z])", " < "),
    (r"\\gt(?![A-Za-z])", " > "),
    (r"\\(?:approx|simeq|thickapprox)(?![A-Za-z])", r" \\approx "),
    (r"\\[bp]?mod(?![A-Za-z])", r"\\mod "),
    (r"\\infinity|\\inf(?![A-Za-z])", r"\\infty"),
    (r"(?<![\w}\)])\+\s*\\infty", r"\\infty"),
    (r"\s+", " "),
    (r"(?:\s?[.;,]|\s*\\\\)+$", ""),
    (r"^(?:\s*\\quad)+|(?:\s*\\quad)+$", ""),
    (r"\s*\\quad\s*", ", "),
)
_AND_OR_RE = re.compile(
    r"[\s,]+(?:and|or)(?=[\s,])[\s,]*|(?<=[)\]}\d])\s*(?:and|or)\s*(?=[(\[{\\\d-]|[A-Za-z](?![a-z]))"
)
_DECIMAL_COMMA_RE = re.compile(r"(-?\d{4,}),(\d{2})|(-?0),(\d+)")  # not 69,84: OlympiadBench lists
_KEY_GROUP_RE = re.compile(r"([_^])\{(\w|\\[A-Za-z]+)\}")


def _undouble_backslashes(s: str) -> str:
    r"""``\\frac{1}{2}`` (a text escaped twice) -> ``\frac{1}{2}``; other texts unchanged."""
    if not _DOUBLED_COMMAND_RE.search(s):
        return s
    if _SINGLE_COMMAND_RE.search(s):  # mixed: only well-known commands lose their extra backslash
        return _DOUBLED_KNOWN_RE.sub(r"\\", s)
    return re.sub(r"\\+", lambda m: "\\" * max(1, len(m.group(0)) // 2), s)


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
    """Remove ``{...}``/``(...)`` around a whole answer without commas, and brackets around one matrix."""
    for _ in range(8):
        if len(s) >= 2 and s[0] in "({[" and closing_index(s, 0) == len(s) - 1:
            inner = s[1:-1].strip()
            if s[0] == "[" and not re.fullmatch(r"\\begin\{(\w+)\}.*\\end\{\1\}", inner, re.S):
                break
            if not inner or (s[0] == "(" and split_top(inner, ",") != [inner]):
                break
            s = inner
        else:
            break
    return s


@functools.lru_cache(maxsize=16384)
def normalise(s: str) -> str:
    """Canonical LaTeX-ish text of one answer (see the module docstring)."""
    for k, v in _UNICODE.items():
        if k in s:
            s = s.replace(k, v)
    s = _undouble_backslashes(s)
    if _TRIG_RE.search(s):
        s = _DEGREES_IN_TRIG.sub(r"(\1\\pi/180)", s)
    s = _apply(_BEFORE_UNITS, s).strip()
    s = _strip_units(_unwrap_text(_strip_units(s)).strip())
    s = _apply(_AFTER_UNITS, s).strip()
    if _DECIMAL_COMMA_RE.fullmatch(s):
        s = s.replace(",", ".")  # 1000,99 and 0,111: a decimal comma (a list would have a space)
    elif _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if any(c.isdigit() or c in "\\()[]{}" for c in s):
        s = _AND_OR_RE.sub(", ", s)
    s = _strip_outer(s)
    if s.startswith("+") and len(s) > 1:
        s = s[1:].lstrip()
    return s


@functools.lru_cache(maxsize=16384)
def key(s: str) -> str:
    """String-comparison key: whitespace removed, single-character ``{}`` groups unwrapped."""
    s = _KEY_GROUP_RE.sub(r"\1\2", _SPACES.sub("", s))
    return s.replace(r"\cdot", "*").replace(r"\times", "*")


# --------------------------------------------------------------------------------------------
# Bracket-aware tokens and splitting
# --------------------------------------------------------------------------------------------

_OPENERS = {"(", "[", "{", r"\{", r"\langle", r"\begin"}
_CLOSERS = {")", "]", "}", r"\}", r"\rangle", r"\end"}


def tokens(s: str) -> list[tuple[int, str]]:
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


def closing_index(s: str, start: int) -> int:
    """Position of the last character of the bracket closing the one at *start* (any shapes), or -1."""
    depth = 0
    for pos, tok in tokens(s[start:]):
        if tok in _OPENERS:
            depth += 1
        elif tok in _CLOSERS:
            depth -= 1
            if depth == 0:
                return start + pos + len(tok) - 1
    return -1


def split_top(s: str, *seps: str) -> list[str]:
    r"""Split *s* on the tokens *seps* where they are outside all brackets and environments."""
    parts, depth, last = [], 0, 0
    for pos, tok in tokens(s):
        if tok in _OPENERS:
            depth += 1
        elif tok in _CLOSERS:
            depth -= 1
        elif depth == 0 and tok in seps:
            parts.append(s[last:pos])
            last = pos + len(tok)
    parts.append(s[last:])
    return [p.strip() for p in parts]


def split_relations(s: str) -> tuple[list[str], list[str]]:
    """Members and relation symbols of a top-level chain ``a = b < c``: (["a", "b", "c"], ["=", "<"])."""
    members, ops, depth, last = [], [], 0, 0
    for pos, tok in tokens(s):
        if tok in _OPENERS:
            depth += 1
        elif tok in _CLOSERS:
            depth -= 1
        elif depth == 0 and tok in RELATIONS:
            members.append(s[last:pos].strip())
            ops.append(tok)
            last = pos + len(tok)
    members.append(s[last:].strip())
    return members, ops


def outer_brackets(s: str) -> tuple[str, str, str] | None:
    """(open, inner, close) when one bracket pair encloses all of *s*."""
    toks = tokens(s)
    if len(toks) < 2 or toks[0][1] not in _OPENERS - {r"\begin"} or toks[-1][1] not in _CLOSERS - {r"\end"}:
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
