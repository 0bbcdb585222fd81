r"""The SymPy side of grading: latex2sympy2_extended + SymPy in persistent, killable worker subprocesses.

Requests are JSON lists (``["leaf", a, b]``, ``["eq", l1, r1, l2, r2]``) answered "1"/"0". A worker is
started with ``python -c WORKER_BOOT <package dir>``, which loads this package (``gvm_trl.answers``) under a
private name without importing ``gvm_trl`` itself, so the worker never imports the trainer. It runs with a
4 GiB address-space limit, is killed when a request overruns its time and replaced (by a standby process that
started importing while the request ran past half its time, so the next request need not wait for SymPy to
load), answers a request again on a fresh process when its own dies mid-request, and exits when its parent
process is gone.

``WORKER`` serves ``grade_answer``; ``POOL`` lends ``WORKER`` and a few more such workers to the threads of
``rewards.grade_answers``, so that the rows of a batch that need SymPy are checked at the same time, each
against its own deadline.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import queue
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict
from fractions import Fraction

from .numbers import Number, numbers_close, parse_number

_INSTANCES: weakref.WeakSet = weakref.WeakSet()  # every SymbolicWorker and WorkerPool, reset in a forked child

WORKER_START_TIMEOUT = 120.0  # a worker not up after this long is given up on (in-process fall-back)
WORKER_START_WAIT = 30.0  # longest one call waits for a starting worker (not part of its timeout)
WORKER_MEMORY_BYTES = 4 << 30
WORKER_MAX_REQUESTS = 20000  # recycle the worker now and then to bound caches and leaks
STANDBY_AFTER = 0.5  # a request still running after this share of its time has a replacement process start

_MAX_DIGITS = 5000.0  # refuse closed forms whose numeric size bound exceeds this many digits

_PARSER = None  # the converter class below, built in the worker on first use (``_parser_class``)


def _parser_class():
    """latex2sympy2_extended's converter, entered at its expression rule, with two readings changed (imported on
    first use: seconds).

    Numbers: the fork turns a number token into SymPy with ``sympy.Number(text)``, which goes through
    ``sympify`` and so ``eval``; model text must never reach ``eval`` (``rewards.py``, Safety), so the token
    (digits, a point, thousands commas: the grammar's NUMBER) is read by ``sympy.Rational``, which parses
    it as a fraction, exactly (``3.2`` is 16/5, as in latex2sympy2; the fork made it a Float, which the
    checks below would compare to 1e-9 only).

    Entry rule: the fork's ``parse`` starts at its ``math`` rule, which first decides between sets, set
    relations and expressions; for a parenthesised leaf that decision falls back to ANTLR's full-context
    prediction, which made a parse about 6x slower than starting at ``expr`` (measured on radicals and
    fractions; a leaf is an expression: ``comparison.py`` sends no sets or relations). ``parse`` here
    starts at ``expr`` and requires the whole text to be consumed.

    Juxtaposition: latex2sympy2_extended 1.11.0 reads an integer factor followed by a positive rational one
    as a mixed number whatever its ``interpret_as_mixed_fractions`` option says: ``2 3`` and ``2(3)``
    become 5 and ``3\\sqrt{4}`` becomes 5, so ``\\boxed{2(3)}`` would match a gold 5. latex2sympy2 read
    them as products, and ``comparison.py`` reads a whole leaf ``2\\frac{3}{4}`` as a mixed number before
    SymPy, so the subclass multiplies in exactly that case and leaves every other one to the fork's own
    code. Each factor and each tail of a product is converted once per parse (kept by parse-tree node), so
    looking at a factor before the fork does costs no second conversion.
    """
    global _PARSER
    if _PARSER is None:
        import sympy
        from antlr4 import Token
        from latex2sympy2_extended.latex2sympy2 import ConversionConfig, _Latex2Sympy

        literal = ConversionConfig(interpret_as_mixed_fractions=False, interpret_simple_eq_as_assignment=False,
                                   interpret_contains_as_eq=False, lowercase_symbols=False)

        class LiteralLatex2Sympy(_Latex2Sympy):
            def __init__(self) -> None:
                super().__init__(config=literal)
                self._done: dict = {}

            def parse(self, latex_str):
                parser = self.create_parser(latex_str)
                tree = parser.expr()
                if parser.getCurrentToken().type != Token.EOF:
                    raise ValueError("text after the expression")
                return self.convert_expr(tree)

            def convert_postfix(self, postfix):
                key = id(postfix)
                if key not in self._done:
                    self._done[key] = (postfix, super().convert_postfix(postfix))  # node kept: its id stays unique
                return self._done[key][1]

            def parse_number(self, text):
                return sympy.Rational(text.replace(",", ""))

            def convert_postfix_list(self, arr, i=0):
                key = (id(arr), i)
                if key not in self._done:
                    self._done[key] = (arr, self._convert_postfix_list(arr, i))
                return self._done[key][1]

            def _convert_postfix_list(self, arr, i):
                if 0 <= i < len(arr) - 1:
                    factor = self.convert_postfix(arr[i])
                    if isinstance(factor, sympy.Integer):
                        rest = self.convert_postfix_list(arr, i + 1)
                        if isinstance(rest, sympy.Rational):  # the fork's mixed-number case: a product here
                            return self.mul_flat(factor, rest)
                return super().convert_postfix_list(arr, i)

        _PARSER = LiteralLatex2Sympy
    return _PARSER


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
        if node.exp.is_Rational:  # 1/2, -1, 2/3: the exponent's size, not its digit bound
            size = abs(int(node.exp.p)) / int(node.exp.q) if exp <= 50 else math.inf
            return math.inf if size > 1e5 else (base + 1) * max(size, 1.0)
        if exp <= 50 and node.exp.is_number and not node.exp.free_symbols:
            try:  # a numeric exponent such as (\sqrt{13}-5)/6
                size = abs(complex(node.exp))
            except (TypeError, ValueError, OverflowError):
                size = math.inf
            return math.inf if size > 1e5 else (base + 1) * max(size, 1.0)
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
    """latex2sympy2_extended + imaginary unit + size guard; None when unusable (cached: golds repeat).

    The fork's own text rewriting (``normalization_config``) is not applied: ``normalisation.py`` has
    already canonicalised the leaf, and a second pass would change what a leaf means after it was
    screened. The converter reads the text literally (``_parser_class``: no lower-casing, so ``X`` and
    ``x`` differ; no equation-as-assignment; no ``\\in`` as equality; juxtaposition is a product).
    """
    import sympy

    try:
        expr = _parser_class()().parse("(" + s + ")")  # the parentheses force the grammar to consume all of s
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
    ``10^{30}`` and ``10^{30}+1`` differ while ``\\sqrt{8}`` and ``2\\sqrt{2}`` agree. A decimal inside
    an expression (``x^{0.5}``) carries only machine precision, so then 1e-9 relative is enough.
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
    tolerance = "1e-9" if a.atoms(sympy.Float) or b.atoms(sympy.Float) else "1e-90"
    return bool(scale == 0 or abs(diff) <= scale * sympy.Float(tolerance, 20))


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


def _clearly_differ(a, b) -> bool:
    """Whether *a* and *b* take clearly different finite values (1e-8 relative) at the first sample point.

    Each side is evaluated to 15 correct digits on its own (no cancellation between them), so an
    identity is never rejected here; anything undecided is left to the exact checks.
    """
    import sympy

    point = next(_sample_points(a.free_symbols | b.free_symbols, 1))
    try:
        values = [sympy.N(x.subs(point), 15) for x in (a, b)]
    except Exception:  # noqa: BLE001 - a value SymPy cannot produce decides nothing
        return False
    numbers = []
    for v in values:
        if not v.is_number or v.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan):
            return False
        re_part, im_part = v.as_real_imag()
        if not (re_part.is_Number and im_part.is_Number):
            return False
        numbers.append(complex(re_part, im_part))
    scale = max(abs(numbers[0]), abs(numbers[1]))
    return scale > 1e-6 and abs(numbers[0] - numbers[1]) > 1e-8 * scale


def _exprs_equal(a, b) -> bool:
    """Symbolic equality of two SymPy expressions (see module docstring)."""
    import sympy
    from sympy.core.function import AppliedUndef

    if a == b:
        return True
    names_a, names_b = {s.name for s in a.free_symbols}, {s.name for s in b.free_symbols}
    if not (names_a <= names_b or names_b <= names_a):
        return False
    diff = a - b
    if not a.free_symbols and not b.free_symbols:
        same = _closed_forms_equal(a, b)
        return same if same is not None else sympy.simplify(diff) == 0
    if not diff.has(sympy.floor, sympy.ceiling, sympy.frac, sympy.Mod) and _clearly_differ(a, b):
        return False  # most wrong answers: one cheap evaluation instead of an expansion
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


def _number_vs_expr(number: Number, expr) -> bool:
    """A decimal literal against a closed form, under the numeric rule."""
    val = _numeric_value(expr)
    if val is None or val[1] != 0:
        return False
    return numbers_close(number, Number(Fraction(str(val[0])), Fraction(1, 10**40)))


def _symbolic_leaf(pred: str, gold: str) -> bool:
    """Leaf equivalence through latex2sympy2_extended + SymPy."""
    pn, gn = parse_number(pred), parse_number(gold)
    a, b = _latex_to_expr(pred), _latex_to_expr(gold)
    if a is None or b is None:
        return False
    if pn is not None and gn is not None:
        return numbers_close(pn, gn)
    if pn is not None and pn.ulp is not None and not b.free_symbols:
        return _number_vs_expr(pn, b)
    if gn is not None and gn.ulp is not None and not a.free_symbols:
        return _number_vs_expr(gn, a)
    return _exprs_equal(a, b)


def _symbolic_equation(l1: str, r1: str, l2: str, r2: str, sign: str = "any") -> bool:
    """``l1 - r1`` is a non-zero constant multiple of ``l2 - r2`` (a positive one when *sign* is "positive")."""
    import sympy

    exprs = [_latex_to_expr(x) for x in (l1, r1, l2, r2)]
    if any(e is None for e in exprs):
        return False
    d1, d2 = exprs[0] - exprs[1], exprs[2] - exprs[3]
    if {s.name for s in d1.free_symbols} != {s.name for s in d2.free_symbols} or not d1.free_symbols:
        return False
    if sympy.expand(d1 - d2) == 0 or (sign == "any" and sympy.expand(d1 + d2) == 0):
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
    if sign == "positive" and not (ratios[0].is_extended_real and ratios[0] > 0):
        return False
    return all(_closed_forms_equal(r, ratios[0]) for r in ratios[1:])


def run_request(request: list) -> bool:
    """Dispatch one worker request: ["leaf", a, b], ["eq", l1, r1, l2, r2, sign], or ["forget"] (empty the
    parse cache, keeping what the process has warmed up: benchmarks time each chunk from cold caches)."""
    kind, *args = request
    if kind == "leaf":
        return _symbolic_leaf(*args)
    if kind == "eq":
        return _symbolic_equation(*args)
    if kind == "forget":
        _latex_to_expr.cache_clear()
        return True
    return False


def _exit_with_parent(parent: int) -> None:
    """Leave as soon as the grading process is gone: a worker busy on a request would not notice its stdin close
    (the parent killed, or leaving through ``os._exit`` without its atexit handlers) and could run on for long."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def worker_main() -> None:
    """Worker loop: JSON request per line on stdin -> "1"/"0" per line on stdout."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    if len(sys.argv) > 2:
        threading.Thread(target=_exit_with_parent, args=(int(sys.argv[2]),), daemon=True).start()
    _parser_class()  # slow import, done before "ready"

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            result = run_request(json.loads(line))
        except BaseException:  # noqa: BLE001 - any failure means "not equivalent"
            result = False
        out.write("1\n" if result else "0\n")
        out.flush()


WORKER_BOOT = (
    "import importlib, importlib.util, sys\n"
    "sys.path[:] = [p for p in sys.path if p not in ('', '.')]\n"
    "spec = importlib.util.spec_from_file_location(\n"
    "    '_gvm_answers', sys.argv[1] + '/__init__.py', submodule_search_locations=[sys.argv[1]])\n"
    "package = importlib.util.module_from_spec(spec)\n"
    "sys.modules['_gvm_answers'] = package\n"
    "spec.loader.exec_module(package)\n"
    "importlib.import_module('_gvm_answers.symbolic').worker_main()\n"
)


_OVERRAN = object()  # SymbolicWorker._read_answer: no answer within the time


class SymbolicWorker:
    """A persistent SymPy subprocess, killed and restarted when a request overruns its time (by a standby process
    started while the request ran long, when there is one)."""

    def __init__(self) -> None:
        self._reset()
        self.failed_to_start = False
        _INSTANCES.add(self)

    def _reset(self) -> None:
        """Fresh state (also used in a forked child, which must never touch the parent's pipes)."""
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue | None = None
        self._ready = False
        self._served = 0
        self._spawned = 0.0
        self._standby: tuple[subprocess.Popen, queue.Queue, float] | None = None

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
        spawned, self._standby = self._standby, None
        if spawned is not None and spawned[0].poll() is not None:
            spawned = None  # the standby died (poll reaped it)
        spawned = spawned or self._spawn()
        if spawned is None:
            self.failed_to_start = True
            return
        self._proc, self._lines, self._spawned = spawned
        self._ready = False
        self._served = 0

    def _spawn(self) -> tuple[subprocess.Popen, queue.Queue, float] | None:
        """A new worker process (not waited for): its handle, the queue of its output lines and its start time."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", WORKER_BOOT, os.path.dirname(os.path.abspath(__file__)), str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env=env, text=True, bufsize=1,
            )
        except OSError:
            return None
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(proc, lines), daemon=True).start()
        return proc, lines, time.monotonic()

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
            _kill_and_reap(self._proc)
        self._proc = None

    def _await_ready(self) -> float:
        """Wait (a bounded time) for the worker's start-up; returns the seconds waited."""
        if self._ready:
            return 0.0
        began = time.monotonic()
        give_up = self._spawned + WORKER_START_TIMEOUT
        try:
            line = self._lines.get(timeout=max(min(WORKER_START_WAIT, give_up - began), 0.01))
        except queue.Empty:
            line = ""  # still importing: this call gives up, the next one waits again
        self._ready = line == "ready"
        if line is None or (not self._ready and time.monotonic() >= give_up):
            self._kill()  # it died or never came up
            self.failed_to_start = True
        return time.monotonic() - began

    def request(self, payload: list, timeout: float) -> tuple[bool | None, float]:
        """(result or None on timeout / no worker, seconds spent starting the worker).

        A worker that dies mid-request (killed from outside, crashed) is replaced and asked once more within
        the time left; one that overruns is killed and replaced, and the answer is None.
        """
        began = time.monotonic()
        if timeout <= 0 or not self._lock.acquire(timeout=timeout):
            return None, 0.0
        try:
            startup = 0.0
            for _ in range(2):  # a second time only when the worker died under the first
                self._ensure_started()
                if self._proc is None:
                    return None, startup
                startup += self._await_ready()
                if not self._ready:
                    return None, startup
                remaining = timeout - (time.monotonic() - began - startup)
                if remaining <= 0:
                    return None, startup
                try:
                    self._proc.stdin.write(json.dumps(payload) + "\n")
                    self._proc.stdin.flush()
                except (OSError, ValueError):
                    line = None  # the pipe is closed: the worker is gone
                else:
                    line = self._read_answer(remaining)
                overran = line is _OVERRAN
                self._served += 1
                if line not in ("0", "1") or self._served >= WORKER_MAX_REQUESTS:
                    self._kill()  # overran, died or is due for recycling
                    self._ensure_started()  # the replacement imports SymPy while the caller moves on
                if line in ("0", "1") or overran:
                    return (line == "1" if line in ("0", "1") else None), startup
            return None, startup
        finally:
            self._lock.release()

    def _read_answer(self, seconds: float) -> str | None | object:
        """The worker's next line within *seconds* (None: it died; ``_OVERRAN``: no answer in time). Past
        ``STANDBY_AFTER`` of the time a standby process starts importing SymPy, so that the replacement of a
        worker killed for overrunning is (nearly) ready when the next request comes, not seconds later."""
        first = seconds * STANDBY_AFTER
        try:
            return self._lines.get(timeout=first)
        except queue.Empty:
            pass
        if self._standby is None:
            self._standby = self._spawn()
        try:
            return self._lines.get(timeout=seconds - first)
        except queue.Empty:
            return _OVERRAN

    def wait_ready(self) -> bool:
        """Start the process if needed and wait (as a request would) until it has imported SymPy."""
        with self._lock:
            self._ensure_started()
            if self._proc is not None:
                self._await_ready()
            return self._ready

    @property
    def pid(self) -> int | None:
        """The running worker process's id (None when there is none)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def close(self) -> None:
        """Stop the worker and its standby (waits at most a few seconds for a request in flight)."""
        locked = self._lock.acquire(timeout=5)
        try:
            self._kill()
            standby, self._standby = self._standby, None
            if standby is not None:
                _kill_and_reap(standby[0])
        finally:
            if locked:
                self._lock.release()


def _kill_and_reap(proc: subprocess.Popen) -> None:
    try:
        proc.kill()
        proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        pass


WORKER = SymbolicWorker()

POOL_SIZE_ENV = "GVM_VERIFIER_WORKERS"
POOL_SIZE_CAP = 4  # the default never exceeds this many workers per process


def default_pool_size() -> int:
    """How many SymPy workers one process keeps for batches: ``GVM_VERIFIER_WORKERS`` when set, else
    min(4, the CPUs this process may use divided by the processes of this machine's ``LOCAL_WORLD_SIZE``).

    Under ``accelerate launch`` / ``torchrun`` every rank has a pool of its own, so the CPUs are shared out
    between the ranks of one machine rather than each rank taking four.
    """
    text = os.environ.get(POOL_SIZE_ENV, "").strip()
    if text:
        try:
            size = int(text)
        except ValueError:
            size = 0
        if size < 1:
            raise ValueError(f"{POOL_SIZE_ENV}={text!r}: expected a positive whole number of SymPy workers")
        return size
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        ranks = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    except ValueError:
        ranks = 1
    return max(1, min(POOL_SIZE_CAP, cpus // ranks))


class WorkerPool:
    """SymbolicWorkers lent one at a time to threads that grade rows concurrently (``rewards.grade_answers``).

    The first member is ``WORKER``; more are created as a batch needs them, up to the size it asks for, and
    kept for later batches (each stays the killable, self-replacing process described above). The standard
    pools do not fit here: ``concurrent.futures.ProcessPoolExecutor`` and ``multiprocessing.Pool`` cannot stop
    one task that overruns without tearing the whole pool down, and they start their workers from this
    process (fork: a copy of the trainer, CUDA included; spawn: re-imports ``__main__``); a SymbolicWorker
    already kills and replaces its own small process at a deadline, so the pool only has to lend them out.
    """

    def __init__(self) -> None:
        self._reset()
        _INSTANCES.add(self)

    def _reset(self) -> None:
        """Empty state (also in a forked child, which must never touch the parent's workers)."""
        self._cond = threading.Condition()
        self._extra: list[SymbolicWorker] = []
        self._lent: set[int] = set()

    def members(self) -> list[SymbolicWorker]:
        """``WORKER`` (looked up now, so a replaced module attribute is used) and the workers created here."""
        return [WORKER, *self._extra]

    def _grow(self, size: int) -> None:
        while len(self._extra) + 1 < size:
            self._extra.append(SymbolicWorker())

    def start(self, size: int, wait: bool = False) -> None:
        """Start the processes of the first *size* members (their imports overlap); with *wait*, until all are up."""
        with self._cond:
            self._grow(size)
            members = self.members()[:size]
        for worker in members:
            worker.start()
        if wait:
            for worker in members:
                worker.wait_ready()

    def acquire(self, size: int) -> SymbolicWorker | None:
        """An idle member among the first *size* (created if needed), waiting while all are lent out; None when
        none of them can start a process."""
        with self._cond:
            self._grow(size)
            while True:
                usable = [w for w in self.members()[:size] if not w.failed_to_start]
                if not usable:
                    return None
                for worker in usable:
                    if id(worker) not in self._lent:
                        self._lent.add(id(worker))
                        return worker
                self._cond.wait()

    def release(self, worker: SymbolicWorker) -> None:
        with self._cond:
            self._lent.discard(id(worker))
            self._cond.notify()

    def close(self) -> None:
        """Stop every member's process (``WORKER`` included); they start again on demand."""
        with self._cond:
            members = self.members()
        for worker in members:
            worker.close()


POOL = WorkerPool()
atexit.register(POOL.close)

CACHE: OrderedDict = OrderedDict()
CACHE_LOCK = threading.Lock()
CACHE_SIZE = 20000


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker, a ``fork`` start method) gets no workers and fresh locks: every worker
    and pool object it inherited forgets the parent's processes, pipes and lent-out state."""
    global CACHE_LOCK
    for instance in list(_INSTANCES):
        instance._reset()
    CACHE_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def cached(payload: list) -> bool | None:
    """The remembered result of a symbolic check, or None when it has not been made (or did not finish)."""
    key = json.dumps(payload)
    with CACHE_LOCK:
        if key in CACHE:
            CACHE.move_to_end(key)
            return CACHE[key]
    return None


def symbolic_remote(payload: list, timeout: float, worker: SymbolicWorker | None = None) -> tuple[bool | None, float]:
    """Cached symbolic check in *worker* (default ``WORKER``); when that one cannot start a process, ``WORKER``,
    and when neither can, in-process on the main thread."""
    result = cached(payload)
    if result is not None:
        return result, 0.0
    began = time.monotonic()
    worker = WORKER if worker is None else worker
    result, startup = (None, 0.0) if worker.failed_to_start else worker.request(payload, timeout)
    if result is None and worker.failed_to_start and worker is not WORKER:
        remaining = timeout - (time.monotonic() - began - startup)
        result, more = symbolic_remote(payload, remaining) if remaining > 0 else (None, 0.0)
        return result, startup + more
    if result is None and worker.failed_to_start:
        result = symbolic_in_process(payload, timeout - (time.monotonic() - began - startup))
    if result is not None:
        with CACHE_LOCK:
            CACHE[json.dumps(payload)] = result
            while len(CACHE) > CACHE_SIZE:
                CACHE.popitem(last=False)
    return result, startup


def symbolic_in_process(payload: list, timeout: float) -> bool | None:
    """Last resort without a worker: main thread only, bounded by SIGALRM."""
    import signal

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return None

    def _alarm(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, max(timeout, 0.01))
        return run_request(payload)
    except BaseException:  # noqa: BLE001
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

