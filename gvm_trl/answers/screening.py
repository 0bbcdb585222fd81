r"""Rejecting unequal leaf expressions in-process, before they reach SymPy.

latex2sympy2_extended's grammar costs tens of milliseconds per expression, and most leaves that reach SymPy are
wrong answers. ``clearly_different`` reads a plain arithmetic subset of LaTeX with its own small parser
(numbers, letters with subscripts, Greek letters, ``\pi``, ``e``, ``i``, brackets, ``+ - * / \cdot \times
\div``, juxtaposition, powers, ``\frac``, ``\sqrt``, ``\exp``, ``\ln``, ``\log``, trigonometric and
hyperbolic functions, floor and ceiling) and evaluates both sides at the first sample point that the SymPy
worker would use (``clearly_not_proportional`` does the same for two equations at its first two points).
Every value carries a bound on its rounding error (a disk around a complex number), so the two answers
are declared different only when the disks are clearly apart. Anything outside the subset, or any value
near a branch cut, a pole or an overflow, decides nothing and is left to SymPy.

The parser follows the precedence of the worker's parser (latex2sympy2_extended, ``symbolic.py``) where the two could differ: juxtaposition binds tighter
than ``/`` (``a/bc`` is ``a/(bc)``), an argument written without parentheses runs over a product of
juxtaposed factors (``\sin 2x`` is ``sin(2x)``), ``\log`` is base 10, ``i`` and ``I`` are the imaginary
unit and ``e`` is Euler's number. Where that parser reads more into the text than a product (a letter
followed by parentheses is a function, ``dx`` is one symbol), the product read here is one instance of
that reading, so values that differ here differ there too. Forms whose reading is doubtful
(``\frac{d}{dx}``, ``x^23``, ``\sin x \cdot y``, ``a^{b}^{c}``) are refused. Nothing here executes text:
it is read character by character.
"""
from __future__ import annotations

import cmath
import functools
import math
import re
from fractions import Fraction

__all__ = ["clearly_different", "clearly_not_proportional", "value_at_sample_point"]

_MAX_CHARS = 400
_MAX_NODES = 600
_EPS = 2.0**-52
_HUGE = 1e150
_RELATIVE_GAP = 1e-6  # stricter than the worker's own first-point test (1e-8)
_TINY_SCALE = 1e-6  # values this small are left to SymPy, as the worker does
# the worker's sample values (symbolic._SAMPLE_VALUES) for its first point
_SAMPLE_VALUES = ((17, 7), (143, 11), (419, 13), (1009, 17), (73, 29), (2311, 23))

_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
    "kappa", "lambda", "mu", "nu", "xi", "rho", "varrho", "sigma", "tau", "upsilon", "phi", "varphi", "chi",
    "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Pi", "Sigma", "Upsilon", "Phi", "Psi", "Omega",
}
_SYMBOL_COMMANDS = {"hbar", "ell"}
_ACCENTS = {"dot": "dot", "ddot": "ddot", "bar": "bar", "hat": "hat", "tilde": "tilde", "vec": "vec", "overline": "bar"}
_FUNCTIONS = {"sin", "cos", "tan", "cot", "sec", "csc", "sinh", "cosh", "tanh", "exp", "ln", "log"}
_PRODUCT_OPS = {"*", "\\cdot", "\\times"}
_DIVISION_OPS = {"/", "\\div"}
_BRACKET_FUNCTIONS = {"\\lfloor": ("floor", "\\rfloor"), "\\lceil": ("ceil", "\\rceil")}
_STOPS = {"+", "-", ")", "]", "}", "^", "_", "\\rfloor", "\\rceil"}
_TOKEN_RE = re.compile(r"\\[A-Za-z]+|\d+(?:\.\d+)?|\S")
_DOUBTFUL_RE = re.compile(r"\\frac\s*\{\s*d|\\\\|\\[{}]")


class _Refused(Exception):
    """The text is outside the subset, or a value cannot be bounded."""


# --------------------------------------------------------------------------------------------
# Parsing into a small tree
# --------------------------------------------------------------------------------------------


class _Parser:
    """Recursive descent over tokens; nodes are tuples (see ``_evaluate``)."""

    def __init__(self, text: str):
        self.tokens = _TOKEN_RE.findall(text)
        self.pos = 0
        self.nodes = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise _Refused
        self.pos += 1
        return token

    def node(self, *parts) -> tuple:
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise _Refused
        return parts

    def parse(self) -> tuple:
        tree = self.sum()
        if self.peek() is not None:
            raise _Refused
        return tree

    def sum(self) -> tuple:
        terms = [(1, self.product())]
        while self.peek() in ("+", "-"):
            sign = 1 if self.take() == "+" else -1
            terms.append((sign, self.product()))
        return terms[0][1] if len(terms) == 1 and terms[0][0] == 1 else self.node("sum", terms)

    def product(self) -> tuple:
        """Explicit ``* / \\cdot \\times \\div``, left to right, over signed juxtapositions."""
        left = self.signed()
        while self.peek() in _PRODUCT_OPS or self.peek() in _DIVISION_OPS:
            op = self.take()
            right = self.signed()
            left = self.node("mul", [left, right]) if op in _PRODUCT_OPS else self.node("div", left, right)
        return left

    def signed(self) -> tuple:
        if self.peek() in ("+", "-"):
            sign = self.take()
            inner = self.signed()
            return inner if sign == "+" else self.node("neg", inner)
        return self.juxtaposition(allow_functions=True)

    def juxtaposition(self, allow_functions: bool) -> tuple:
        factors = [self.factor(allow_functions)]
        while self.starts_factor(allow_functions):
            factors.append(self.factor(allow_functions))
        return factors[0] if len(factors) == 1 else self.node("mul", factors)

    def starts_factor(self, allow_functions: bool) -> bool:
        token = self.peek()
        if token is None or token in _STOPS or token in _PRODUCT_OPS | _DIVISION_OPS:
            return False
        if (token.startswith("\\") and token[1:] in _FUNCTIONS) or token in ("e", "\\sqrt"):
            return allow_functions  # the parser lets these start an argument without parentheses, not extend one
        return True

    def factor(self, allow_functions: bool) -> tuple:
        base = self.atom(allow_functions)
        if self.peek() == "^":
            self.take()
            base = self.node("pow", base, self.exponent())
            if self.peek() in ("^", "_"):
                raise _Refused  # a^{b}^{c} and x^{y}_{1} read oddly in the parser
        return base

    def exponent(self) -> tuple:
        token = self.peek()
        if token == "{":
            return self.group("{", "}")
        if token is None:
            raise _Refused
        if token[0].isdigit():
            self.take()
            if "." in token or len(token) > 1:
                raise _Refused  # x^23 is x**23 there, x^2 3 in LaTeX
            return self.node("num", token)
        if len(token) == 1 and token.isalpha():
            self.take()
            if self.peek() == "_":
                raise _Refused
            return self.node("const", {"e": "e", "i": "i", "I": "i"}[token]) if token in "eiI" else self.node("var", token)
        if token == "\\pi":
            self.take()
            return self.node("const", "pi")
        raise _Refused

    def group(self, opening: str, closing: str) -> tuple:
        self.take(opening)
        inner = self.sum()
        self.take(closing)
        return inner

    def subscript_name(self) -> str:
        """The text of a subscript as latex2sympy2_extended names it (``x_0``, ``x_{10}``)."""
        self.take("_")
        token = self.take()
        if token == "{":
            depth, parts = 1, []
            while True:
                token = self.take()
                depth += token == "{"
                depth -= token == "}"
                if depth == 0:
                    break
                parts.append(token)
            text = "".join(parts)
        elif token.isalnum():
            text = token
        else:
            raise _Refused
        if not text or not re.fullmatch(r"[A-Za-z0-9+\-]+", text):
            raise _Refused
        return "_" + text if len(text) == 1 else "_{" + text + "}"

    def named(self, name: str) -> tuple:
        if self.peek() == "_":
            name += self.subscript_name()
        return self.node("var", name)

    def atom(self, allow_functions: bool) -> tuple:
        token = self.take()
        if token[0].isdigit():
            if self.peek() is not None and self.peek()[0].isdigit():
                raise _Refused  # "2 3": digits apart, probably a thousands separator
            return self.node("num", token)
        if token == "(":
            return self.group_after("(", ")")
        if token == "[":
            return self.group_after("[", "]")
        if token == "{":
            return self.group_after("{", "}")
        if len(token) == 1 and token.isalpha():
            if token in "eiI":
                if self.peek() == "_" or (token == "I" and self.peek() == "^"):
                    raise _Refused  # the parser drops a power of I
                return self.node("const", {"e": "e", "i": "i", "I": "i"}[token])
            return self.named(token)
        if not token.startswith("\\"):
            raise _Refused
        command = token[1:]
        if command == "pi":
            return self.node("const", "pi")
        if command in _GREEK or command in _SYMBOL_COMMANDS:
            return self.named(command)  # latex2sympy2_extended drops the backslash: \hbar is the symbol hbar
        if command in _ACCENTS:
            self.take("{")
            letter = self.take()
            self.take("}")
            if not re.fullmatch(r"[A-Za-z]|\\[A-Za-z]+", letter):
                raise _Refused
            return self.named(_ACCENTS[command] + "{" + letter + "}")  # \overline{x} is bar{x} there
        if token in _BRACKET_FUNCTIONS:
            name, closing = _BRACKET_FUNCTIONS[token]
            self.pos -= 1
            return self.node(name, self.group(token, closing))
        if command == "frac":
            numerator = self.group("{", "}")
            return self.node("div", numerator, self.group("{", "}"))
        if command == "sqrt":
            index = self.group("[", "]") if self.peek() == "[" else None
            return self.node("root", self.group("{", "}"), index)
        if command in _FUNCTIONS and allow_functions:
            return self.function(command)
        raise _Refused

    def group_after(self, opening: str, closing: str) -> tuple:
        self.pos -= 1
        return self.group(opening, closing)

    def function(self, name: str) -> tuple:
        power = None
        base = None
        if name == "log" and self.peek() == "_":
            self.take()
            base = self.group("{", "}") if self.peek() == "{" else self.atom(allow_functions=False)
        if self.peek() == "^":
            self.take()
            token = self.take()
            if token == "{":
                token = self.take()
                self.take("}")
            if not token.isdigit() or "." in token:
                raise _Refused  # \sin^{-1} is the inverse function
            power = int(token)
        if self.peek() == "(":
            argument = self.group("(", ")")
        else:
            if self.peek() is None or (self.peek().startswith("\\") and self.peek()[1:] in _FUNCTIONS):
                raise _Refused
            if self.peek() in ("+", "-"):
                raise _Refused
            argument = self.juxtaposition(allow_functions=False)
            if self.peek() in _PRODUCT_OPS or self.peek() in _DIVISION_OPS:
                raise _Refused  # \sin x / 2 is sin(x/2) there: too easy to misread
        applied = self.node("func", name, argument, base)
        if power is not None:
            applied = self.node("pow", applied, self.node("num", str(power)))
        return applied


@functools.lru_cache(maxsize=8192)
def _tree(text: str) -> tuple | None:
    """Parse tree of a leaf (cached: the gold repeats across completions), or None outside the subset."""
    if len(text) > _MAX_CHARS or _DOUBTFUL_RE.search(text):
        return None
    try:
        return _Parser(text).parse()
    except (_Refused, RecursionError):
        return None


def _variables(tree: tuple, out: set) -> set:
    kind = tree[0]
    if kind == "var":
        out.add(tree[1])
    elif kind == "sum":
        for _, term in tree[1]:
            _variables(term, out)
    elif kind == "mul":
        for factor in tree[1]:
            _variables(factor, out)
    else:
        for part in tree[1:]:
            if isinstance(part, tuple):
                _variables(part, out)
    return out


# --------------------------------------------------------------------------------------------
# Evaluation with error bounds: (z, r) is the disk of radius r around the complex number z
# --------------------------------------------------------------------------------------------


def _rounded(z: complex, r: float) -> tuple[complex, float]:
    size = abs(z)
    if not (size < _HUGE and r < _HUGE) or z != z:
        raise _Refused
    return z, r + 4 * _EPS * size + 1e-300


def _add(a, b):
    return _rounded(a[0] + b[0], a[1] + b[1])


def _mul(a, b):
    (za, ra), (zb, rb) = a, b
    return _rounded(za * zb, abs(za) * rb + abs(zb) * ra + ra * rb)


def _inverse(b):
    zb, rb = b
    size = abs(zb)
    if size <= 2 * rb or size == 0:
        raise _Refused  # a pole may lie in the disk
    return _rounded(1 / zb, rb / (size * (size - rb)))


def _clear_of_branch_cut(a) -> bool:
    """The disk avoids zero and the negative real axis (where log, sqrt and powers jump)."""
    z, r = a
    return z.real - r > 0 or abs(z.imag) - r > 0


def _log(a):
    z, r = a
    if not _clear_of_branch_cut(a):
        raise _Refused
    value = cmath.log(z)
    return _rounded(value, r / (abs(z) - r) + 4 * _EPS * max(1.0, abs(value)))


def _exp(a):
    z, r = a
    if z.real + r > 300 or r > 1:
        raise _Refused
    value = cmath.exp(z)
    return _rounded(value, abs(value) * math.expm1(r) + 4 * _EPS * abs(value))


def _root(a, degree: int):
    z, r = a
    if z == 0 and r == 0:
        return a
    if not _clear_of_branch_cut(a):
        raise _Refused
    if degree == 2:
        value = cmath.sqrt(z)
        return _rounded(value, r / (2 * math.sqrt(abs(z) - r)) + 4 * _EPS * abs(value))
    return _exp(_mul(_log(a), (1 / degree, _EPS / degree)))


def _integer_power(a, n: int):
    result, base = (1 + 0j, 0.0), a
    for bit in bin(abs(n))[2:]:
        result = _mul(result, result)
        if bit == "1":
            result = _mul(result, base)
    return _inverse(result) if n < 0 else result


def _integer_literal(tree: tuple) -> int | None:
    """The value of an exponent written as an integer (``2``, ``-3``), else None."""
    sign = 1
    if tree[0] == "neg":
        sign, tree = -1, tree[1]
    if tree[0] == "num" and "." not in tree[1] and len(tree[1]) <= 4:
        return sign * int(tree[1])
    return None


def _power(tree: tuple, point: dict):
    base_tree, exponent_tree = tree[1], tree[2]
    a = _evaluate(base_tree, point)
    n = _integer_literal(exponent_tree)
    if n is not None and abs(n) <= 1024:
        return _integer_power(a, n)
    b = _evaluate(exponent_tree, point)
    if base_tree == ("const", "e"):
        return _exp(b)
    return _exp(_mul(b, _log(a)))


def _trig(name: str, a):
    z, r = a
    if abs(z.imag) + r > 300 or r > 1:
        raise _Refused
    growth = math.cosh(abs(z.imag) + r)  # bounds |sin'| and |cos'| on the disk
    sine = _rounded(cmath.sin(z), r * growth + 4 * _EPS * growth)
    cosine = _rounded(cmath.cos(z), r * growth + 4 * _EPS * growth)
    if name == "sin":
        return sine
    if name == "cos":
        return cosine
    if name == "tan":
        return _mul(sine, _inverse(cosine))
    if name == "cot":
        return _mul(cosine, _inverse(sine))
    return _inverse(cosine if name == "sec" else sine)


def _hyperbolic(name: str, a):
    up, down = _exp(a), _exp((-a[0], a[1]))
    if name == "sinh":
        return _mul(_add(up, (-down[0], down[1])), (0.5, 0.0))
    if name == "cosh":
        return _mul(_add(up, down), (0.5, 0.0))
    return _mul(_add(up, (-down[0], down[1])), _inverse(_add(up, down)))


def _step(kind: str, inner: tuple, point: dict):
    """floor / ceiling of a real value whose disk holds no integer (else no decision)."""
    if _mentions_imaginary_unit(inner):
        raise _Refused  # floor(a + bi) is floor(a) + floor(b) i: a lost tiny b would matter
    z, r = _evaluate(inner, point)
    if z.imag != 0:
        raise _Refused
    rounding = math.floor if kind == "floor" else math.ceil
    low, high = rounding(z.real - r), rounding(z.real + r)
    if low != high or abs(low) > 2**52:
        raise _Refused
    return complex(low), 0.0


def _mentions_imaginary_unit(tree: tuple) -> bool:
    if tree == ("const", "i"):
        return True
    parts = [t for _, t in tree[1]] if tree[0] == "sum" else tree[1] if tree[0] == "mul" else tree[1:]
    return any(isinstance(p, tuple) and _mentions_imaginary_unit(p) for p in parts)


_LN10 = (complex(math.log(10)), 4 * _EPS * math.log(10))


def _number(text: str):
    value = float(text)
    exact = "." not in text and value < 2.0**53
    return _rounded(complex(value), 0.0 if exact else 4 * _EPS * value)


def _evaluate(tree: tuple, point: dict):
    kind = tree[0]
    if kind == "num":
        return _number(tree[1])
    if kind == "var":
        return point[tree[1]]
    if kind == "const":
        if tree[1] == "i":
            return 1j, 0.0
        return _rounded(complex(math.pi if tree[1] == "pi" else math.e), 0.0)
    if kind == "sum":
        total = (0j, 0.0)
        for sign, term in tree[1]:
            z, r = _evaluate(term, point)
            total = _add(total, (z if sign > 0 else -z, r))
        return total
    if kind == "mul":
        result = (1 + 0j, 0.0)
        for factor in tree[1]:
            result = _mul(result, _evaluate(factor, point))
        return result
    if kind == "div":
        return _mul(_evaluate(tree[1], point), _inverse(_evaluate(tree[2], point)))
    if kind == "neg":
        z, r = _evaluate(tree[1], point)
        return -z, r
    if kind == "pow":
        return _power(tree, point)
    if kind == "root":
        degree = 2 if tree[2] is None else _integer_literal(tree[2])
        if degree is not None and 2 <= degree <= 64:
            return _root(_evaluate(tree[1], point), degree)
        return _exp(_mul(_log(_evaluate(tree[1], point)), _inverse(_evaluate(tree[2], point))))
    if kind in ("floor", "ceil"):
        return _step(kind, tree[1], point)
    if kind == "func":
        name, argument = tree[1], _evaluate(tree[2], point)
        if name == "exp":
            return _exp(argument)
        if name in ("ln", "log"):
            logarithm = _log(argument)
            if tree[3] is not None:
                return _mul(logarithm, _inverse(_log(_evaluate(tree[3], point))))
            return logarithm if name == "ln" else _mul(logarithm, _inverse(_LN10))
        if name in ("sinh", "cosh", "tanh"):
            return _hyperbolic(name, argument)
        return _trig(name, argument)
    raise _Refused


def _sample_point(names: set, k: int = 0) -> dict:
    """The worker's *k*-th sample point for these variables (sorted by name, as SymPy sorts symbols)."""
    point = {}
    for index, name in enumerate(sorted(names)):
        value = Fraction(*_SAMPLE_VALUES[(k + index) % len(_SAMPLE_VALUES)]) + Fraction(index, 101)
        point[name] = _rounded(complex(float(value)), 0.0)
    return point


_UNDECIDED = (_Refused, KeyError, ZeroDivisionError, OverflowError, ValueError, RecursionError)


def value_at_sample_point(text: str, names: set | None = None, k: int = 0) -> tuple[complex, float] | None:
    """(value, error bound) of *text* at the *k*-th sample point of *names* (default: its own variables)."""
    tree = _tree(text)
    if tree is None:
        return None
    try:
        return _evaluate(tree, _sample_point(_variables(tree, set()) if names is None else names, k))
    except _UNDECIDED:
        return None


def _apart(a, b) -> bool:
    """Two bounded values that differ by more than their error bounds and 1e-6 relative."""
    scale = max(abs(a[0]), abs(b[0]))
    if scale <= _TINY_SCALE:
        return False
    return abs(a[0] - b[0]) - a[1] - b[1] > _RELATIVE_GAP * scale


def clearly_different(pred: str, gold: str) -> bool:
    """True when both leaves are in the subset and their values at the sample point are clearly apart."""
    trees = _tree(pred), _tree(gold)
    if None in trees:
        return False
    names = _variables(trees[0], set()) | _variables(trees[1], set())
    a, b = value_at_sample_point(pred, names), value_at_sample_point(gold, names)
    return a is not None and b is not None and _apart(a, b)


def clearly_not_proportional(l1: str, r1: str, l2: str, r2: str) -> bool:
    """True when ``(l1 - r1) / (l2 - r2)`` clearly takes two values at the worker's first two sample points."""
    trees = [_tree(x) for x in (l1, r1, l2, r2)]
    if None in trees:
        return False
    names = set().union(*(_variables(t, set()) for t in trees))
    ratios = []
    for k in (0, 1):
        point = _sample_point(names, k)
        try:
            a, b, c, d = (_evaluate(t, point) for t in trees)
            first, second = _add(a, (-b[0], b[1])), _add(c, (-d[0], d[1]))
            if abs(second[0]) <= _TINY_SCALE:
                return False  # the worker skips a point where the second side vanishes
            ratios.append(_mul(first, _inverse(second)))
        except _UNDECIDED:
            return False
    return _apart(*ratios)
