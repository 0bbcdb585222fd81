r"""Deciding that two extracted answers are equal: normalisation, a small answer tree, leaf comparison."""
from __future__ import annotations

import functools
import re
import time
from typing import Callable

from .numbers import numbers_close, parse_number

__all__ = ["Context", "answers_equal"]

_MAX_LEAF_CHARS = 400  # longest leaf expression sent to SymPy
_MAX_ITEMS = 256  # longest tuple / answer list compared element by element

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


class Context:
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


def _leaf_equal(pred: str, gold: str, ctx: Context) -> bool:
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
    pn, gn = parse_number(pred), parse_number(gold)
    if pn is not None and gn is not None:
        return numbers_close(pn, gn)
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


def _multiset_equal(preds: list, golds: list, ctx: Context) -> bool:
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


def _equation_equal(p: tuple, g: tuple, ctx: Context) -> bool:
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


def _tree_equal(p: tuple, g: tuple, ctx: Context) -> bool:
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


def _seq_equal(p: tuple, g: tuple, ctx: Context, any_brackets: bool) -> bool:
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



_PLAIN_INT_RE = re.compile(r"-?\d+")


def answers_equal(pred: str, gold: str, ctx: Context) -> bool:
    """Full comparison of two extracted answers."""
    if pred == gold:
        return True
    if _PLAIN_INT_RE.fullmatch(pred) and _PLAIN_INT_RE.fullmatch(gold):
        return int(pred) == int(gold)
    pn, gn = parse_number(pred), parse_number(gold)
    if pn is not None and gn is not None:
        return numbers_close(pn, gn)
    p, g = _normalise(pred), _normalise(gold)
    if not p or not g:
        return False
    if _key(p) == _key(g):
        return True
    return _tree_equal(_parse(p), _parse(g), ctx)

