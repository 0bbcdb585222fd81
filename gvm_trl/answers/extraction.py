r"""Finding the final answer in a completion (and the gold answer in a dataset's gold field)."""
from __future__ import annotations

import re
from typing import Any

__all__ = ["MAX_ANSWER_CHARS", "extract_answer", "extract_boxed", "gold_text"]

MAX_ANSWER_CHARS = 1000  # longer extracted answers are refused

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


def gold_text(gold: Any) -> str | None:
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

