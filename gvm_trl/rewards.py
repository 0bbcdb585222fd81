r"""Rule-based answer verification for maths RL rewards.

Public API
----------
``extract_boxed(text)``        contents of the last ``\boxed{...}`` / ``\fbox{...}`` (nested braces), or None.
``extract_answer(completion)`` the model's final answer: the final group of boxes, else ``#### x``, else the
                               last "answer is" phrase, else a bare answer, else the value of the concluding
                               sentence (``gvm_trl.answers.extraction`` documents the rules).
``grade_answer(completion, gold, *, timeout=5.0)`` True when the completion's final answer is
                               equivalent to ``gold`` (a bare answer, a solution with a box, a GSM8K
                               solution, a number such as ``27.0`` or a list whose element 0 is used;
                               a multiple-choice gold such as ``C`` or ``(B) Paris`` is matched by letter).
``grade_answers(completions, golds, *, timeout=5.0, workers=None)`` the same verdicts for a batch, its
                               rows that need SymPy checked concurrently (each against its own timeout).
``make_math_reward(answer_column="answer", timeout=5.0, workers=None)`` a TRL reward function named
                               ``math_reward`` (grades each batch with ``grade_answers``).
``math_reward``                ``make_math_reward()``.

How it is organised
-------------------
``latex2sympy2_extended`` turns one LaTeX *expression* into SymPy and SymPy decides symbolic equality, but
answers are rarely a bare expression: they carry units, wrappers, labels (``x =``, ``|PQ| =``), relations, lists,
intervals, matrices, ratios and choice letters, and the parser rejects or misreads them (``1.5e3`` is
``1.5*e*3``, ``2(3)`` a mixed number, ``y = 2x`` an assignment). So
``gvm_trl.answers`` finds the final answer (``extraction``), canonicalises its text (``normalisation``),
splits it into a small tree and compares trees (``comparison``, which documents the equivalence rules),
reads numbers without SymPy (``numbers``), and sends only leaf expressions, wrapped in parentheses so
that the whole leaf must parse, to SymPy (``symbolic``).

Safety
------
Model output is hostile input. Nothing calls ``eval``/``sympify``/``parse_expr`` on it: the only parser
is latex2sympy2_extended's ANTLR grammar (its one ``parse_expr`` call only reads the ``variable_values``
argument, which is never passed; its number tokens, which it would hand to ``sympify``, are read by
``sympy.Rational`` instead, ``answers/symbolic.py``), each parse gets a fresh converter, and leaves
containing relations, ``:=``, ``\in`` or ``\operatorname`` are refused. SymPy runs in persistent worker
*subprocesses* that never import the trainer, each with a 4 GiB address-space limit; one is killed when a
call overruns its ``timeout`` and restarted on demand, so pathological input cannot hang or exhaust the
trainer from any thread, and ``grade_answers`` checks a batch's expensive rows on several at once, so a batch
stalls for about one timeout per ``workers`` such rows rather than one per row. Answers are capped at
``MAX_ANSWER_CHARS`` the same way at every length of completion (measured on the raw text before anything is
parsed, ``answers/extraction.py``), expressions whose size bound exceeds 5000 digits are refused before
evaluation, written-out matrix products are bounded, and grading never raises; anything unparseable is
simply not equivalent. Everything that needs no SymPy (integers, decimals, fractions, strings, structure,
intervals) is decided in-process in microseconds, and a final ``\boxed{integer}`` against an integer gold
takes a shortcut that reads nothing else.
"""
from __future__ import annotations

import collections
import functools
import re
import threading
import time
from typing import Any, Callable, Sequence

from .answers import symbolic
from .answers.comparison import Context, answers_equal
from .answers.extraction import (
    MAX_ANSWER_CHARS,
    choice_in_completion,
    choice_of_gold,
    extract_answer,
    extract_boxed,
    gold_candidates,
    gold_text,
)

__all__ = [
    "MAX_ANSWER_CHARS",
    "extract_answer",
    "extract_boxed",
    "grade_answer",
    "grade_answers",
    "make_math_reward",
    "math_reward",
]


_INTEGER_RE = re.compile(r"-?\d{1,400}")
_GROUP_WINDOW = 2 * MAX_ANSWER_CHARS + 300  # a box further back than this cannot join the last one (extraction.py)


def _boxed_integer_verdict(completion: Any, gold: Any) -> bool | None:
    r"""The verdict for the common case (one final ``\boxed{integer}``, an integer gold), else None."""
    if not isinstance(completion, str) or isinstance(gold, bool):
        return None
    if isinstance(gold, str):
        gold = gold.strip()
        if not _INTEGER_RE.fullmatch(gold):
            return None
    elif not isinstance(gold, int):
        return None
    start = completion.rfind("\\boxed{")
    if start < 0 or "\\boxed" in completion[max(0, start - _GROUP_WINDOW) : start] or "\\fbox" in completion:
        return None
    end = completion.find("}", start + 7, start + 420)
    if end < 0 or not _INTEGER_RE.fullmatch(completion[start + 7 : end]):
        return None
    if "<answer>" in completion or "</think>" in completion or "<|" in completion:
        return None
    return int(completion[start + 7 : end]) == int(gold)


def grade_answer(completion: str, gold: str | float | int | list, *, timeout: float = 5.0) -> bool:
    """True when the final answer of *completion* is equivalent to *gold*; never raises.

    *timeout* bounds the symbolic (SymPy) part of the call in seconds. Not counted: waiting for the
    SymPy worker to start (a second or so, once per process and after a worker is killed for
    overrunning), which one call waits for at most 30 s before answering False.
    """
    try:
        return _grade(completion, gold, timeout, symbolic.symbolic_remote)
    except Exception:  # noqa: BLE001 - a grader must never take training down
        return False


class _NeedsWorker(Exception):
    """Raised by ``grade_answers``' first pass at a row's first symbolic check that is not cached."""


def _cached_or_defer(payload: list, timeout: float) -> tuple[bool, float]:
    """The symbolic back-end of ``grade_answers``' first pass: a cached result, else ``_NeedsWorker``."""
    result = symbolic.cached(payload)
    if result is None:
        raise _NeedsWorker
    return result, 0.0


SPREAD_AFTER_S = 0.25  # a batch's SymPy rows take one more worker when none has finished for this long


def grade_answers(completions: Sequence[Any], golds: Sequence[Any], *, timeout: float = 5.0,
                  workers: int | None = None) -> list[bool]:
    """``[grade_answer(c, g, timeout=timeout) for c, g in zip(completions, golds)]``, with the rows whose SymPy
    checks are slow checked at the same time, up to *workers* at once, each against its own *timeout*.

    Every row is first graded here without SymPy (most are decided in microseconds); a row that reaches a
    symbolic check whose result is not cached is set aside and graded again from the start by a thread that
    holds a SymPy worker of ``symbolic.POOL`` for it. One such thread starts; whenever no row has finished for
    ``SPREAD_AFTER_S`` seconds, as many more join (1, 2, 4, ... up to *workers*), each taking the next rows on
    workers of their own. So fast checks stay on one warm worker (more workers on a busy CPU only split its
    caches and its time), and a batch with k rows that each need their whole timeout stalls for about
    ceil(k / workers) timeouts (and under a second of spreading) rather than k.
    *workers* defaults to ``symbolic.default_pool_size()`` (``GVM_VERIFIER_WORKERS``, else min(4, CPUs per
    local rank)); 1 grades the rows one after another here. The verdicts are those of ``grade_answer``: only
    the time a row waits for its turn is not counted.
    """
    completions, golds = list(completions), list(golds)
    if len(completions) != len(golds):
        raise ValueError(f"grade_answers: {len(completions)} completions but {len(golds)} gold answers")
    verdicts: list[bool | None] = [None] * len(completions)
    pending = []
    for i, (completion, gold) in enumerate(zip(completions, golds)):
        try:
            verdicts[i] = _grade(completion, gold, timeout, _cached_or_defer)
        except _NeedsWorker:
            pending.append(i)
        except Exception:  # noqa: BLE001 - as grade_answer
            verdicts[i] = False
    size = symbolic.default_pool_size() if workers is None else max(int(workers), 1)
    if len(pending) > 1 and size > 1:
        _grade_concurrently(pending, completions, golds, verdicts, timeout, min(size, len(pending)))
    for i in pending:
        if verdicts[i] is None:  # one at a time here: a single row, one worker, or no worker could start
            verdicts[i] = grade_answer(completions[i], golds[i], timeout=timeout)
    return [bool(v) for v in verdicts]


def _grade_concurrently(rows: list[int], completions: list, golds: list, verdicts: list, timeout: float,
                        size: int) -> None:
    """Grade *rows* on threads that each hold a worker of ``symbolic.POOL`` per row, doubling the threads while
    rows are queued and none has finished for ``SPREAD_AFTER_S``; a row left None had no worker that could start."""
    symbolic.POOL.start(size)  # the others import SymPy meanwhile (once per process), in case they are needed
    queued = collections.deque(rows)
    state = threading.Condition()
    finished = [0]

    def grade_rows() -> None:
        while True:
            with state:
                if not queued:
                    return
                i = queued.popleft()
            worker = symbolic.POOL.acquire(size)
            try:
                if worker is not None:
                    backend = functools.partial(symbolic.symbolic_remote, worker=worker)
                    verdicts[i] = _grade_or_false(completions[i], golds[i], timeout, backend)
            finally:
                if worker is not None:
                    symbolic.POOL.release(worker)
                with state:
                    finished[0] += 1
                    state.notify_all()

    threads: list[threading.Thread] = []
    while True:
        for _ in range(min(max(len(threads), 1), size - len(threads)) if not threads or stalled else 0):
            threads.append(threading.Thread(target=grade_rows, name=f"gvm-grade-{len(threads)}", daemon=True))
            threads[-1].start()
        with state:
            if finished[0] == len(rows):
                break
            before = finished[0]
            state.wait(SPREAD_AFTER_S)
            stalled = finished[0] == before and bool(queued)
    for thread in threads:
        thread.join()


def _grade_or_false(completion: Any, gold: Any, timeout: float, backend: Callable) -> bool:
    try:
        return _grade(completion, gold, timeout, backend)
    except Exception:  # noqa: BLE001 - as grade_answer
        return False


def _grade(completion: Any, gold: Any, timeout: float, backend: Callable) -> bool:
    """``grade_answer`` with its symbolic back-end as a parameter; raises what the back-end raises."""
    fast = _boxed_integer_verdict(completion, gold)
    if fast is not None:
        return fast
    deadline = time.monotonic() + max(float(timeout), 0.0)
    if not isinstance(completion, str):
        completion = gold_text(completion) or ""  # a bare number or a list, as some callers pass
    pred = None
    for gold_answer in gold_candidates(gold):
        if len(gold_answer) > MAX_ANSWER_CHARS:
            continue
        choice = choice_of_gold(gold_answer)
        if choice is not None:
            letter, option_text = choice
            picked = choice_in_completion(completion)
            if picked is not None:
                if picked == letter:
                    return True
                continue
            if not option_text:
                continue
            gold_answer = option_text
        pred = extract_answer(completion) if pred is None else pred
        if not pred or len(pred) > MAX_ANSWER_CHARS:
            return False
        if answers_equal(pred.strip(), gold_answer.strip(), Context(deadline, backend)):
            return True
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


def make_math_reward(answer_column: str = "answer", timeout: float = 5.0,
                     workers: int | None = None) -> Callable[..., list[float]]:
    """A TRL reward function (``__name__ == "math_reward"``) reading gold answers from *answer_column*.

    TRL calls it as ``math_reward(prompts=..., completions=..., completion_ids=..., **columns)``;
    ``math_reward(completions, golds)`` also works. Completions are strings or conversations (the
    last assistant message is graded). Returns 1.0 for an answer equivalent to the gold, else 0.0.
    A batch is graded by ``grade_answers``: at most *workers* rows need SymPy at once (see there).
    """
    if workers is None:
        symbolic.default_pool_size()  # a malformed GVM_VERIFIER_WORKERS is refused here, by name
    elif isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"make_math_reward: workers={workers!r}; expected a positive int (SymPy processes at once) "
                         "or None for the default")

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
        symbolic.WORKER.start()  # overlap the worker's start with the fast-path grading below
        verdicts = grade_answers([_completion_text(c) for c in completions], golds, timeout=timeout, workers=workers)
        return [1.0 if v else 0.0 for v in verdicts]

    math_reward.__name__ = math_reward.__qualname__ = "math_reward"
    return math_reward


math_reward = make_math_reward()
