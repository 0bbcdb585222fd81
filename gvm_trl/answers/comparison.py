r"""Deciding that two extracted answers are equal.

Each answer is normalised (``normalisation.py``) and split into a small tree; only leaf expressions reach
latex2sympy2_extended + SymPy (``symbolic.py``). Equivalence rules (documented decisions):

* Numbers: integers and fractions compare exactly. A decimal matches an exact value when it is that
  value rounded *or truncated* to its own number of places and within 1e-4 relative:
  ``0.3333 == 1/3``, ``125.663 == 40\pi``, but ``0.33 != 1/3``, ``0.3334 != 1/3``, ``26.002 != 26``.
  Mixed numbers: ``2 3/4 == 2\frac34 == 2.75``. ``p\%`` (also "p percent", "pct") matches ``p`` and ``p/100``.
* ``30^\circ == 30``; inside a trigonometric function degrees are radians (``\sin 30^\circ == 1/2``).
  Trailing units, ``\text{}`` wrappers and ``\$`` are ignored.
* Lists: a top-level comma list (also ``;``, "and", "or", ``\quad``) is an unordered multiset;
  ``\{...\}`` is a set; ``a \pm b`` is {a+b, a-b}; tuples and intervals are ordered and their bracket
  shapes must match (``(1,2] != (1,2)``), a plain list against a tuple is compared in order; unions of
  intervals are multisets. ``;`` binds looser than ``,``: ``a=1,b=3;a=4,b=3 == (1,3),(4,3)``.
* Chains ``L = ... = R``: when ``L`` is a label (one term such as ``x``, ``f(x)``, ``|PQ|``,
  ``\frac{XY}{YZ}``, ``A_1:A_2``) or ``R`` is a constant, the answer is ``R``; labels must agree when both
  sides have one (``y``, ``f(x)`` and ``g(x)`` are interchangeable, ``u`` and ``v`` are not). Otherwise an
  equation matches an equation whose ``lhs - rhs`` is a non-zero constant multiple of its own.
  ``a \approx b`` matches either its exact part ``a`` or its value ``b``.
* Relations: ``\geq``, ``>=``, ``≥``, ``\ge`` are one symbol; a one-variable relation is its interval
  set (``7 \geq t == t \leq 7 == (-\infty, 7]``, ``-2y < 4 == y > -2``, ``1 \le |w| \le 2 == [-2,-1] \cup
  [1,2]``); other relations match when ``lhs - rhs`` is a positive multiple (a non-zero one for ``\neq``).
* Matrices in any environment compare entrywise (a row or column also matches a tuple); ``vmatrix`` is
  its determinant; sums, products and scalar multiples of written-out matrices are evaluated.
* Ratios ``a:b`` match proportional ratios; clock times ``h:mm[:ss]`` (with a.m./p.m.) compare as times.
* Plain words compare case-insensitively; other single letters are case-sensitive; a number with a
  subscript (``204_5``, a base) is compared literally.
* Symbolic leaves: closed forms compare exactly or by their difference at adaptive precision; with
  variables, ``expand(a - b) == 0`` or exact agreement at three rational points (variables are positive
  reals), which also decides identities such as ``\sin^2 x + \cos^2 x == 1``; variables that appear on
  one side only must vanish from the difference.
"""
from __future__ import annotations

import functools
import re
import time
from fractions import Fraction
from typing import Callable

from .normalisation import key, normalise, outer_brackets, split_relations, split_top, tokens
from .numbers import numbers_close, parse_number
from .screening import clearly_different, clearly_not_proportional

__all__ = ["Context", "answers_equal"]

_MAX_LEAF_CHARS = 400  # longest leaf expression sent to SymPy
_MAX_ITEMS = 256  # longest tuple / answer list compared element by element
_CMD_RE = re.compile(r"\\[A-Za-z]+")
_WORDS_RE = re.compile(r"[A-Za-z]+(?:[ '\-][A-Za-z]+)*")
_VARIABLE_RE = re.compile(r"([A-Za-z])(?:_\{?\s*([A-Za-z0-9]+)\s*\}?)?")
_PLAIN_INT_RE = re.compile(r"-?\d+")
_BARE_NAME_RE = re.compile(r"-?\s*(?![ei]$)[A-Za-z](?:_\{?\w+\}?)?")  # not the constants e, i
_MATRIX_ENV_RE = re.compile(
    r"\\begin\{([pbvBV]?matrix|smallmatrix|array)\}(?:\{[^{}]*\})?(.*?)\\end\{\1\}", re.S
)
_TIME_RE = re.compile(r"(\d{1,2}):([0-5]\d)(?::([0-5]\d))?\s*(?:([ap])\.?\s*m\.?)?", re.I)
_FUNCTION_LABEL_RE = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?\([^()]*\)|y")
_SUBJECT_RE = re.compile(
    r"(-?)\s*(\d+(?:\.\d+)?|\\frac\{\d+\}\{\d+\})?\s*"
    r"(\|[^|]+\||[A-Za-z](?:_\{?\w+\}?)?(?:\([^()]*\))?|\\[a-z]+)"
)
_SIGN_FLIP = {"<": ">", ">": "<", r"\leq": r"\geq", r"\geq": r"\leq", r"\neq": r"\neq", "=": "="}


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


# --------------------------------------------------------------------------------------------
# Answer trees
# --------------------------------------------------------------------------------------------


def _expand_pm(s: str) -> list[str]:
    r"""``a \pm b`` -> [``a + b``, ``a - b``] (one top-level ``\pm``/``\mp``), else [s]."""
    toks = [(p, t) for p, t in tokens(s) if t in (r"\pm", r"\mp")]
    if len(toks) != 1 or split_top(s, toks[0][1]) == [s]:
        return [s]
    pos, tok = toks[0]
    signs = ("+", "-") if tok == r"\pm" else ("-", "+")
    return [s[:pos] + sign + s[pos + len(tok) :] for sign in signs]


def _variable_letters(s: str) -> frozenset[str]:
    """Variable names (letter + simple subscript) outside ``\\commands``; ``e``, ``i`` are constants."""
    names = _VARIABLE_RE.findall(_CMD_RE.sub(" ", s))
    return frozenset(letter + sub for letter, sub in names if letter + sub not in ("e", "i"))


def _is_constant(s: str) -> bool:
    """No variables (a matrix of numbers counts as constant)."""
    s = re.sub(r"\\(?:begin|end)\{[^{}]*\}(?:\{[^{}]*\})?|\\mod|\\binom|\\frac|\\sqrt", " ", s)
    return not _variable_letters(s)


def _is_label(side: str) -> bool:
    r"""A name-like left side (one term): ``x``, ``f(x)``, ``|PQ|``, ``\frac{XY}{YZ}``, ``(p, q)``, ``A_1:A_2``."""
    side = side.strip()
    if not side or len(side) > 60 or parse_number(side) is not None or not _variable_letters(side):
        return False
    return len(split_top(side.lstrip("-"), "+", "-", r"\pm")) == 1


def _labels_compatible(a: str, b: str) -> bool:
    if key(a) == key(b):
        return True
    fa, fb = _FUNCTION_LABEL_RE.fullmatch(key(a)), _FUNCTION_LABEL_RE.fullmatch(key(b))
    return bool(fa and fb)


def _chain(members: list[str], ops: list[str], depth: int) -> tuple:
    """Tree of a relation chain: approximation alternatives, a (labelled) equation, or a relation."""
    if r"\approx" in ops:
        cut = ops.index(r"\approx")
        exact = "".join(m + " " + o + " " for m, o in zip(members[:cut], ops[:cut])) + members[cut]
        exact_number, value_number = parse_number(members[cut]), parse_number(members[-1])
        if exact_number is not None and value_number is not None:
            scale = max(abs(exact_number.value), abs(value_number.value))
            if abs(exact_number.value - value_number.value) > scale / 100:
                return _parse(exact, depth + 1)  # "7 \approx 8" is not two chances
        alternatives = [_parse(members[-1], depth + 1), _parse(exact, depth + 1)]
        return ("alt", alternatives)
    if any(not m for m in members):
        return ("leaf", " ".join(m + " " + o for m, o in zip(members, ops + [""])).strip())
    if all(op == "=" for op in ops):
        first, last = members[0], members[-1]
        label = first if _is_label(first) else None
        has_value = label is not None or (_is_constant(last) and (_is_constant(first) or len(members) > 2))
        value = _parse(last, depth + 1) if has_value else None
        return ("eq", label, value, first, last)
    return ("rel", members, ops)


def _solutions(node: tuple) -> tuple:
    """``p = 5, q = 2, p = 7, q = 2`` (labels repeating in blocks) -> the set of the two solutions."""
    items = node[1]
    labels = [key(it[1]) if it[0] == "eq" and it[1] is not None and it[2] is not None else None for it in items]
    if None in labels or len(set(labels)) < 2 or len(set(labels)) == len(labels):
        return node
    size = len(set(labels))
    if len(labels) % size or any(labels[i] != labels[i % size] for i in range(len(labels))):
        return node
    groups = [("set", items[i : i + size], size) for i in range(0, len(items), size)]
    return ("set", groups, len(groups))


def _matrix_rows(body: str) -> list[list[str]]:
    rows = [r for r in re.split(r"\\\\", body.replace(r"\hline", " ")) if r.strip()]
    return [[c.strip() for c in r.split("&")] for r in rows]


def _parse(s: str, depth: int = 0) -> tuple:
    """Tree of a normalised answer: leaf, seq, set, union, matrix, eq, rel, alt, ratio."""
    s = s.strip()
    if depth > 8:
        return ("leaf", s)
    parts = split_top(s, ";")
    if len(parts) > 1 and all(parts):
        return ("set", [_parse(p, depth + 1) for p in parts[:_MAX_ITEMS]], len(parts))
    items = split_top(s, ",")
    if len(items) > 1:
        flat = [v for it in items if it for v in _expand_pm(it)]
        return _solutions(("set", [_parse(it, depth + 1) for it in flat[:_MAX_ITEMS]], len(flat)))
    pieces = split_top(s, r"\cup")
    if len(pieces) > 1:
        return ("union", [_parse(p, depth + 1) for p in pieces])
    members, ops = split_relations(s)
    if ops:
        return _chain(members, ops, depth)
    matrix = _matrix_value(s)
    if matrix is not None:
        return matrix
    outer = outer_brackets(s)
    if outer is not None:
        open_tok, inner, close_tok = outer
        inner_items = split_top(inner, ",")
        if len(inner_items) == 1 and split_top(inner, ";") != [inner]:
            inner_items = split_top(inner, ";")
        if open_tok == r"\{":
            flat = [v for it in inner_items if it for v in _expand_pm(it)] if inner else []
            return ("set", [_parse(it, depth + 1) for it in flat[:_MAX_ITEMS]], len(flat))
        if len(inner_items) > 1:
            return ("seq", open_tok, close_tok, [_parse(it, depth + 1) for it in inner_items])
    alternatives = _expand_pm(s)
    if len(alternatives) > 1:
        return ("set", [("leaf", a) for a in alternatives], 2)
    colon = split_top(s, ":")
    if len(colon) > 1 and all(colon) and len(colon) <= 4:
        return ("ratio", colon)
    return ("leaf", s)


# --------------------------------------------------------------------------------------------
# Matrices
# --------------------------------------------------------------------------------------------


def _product_text(a: str, b: str) -> str:
    pa, pb = parse_number(a), parse_number(b)
    if pa is not None and pb is not None and pa.ulp is None and pb.ulp is None:
        return _fraction_text(pa.value * pb.value)
    return f"({a})({b})"


def _sum_text(terms: list[str]) -> str:
    numbers = [parse_number(t) for t in terms]
    if all(n is not None and n.ulp is None for n in numbers):
        return _fraction_text(sum((n.value for n in numbers), Fraction(0)))
    return "+".join(f"({t})" for t in terms)


def _fraction_text(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _determinant_text(rows: list[list[str]]) -> str | None:
    n = len(rows)
    if n == 0 or any(len(r) != n for r in rows) or n > 4:
        return None
    if n == 1:
        return rows[0][0]
    terms = []
    for j in range(n):
        minor = [r[:j] + r[j + 1 :] for r in rows[1:]]
        sub = _determinant_text(minor)
        if sub is None:
            return None
        term = _product_text(rows[0][j], sub)
        terms.append(term if j % 2 == 0 else _product_text("-1", term))
    return _sum_text(terms)


def _matrix_value(s: str) -> tuple | None:
    r"""A matrix answer: one environment, a determinant, or a sum / product / scalar multiple of matrices."""
    if r"\begin" not in s:
        return None
    envs = list(_MATRIX_ENV_RE.finditer(s))
    if not envs:
        return None
    if len(envs) == 1 and envs[0].span() == (0, len(s)):
        rows = _matrix_rows(envs[0].group(2))
        if envs[0].group(1) in ("vmatrix", "Vmatrix"):
            det = _determinant_text(rows)
            return ("leaf", det) if det is not None else None
        return ("matrix", [[_parse(c, 9) for c in row] for row in rows])
    rows = _matrix_expression(s, envs)
    return ("matrix", [[("leaf", c) for c in row] for row in rows]) if rows else None


def _signed_terms(text: str) -> list[tuple[str, str]]:
    """(sign, term) pairs of a top-level sum; a sign right after an operator or bracket belongs to its term."""
    terms, depth, last, sign = [], 0, 0, "+"
    previous = ""
    for pos, tok in tokens(text):
        if tok in "({[":
            depth += 1
        elif tok in ")}]":
            depth -= 1
        elif depth == 0 and tok in "+-" and previous not in ("", "^", "_", r"\cdot", r"\times", "+", "-"):
            terms.append((sign, text[last:pos]))
            sign, last = tok, pos + 1
        if tok.strip():
            previous = tok
    terms.append((sign, text[last:]))
    return [(sg, t) for sg, t in terms if t.strip()]


def _matrix_expression(s: str, envs: list[re.Match]) -> list[list[str]] | None:
    """Entries of a written-out sum of (scalar times) products of matrices, or None."""
    placeholder = []
    last = 0
    for i, m in enumerate(envs):
        placeholder.append(s[last : m.start()])
        placeholder.append(f"\x01{i}\x01")
        last = m.end()
    placeholder.append(s[last:])
    text = "".join(placeholder)
    matrices = [_matrix_rows(m.group(2)) for m in envs]
    if any(m.group(1) in ("vmatrix", "Vmatrix") for m in envs) or len(envs) > 6:
        return None
    if any(len(rows) * max(len(r) for r in rows) > 64 for rows in matrices if rows):
        return None  # written-out products stay small; their entries grow as text
    total = None
    for sign, term in _signed_terms(text):
        if term.lstrip().startswith(("-", "+")):
            term = term.lstrip()
            sign, term = ("-" if (term[0] == "-") != (sign == "-") else "+"), term[1:]
        indices = [int(i) for i in re.findall(r"\x01(\d+)\x01", term)]
        scalar = re.sub(r"\x01\d+\x01|\\cdot|\\times", " ", term).strip()
        if not indices or (scalar and not re.fullmatch(r"[\w\\{}()/.^ ]+", scalar)):
            return None
        product = matrices[indices[0]]
        for index in indices[1:]:
            other = matrices[index]
            if any(len(r) != len(other) for r in product) or len({len(r) for r in other}) != 1:
                return None
            product = [
                [_sum_text([_product_text(row[k], other[k][j]) for k in range(len(other))]) for j in range(len(other[0]))]
                for row in product
            ]
        factor = scalar or "1"
        if sign == "-":
            factor = _negated(factor)
        if factor != "1":
            product = [[_product_text(factor, c) for c in row] for row in product]
        if any(len(c) > _MAX_LEAF_CHARS for row in product for c in row):
            return None
        if total is None:
            total = product
        else:
            if [len(r) for r in total] != [len(r) for r in product]:
                return None
            total = [[_sum_text([a, b]) for a, b in zip(ra, rb)] for ra, rb in zip(total, product)]
    return total


# --------------------------------------------------------------------------------------------
# Relations as interval sets
# --------------------------------------------------------------------------------------------


def _negated(text: str) -> str:
    n = parse_number(text)
    if n is not None and n.ulp is None:
        return _fraction_text(-n.value)
    if text.startswith("-") and len(split_top(text[1:], "+", "-")) == 1:
        return text[1:]
    return f"-({text})"


def _divided(text: str, k: Fraction) -> str:
    if k == 1:
        return text
    n = parse_number(text)
    if n is not None and n.ulp is None:
        return _fraction_text(n.value / k)
    return f"\\frac{{{text}}}{{{_fraction_text(k)}}}"


def _subject(side: str) -> tuple[str, Fraction, bool] | None:
    """(name, coefficient, is_absolute_value) of ``-3y``, ``g(t)``, ``|w|``, ``\\frac12 x``; None otherwise."""
    m = _SUBJECT_RE.fullmatch(side.strip())
    if not m:
        return None
    sign, coef, name = m.groups()
    k = Fraction(1)
    if coef:
        number = parse_number(coef)
        if number is None or number.value == 0:
            return None
        k = number.value
    if sign:
        k = -k
    if name.startswith("\\") and name not in (r"\theta", r"\alpha", r"\beta", r"\lambda", r"\mu", r"\phi"):
        return None
    absolute = name.startswith("|")
    if absolute and k < 0:
        return None
    return (key(name), k, absolute)


def _interval(lo: str, lo_closed: bool, hi: str, hi_closed: bool) -> tuple:
    return ("seq", "[" if lo_closed else "(", "]" if hi_closed else ")", [("leaf", lo), ("leaf", hi)])


def _relation_intervals(members: list[str], ops: list[str]) -> tuple[str, list[tuple]] | None:
    """(subject, intervals) of a one-variable relation (see the module docstring), else None."""
    if any(op in ("=", r"\approx") for op in ops) or len(members) > 3:
        return None
    constant = [_is_constant(m) for m in members]
    if len(members) == 2:
        if constant[0] == constant[1]:
            return None
        side, bound, op = (members[0], members[1], ops[0]) if constant[1] else (members[1], members[0], _SIGN_FLIP[ops[0]])
        subject = _subject(side)
        if subject is None:
            return None
        name, k, absolute = subject
        if k < 0:
            op = _SIGN_FLIP[op]
        c = _divided(bound, abs(k)) if k > 0 else _negated(_divided(bound, -k))
        if absolute:
            if op in ("<", r"\leq"):
                return name, [_interval(_negated(c), op != "<", c, op != "<")]
            if op in (">", r"\geq"):
                return name, [_interval(r"-\infty", False, _negated(c), op != ">"), _interval(c, op != ">", r"\infty", False)]
            return None
        if op == r"\neq":
            return name, [_interval(r"-\infty", False, c, False), _interval(c, False, r"\infty", False)]
        if op in ("<", r"\leq"):
            return name, [_interval(r"-\infty", False, c, op == r"\leq")]
        return name, [_interval(c, op == r"\geq", r"\infty", False)]
    if constant != [True, False, True] or r"\neq" in ops:
        return None
    if all(op in ("<", r"\leq") for op in ops):
        lo, lo_op, hi, hi_op = members[0], ops[0], members[2], ops[1]
    elif all(op in (">", r"\geq") for op in ops):
        lo, lo_op, hi, hi_op = members[2], ops[1], members[0], ops[0]
    else:
        return None
    subject = _subject(members[1])
    if subject is None:
        return None
    name, k, absolute = subject
    lo_closed, hi_closed = lo_op in (r"\leq", r"\geq"), hi_op in (r"\leq", r"\geq")
    lo, hi = _divided(lo, abs(k)), _divided(hi, abs(k))
    if k < 0:
        lo, hi, lo_closed, hi_closed = _negated(hi), _negated(lo), hi_closed, lo_closed
    if absolute:
        return name, [_interval(_negated(hi), hi_closed, _negated(lo), lo_closed), _interval(lo, lo_closed, hi, hi_closed)]
    return name, [_interval(lo, lo_closed, hi, hi_closed)]


def _as_intervals(node: tuple) -> list[tuple] | None:
    """A relation, interval, union of intervals or list of relations as a list of interval nodes."""
    kind = node[0]
    if kind == "rel":
        found = _relation_intervals(node[1], node[2])
        return found[1] if found else None
    if kind == "seq" and len(node[3]) == 2:
        return [node]
    if kind in ("union", "set"):
        out = []
        for item in node[1]:
            part = _as_intervals(item)
            if part is None:
                return None
            out.extend(part)
        return out
    return None


# --------------------------------------------------------------------------------------------
# Leaves
# --------------------------------------------------------------------------------------------


def _is_words(s: str) -> bool:
    """True for plain-word answers ("Evelyn", "no solution", "odd", "No") compared case-insensitively."""
    if not _WORDS_RE.fullmatch(s):
        return False
    return s.casefold() == "no" or max(len(w) for w in re.split(r"[ '\-]", s)) >= 3


def _percent_variants(s: str) -> list[str]:
    """``p%`` -> [p, p/100]; other answers -> [s]."""
    if not s.endswith("%"):
        return [s]
    base = s[:-1].strip()
    if not base:
        return []
    return [base, rf"\frac{{{base}}}{{100}}"]


_REFUSED_IN_SYMPY = re.compile(
    r":=|\\in(?![A-Za-z])|\\operatorname|\\begin|\\end|\\mathbb|=|<|>|\\[lg]eq|\\neq|\\approx|\\sim|\\to(?![A-Za-z])"
    r"|\\cup|\\cap|\\setminus|\\pm|\\mp|%|\\\\|&|\\text|\\mbox|[^\x20-\x7e]|:"
    r"|\d\s*_"  # 204_5: a numeral in another base is compared literally
    r"|'|\d\.\d*\."  # primes (the parser drops them) and malformed numbers such as 3.5.1
)


@functools.lru_cache(maxsize=16384)
def _sympy_ready(s: str) -> str | None:
    """Leaf text rewritten for the LaTeX parser, or None when it must not / cannot be parsed."""
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


def _leaf_equal(pred: str, gold: str, ctx: Context) -> bool:
    """Equivalence of two leaf answers: string, words, percent, numbers, then SymPy."""
    if key(pred) == key(gold):
        return True
    if _is_words(gold) or _is_words(pred):
        return re.sub(r"\W", "", pred).casefold() == re.sub(r"\W", "", gold).casefold()
    if pred.endswith("%") and gold.endswith("%"):
        return _leaf_equal(pred[:-1].strip(), gold[:-1].strip(), ctx)
    if pred.endswith("%") or gold.endswith("%"):
        return any(_leaf_equal(p, g, ctx) for p in _percent_variants(pred) for g in _percent_variants(gold))
    pn, gn = parse_number(pred), parse_number(gold)
    if pn is not None and gn is not None:
        return numbers_close(pn, gn)
    pv, gv = _variable_letters(pred), _variable_letters(gold)
    if not (pv <= gv or gv <= pv) or _BARE_NAME_RE.fullmatch(pred) or _BARE_NAME_RE.fullmatch(gold):
        return False  # different free symbols, or a lone variable against anything else: no SymPy
    p_sym, g_sym = _sympy_ready(pred), _sympy_ready(gold)
    if p_sym is None or g_sym is None:
        return False
    if _same_terms(p_sym, g_sym):
        return True
    if not _is_decimal(p_sym) and not _is_decimal(g_sym) and clearly_different(p_sym, g_sym):
        return False  # the decimal rule (rounded or truncated) is the worker's to apply
    return ctx.run(["leaf", p_sym, g_sym])


_NOT_A_SUM_RE = re.compile(r"\\(?:[bp]?mod|i*nt|oint|sum|prod|lim|partial)(?![A-Za-z])|\\frac\s*\{\s*d")
_COMMAND_THEN_LETTER_RE = re.compile(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])")
_DANGLING_RE = re.compile(r"(?:[-+*/^_(\[{]|\\(?:cdot|times|div))\s*$")


def _sum_terms(s: str) -> list[tuple[bool, str]] | None:
    """(negated, key) of each top-level term of a sum written out, or None when it is not one."""
    if _NOT_A_SUM_RE.search(s):
        return None  # operators whose reach a reordering could change
    terms = []
    for sign, term in _signed_terms(s):
        negated, term = sign == "-", term.strip()
        while term[:1] in ("+", "-"):
            negated, term = negated != (term[0] == "-"), term[1:].lstrip()
        if not term or term[0] in "*/^_)]}" or term.startswith(("\\cdot", "\\times", "\\div")) or _DANGLING_RE.search(term):
            return None
        terms.append((negated, key(_COMMAND_THEN_LETTER_RE.sub(r"\1{}", term))))  # \sin x is not \sinx
    return terms if len(terms) > 1 else None


@functools.lru_cache(maxsize=16384)
def _sorted_terms(s: str) -> tuple[tuple[bool, str], ...] | None:
    terms = _sum_terms(s)
    return None if terms is None else tuple(sorted(terms))


def _same_terms(pred: str, gold: str) -> bool:
    """The same terms added in another order (``1 + x^2`` and ``x^2 + 1``): equal without SymPy (each leaf's terms
    are found once: a list of n sums is compared in up to n^2 pairs)."""
    p_terms = _sorted_terms(pred)
    return p_terms is not None and p_terms == (_sorted_terms(gold) or ())


def _is_decimal(s: str) -> bool:
    number = parse_number(s)
    return number is not None and number.ulp is not None


def _time_seconds(s: str) -> int | None:
    m = _TIME_RE.fullmatch(s.strip())
    if not m:
        return None
    hours, minutes, seconds, half = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0), m.group(4)
    if half:
        if not 1 <= hours <= 12:
            return None
        hours = hours % 12 + (12 if half.lower() == "p" else 0)
    return hours * 3600 + minutes * 60 + seconds


def _ratio_equal(p: list[str], g: list[str], ctx: Context) -> bool:
    """Ratios ``a:b`` (proportional) and clock times ``h:mm[:ss]``."""
    pt, gt = _time_seconds(":".join(p)), _time_seconds(":".join(g))
    if pt is not None and gt is not None:
        return pt == gt
    if len(p) != len(g):
        return False
    if all(_leaf_equal(a, b, ctx) for a, b in zip(p, g)):
        return True
    pn, gn = [parse_number(x) for x in p], [parse_number(x) for x in g]
    if all(n is not None and n.ulp is None and n.value != 0 for n in pn + gn):
        scale = gn[0].value / pn[0].value
        return all(b.value == a.value * scale for a, b in zip(pn, gn))
    return False


# --------------------------------------------------------------------------------------------
# Trees
# --------------------------------------------------------------------------------------------


def _tree_key(node: tuple) -> str:
    """Canonical text of a parsed answer (order-free for sets and unions), for cheap exact matching."""
    kind = node[0]
    if kind == "leaf":
        return key(node[1])
    if kind == "seq":
        return f"seq{node[1]}{node[2]}(" + ";".join(map(_tree_key, node[3])) + ")"
    if kind == "matrix":
        return "matrix(" + "//".join(";".join(map(_tree_key, row)) for row in node[1]) + ")"
    if kind == "eq":
        return "eq(" + key(node[3]) + "=" + key(node[4]) + ")"
    if kind == "rel":
        return "rel(" + "".join(key(m) + o for m, o in zip(node[1], node[2] + [""])) + ")"
    if kind == "ratio":
        return "ratio(" + ":".join(map(key, node[1])) + ")"
    keys = [_tree_key(n) for n in node[1]]
    return f"{kind}(" + ";".join(sorted(keys) if kind in ("set", "union", "alt") else keys) + ")"


def _distinct(items: list) -> list:
    seen, out = set(), []
    for item in items:
        k = _tree_key(item)
        if k not in seen:
            seen.add(k)
            out.append(item)
    return out


def _labels_of(items: list) -> list[str] | None:
    """The labels of a list of labelled equations (``a = 9, b = 2``) when they are distinct, else None."""
    labels = [key(it[1]) if it[0] == "eq" and it[1] is not None and it[2] is not None else None for it in items]
    return labels if None not in labels and len(set(labels)) == len(labels) else None


def _set_equal(preds: list, golds: list, ctx: Context) -> bool:
    """Answer lists as sets: a repeated item counts once (an answer listing a solution twice is not wrong)."""
    p_labels, g_labels = _labels_of(preds), _labels_of(golds)
    if p_labels is not None and g_labels is not None and set(p_labels) == set(g_labels):
        by_label = dict(zip(g_labels, golds))
        return all(_tree_equal(p[2], by_label[k][2], ctx) for k, p in zip(p_labels, preds))
    if _multiset_equal(preds, golds, ctx):
        return True
    distinct_p, distinct_g = _distinct(preds), _distinct(golds)
    if (len(distinct_p), len(distinct_g)) == (len(preds), len(golds)):
        return False
    preds, golds = distinct_p, distinct_g
    if len(preds) == len(golds):
        return _multiset_equal(preds, golds, ctx)
    if max(len(preds), len(golds)) > 16:
        return False
    return all(any(_tree_equal(p, g, ctx) for g in golds) for p in preds) and all(
        any(_tree_equal(p, g, ctx) for p in preds) for g in golds
    )


def _multiset_equal(preds: list, golds: list, ctx: Context) -> bool:
    """Match two answer lists: identical items first, then greedily."""
    if len(preds) != len(golds) or len(golds) > _MAX_ITEMS:
        return False
    unused = list(golds)
    unused_keys = [_tree_key(g) for g in unused]
    pending = []
    for p in preds:
        k = _tree_key(p)
        if k in unused_keys:
            index = unused_keys.index(k)
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
    """Two equations: compatible labels and equal values, else proportional ``lhs - rhs``."""
    _, p_label, p_value, p_lhs, p_rhs = p
    _, g_label, g_value, g_lhs, g_rhs = g
    if p_label is not None and g_label is not None and _labels_compatible(p_label, g_label):
        if p_value is not None and g_value is not None and _tree_equal(p_value, g_value, ctx):
            return True
    if p_label is None and g_label is None and p_value is not None and g_value is not None:
        if _tree_equal(p_value, g_value, ctx):
            return True
    if key(p_lhs) == key(g_lhs) and (p_value is not None or g_value is not None):
        return False  # the same left side with different values: no multiple of one is the other
    return _proportional(p_lhs, p_rhs, g_lhs, g_rhs, "any", ctx)


def _proportional(l1: str, r1: str, l2: str, r2: str, sign: str, ctx: Context) -> bool:
    """``l1 - r1`` is a constant multiple of ``l2 - r2`` (positive when *sign* is "positive")."""
    if _variable_letters(l1 + " " + r1) != _variable_letters(l2 + " " + r2):
        return False
    parts = [_sympy_ready(x) for x in (l1, r1, l2, r2)]
    if any(x is None for x in parts):
        return False
    if clearly_not_proportional(*parts):
        return False
    return ctx.run(["eq", *parts, sign])


def _relation_equal(p: tuple, g: tuple, ctx: Context) -> bool:
    """Two relations: same interval set, else proportional sides with the same symbol."""
    pi, gi = _relation_intervals(p[1], p[2]), _relation_intervals(g[1], g[2])
    if pi is not None and gi is not None:
        return pi[0] == gi[0] and _multiset_equal(pi[1], gi[1], ctx)
    if len(p[1]) == 2 and len(g[1]) == 2:
        (pl, pr), (gl, gr) = p[1], g[1]
        pop, gop = p[2][0], g[2][0]
        if pop in (">", r"\geq"):
            pl, pr, pop = pr, pl, _SIGN_FLIP[pop]
        if gop in (">", r"\geq"):
            gl, gr, gop = gr, gl, _SIGN_FLIP[gop]
        if pop != gop:
            return False
        return _proportional(pl, pr, gl, gr, "any" if pop == r"\neq" else "positive", ctx)
    if p[2] != g[2] or len(p[1]) != len(g[1]):
        return False
    return all(_tree_equal(_parse(a, 9), _parse(b, 9), ctx) for a, b in zip(p[1], g[1]))


def _labelled_values(node: tuple) -> list[tuple] | None:
    """The values of a list of labelled equations with distinct labels (``m = 6, n = 1``), else None."""
    if node[0] != "set" or not node[1]:
        return None
    labels, values = [], []
    for item in node[1]:
        if item[0] != "eq" or item[1] is None or item[2] is None:
            return None
        labels.append(key(item[1]))
        values.append(item[2])
    return values if len(set(labels)) == len(labels) else None


def _tree_equal(p: tuple, g: tuple, ctx: Context) -> bool:
    """Structural equivalence of two parsed answers."""
    if ctx.remaining() <= 0:
        return False
    if p[0] == "alt" or g[0] == "alt":
        pa = p[1] if p[0] == "alt" else [p]
        ga = g[1] if g[0] == "alt" else [g]
        return any(_tree_equal(a, b, ctx) for a in pa for b in ga)
    if p[0] == "eq" and g[0] == "eq":
        return _equation_equal(p, g, ctx)
    if g[0] == "eq":
        return g[2] is not None and _tree_equal(p, g[2], ctx)
    if p[0] == "eq":
        return p[2] is not None and _tree_equal(p[2], g, ctx)
    if p[0] == "rel" and g[0] == "rel":
        return _relation_equal(p, g, ctx)
    if p[0] == "rel" or g[0] == "rel":
        pi, gi = _as_intervals(p), _as_intervals(g)
        return pi is not None and gi is not None and _multiset_equal(pi, gi, ctx)
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
        if max(p[2], g[2]) <= _MAX_ITEMS and _set_equal(p[1], g[1], ctx):
            return True
        return _union_of_relations_equal(p, g, ctx)
    if p[0] == "set" and g[0] not in ("set", "seq", "union") and len(p[1]) == p[2]:
        return all(_tree_equal(item, g, ctx) for item in p[1])  # one value written several ways
    if g[0] == "set" and p[0] not in ("set", "seq", "union") and len(g[1]) == g[2]:
        return all(_tree_equal(p, item, ctx) for item in g[1])
    if (p[0], g[0]) in (("set", "seq"), ("seq", "set")):
        return _list_vs_tuple(p, g, ctx)
    if (p[0], g[0]) in (("set", "union"), ("union", "set")):
        return _union_of_relations_equal(p, g, ctx)
    if p[0] == "union" and g[0] == "union":
        return _multiset_equal(p[1], g[1], ctx)
    if p[0] == "seq" and g[0] == "seq":
        return _seq_equal(p, g, ctx, False)
    if p[0] == "ratio" and g[0] == "ratio":
        return _ratio_equal(p[1], g[1], ctx)
    if p[0] == "leaf" and g[0] == "leaf":
        return _leaf_equal(p[1], g[1], ctx)
    return False


def _union_of_relations_equal(p: tuple, g: tuple, ctx: Context) -> bool:
    """A list of relations ("x < 1 or x > 4") against a union of intervals or another such list."""
    if not any(item[0] == "rel" for node in (p, g) for item in node[1]):
        return False
    pi, gi = _as_intervals(p), _as_intervals(g)
    return pi is not None and gi is not None and _multiset_equal(pi, gi, ctx)


def _list_vs_tuple(p: tuple, g: tuple, ctx: Context) -> bool:
    """A plain list (or labelled equations) against a tuple, item by item in the written order."""
    plain, tup = (p, g) if p[0] == "set" else (g, p)
    items = _labelled_values(plain) or plain[1]
    if plain[2] != len(items) or len(items) != len(tup[3]):
        return False
    pairs = zip(items, tup[3]) if plain is p else zip(tup[3], items)
    return all(_tree_equal(a, b, ctx) for a, b in pairs)


def _seq_equal(p: tuple, g: tuple, ctx: Context, any_brackets: bool) -> bool:
    """Ordered tuples / intervals: same bracket shapes (unless *any_brackets*), equal items in order."""
    if not any_brackets and (p[1], p[2]) != (g[1], g[2]):
        return False
    return len(p[3]) == len(g[3]) <= _MAX_ITEMS and all(_tree_equal(a, b, ctx) for a, b in zip(p[3], g[3]))


def answers_equal(pred: str, gold: str, ctx: Context) -> bool:
    """Full comparison of two extracted answers."""
    if pred == gold:
        return True
    if _PLAIN_INT_RE.fullmatch(pred) and _PLAIN_INT_RE.fullmatch(gold):
        return int(pred) == int(gold)
    pn, gn = parse_number(pred), parse_number(gold)
    if pn is not None and gn is not None:
        return numbers_close(pn, gn)
    p, g = normalise(pred), normalise(gold)
    if not p or not g:
        return False
    if key(p) == key(g):
        return True
    return _tree_equal(_parse(p), _parse(g), ctx)
