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
``make_math_reward(answer_column="answer", timeout=5.0)`` a TRL reward function named ``math_reward``.
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
containing relations, ``:=``, ``\in`` or ``\operatorname`` are refused. SymPy runs in a persistent worker
*subprocess* that never imports the trainer, with a 4 GiB address-space limit; it is killed when a call
overruns its ``timeout`` and restarted on demand, so pathological input cannot hang or exhaust the
trainer from any thread. Answers are capped at ``MAX_ANSWER_CHARS``, expressions whose size bound
exceeds 5000 digits are refused before evaluation, written-out matrix products are bounded, and
grading never raises; anything unparseable is simply not equivalent. Everything that needs no SymPy
(integers, decimals, fractions, strings, structure, intervals) is decided in-process in microseconds,
and a final ``\boxed{integer}`` against an integer gold takes a shortcut that reads nothing else.
"""
from __future__ import annotations

import re
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
            if answers_equal(pred.strip(), gold_answer.strip(), Context(deadline, symbolic.symbolic_remote)):
                return True
        return False
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
        symbolic.WORKER.start()  # overlap the worker's start with the fast-path grading below
        return [
            1.0 if grade_answer(_completion_text(c), g, timeout=timeout) else 0.0
            for c, g in zip(completions, golds)
        ]

    math_reward.__name__ = math_reward.__qualname__ = "math_reward"
    return math_reward


math_reward = make_math_reward()
