r"""Finding the final answer in a completion, or in a dataset's gold field.

Order of the rules (``extract_answer``):

1. Only the answer region counts: the last ``<answer>...</answer>``, the text after ``</think>``, and
   nothing after a chat-template token such as ``<|im_end|>`` (a model that keeps writing a new turn).
2. Boxes (``\boxed{}``, ``\fbox{}``, also ``\boxed 5``). The last box and the boxes before it that are
   joined to it only by commas, ``\quad``, labels (``x =``) or a few words ending in "and"/"or" form one
   answer (``\boxed{1}, \boxed{2}`` is the list ``1, 2``; a box, a sentence, then another box is just the
   last one). Identical boxes count once. A broken last box means no answer.
3. GSM8K's ``#### x`` on the last line.
4. The last "answer is" / "answer:" / "Final Answer" phrase, read up to the end of its sentence.
5. A text that is all math (math spans joined by "and"/"or"/commas, or a bare answer with unit words
   and at most one other word, such as ``C Cecile``) is the answer itself.
6. The concluding sentence: the last sentence holding a math span or a number; in it, what follows the
   last "is"/"are"/"equals", else its last math span (``$...$``, ``\(...\)``, ``\[...\]``, ``$$...$$``),
   else its last number. A digit inside a word (``QX7RT``) is not a number.
7. A short text (at most four words, not a sentence ending in a full stop) is taken whole.

Length decides only whether an answer is refused, never which rule finds it: the rules read the same at every
length of completion, and an answer that runs past ``MAX_ANSWER_CHARS`` is no answer (``None``) whatever the text
around it. The extent is measured on the raw text before anything is parsed: a box whose closing brace is not within
``MAX_ANSWER_CHARS`` characters of its opening one (such a box also ends a group of boxes), an "answer is" clause
that is all math and does not end within that many characters, a bare answer (rule 5) of any length. Longer
extracted answers (the final group of boxes, a ``####`` line) are refused by ``grade_answer``'s same cap.

Multiple-choice golds (``C``, ``(B) Paris``) are read by ``choice_of_gold``, and ``choice_in_completion``
then finds the chosen letter: a box holding only a choice, the first letter after "answer is", a
leading ``D.``, else the last standalone capital A-E.
"""
from __future__ import annotations

import functools
import re
from typing import Any

__all__ = [
    "MAX_ANSWER_CHARS",
    "choice_in_completion",
    "choice_of_gold",
    "extract_answer",
    "extract_boxed",
    "gold_candidates",
    "gold_text",
    "math_spans",
]

MAX_ANSWER_CHARS = 1000  # longer extracted answers are refused
_BOX_REACH = 2 * MAX_ANSWER_CHARS + 300  # a box starting further back than this cannot join the next one
_TAIL_CHARS = 6000  # the concluding sentence is looked for in this many final characters
_MAX_GROUP = 64  # at most this many boxes are joined into one answer
_MAX_SEPARATOR = 160  # text between two boxes that join is at most this long

_BOX_OPEN_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_ANY_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE_RE = re.compile(r"(?<!\\)[{}]")
_ANSWER_WORDS = r"(?:final\s+answer|answer|réponse|respuesta|resposta|antwort|答案)"
_ANSWER_IS_RE = re.compile(
    r"(?i)(?<![A-Za-z])" + _ANSWER_WORDS + r"(?:\s*\(s\))?"
    r"(?:\s+(?:is|are|would\s+be|should\s+be|will\s+be|est|es|ist)\b\s*:?|\s*\**\s*[:：=]|(?<=answer)\s*\**\s*\n"
    r"|\s*是\s*[:：]?)\s*"
)
_FINAL_ANSWER_RE = re.compile(r"(?i)final\s+answer")
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)\s*$")  # only on the last non-empty line
_CHAT_TOKEN_RE = re.compile(r"<\|(?:im_end|im_start|endoftext|eot_id|end|user|assistant)\|>")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d{4,},\d{2}(?!\d)|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?![\d.]))?|-?\.\d+"
_PERCENT = r"(?:\s*(?:\\?%|percent(?:age)?\b|pct\b|per\s+cent\b))?"
_NUMBER_RE = re.compile(r"(?<![A-Za-z\d.,_^])(?:" + _NUMBER + r")(?![\d])" + _PERCENT)
_VERB_RE = re.compile(r"(?i)(?<![A-Za-z])(?:is|are|was|equals|equal\s+to|be|becomes|gives|yields|=)(?![A-Za-z])")
_WORD_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
_TOKEN_RE = re.compile(r"\S+")
_LETTERS_RE = re.compile(r"[a-z]{2,}")
_CONNECTIVES = {"and", "or", "et", "und", "y", "ou"}
_SHORT_WORDS = {
    "is", "the", "we", "so", "it", "be", "are", "an", "to", "of", "and", "or", "in", "on", "at", "for", "as",
    "by", "not", "but", "get", "has", "was", "its", "all", "any", "can", "may", "too", "our", "you", "one", "two",
}
_UNIT_WORDS = {
    "units", "unit", "square", "sq", "cubic", "cm", "mm", "km", "meters", "meter", "metres", "metre", "inches",
    "inch", "feet", "foot", "ft", "miles", "mile", "mph", "hours", "hour", "minutes", "minute", "seconds",
    "second", "days", "day", "weeks", "week", "years", "year", "dollars", "dollar", "cents", "cent", "degrees",
    "degree", "radians", "grams", "kg", "pounds", "liters", "litres", "percent", "percentage", "pct", "yuan",
    "euros", "people", "students", "ways", "times", "points", "per", "am", "pm",
}
_NOT_PROSE = _CONNECTIVES | _UNIT_WORDS
# ``$$...$$``, ``$...$`` (not after a backslash, ``\$`` inside), ``\(...\)``, ``\[...\]``: the lazy
# ``\$\$(.+?)\$\$|(?<!\\)\$((?:\\\$|[^$])+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]`` (re.S) written with possessive
# loops that run to the first closer without backtracking: the same matches (tests/test_extraction.py), a megabyte
# span in a millisecond rather than a third of a second.
_SPAN_RE = re.compile(
    r"\$\$(.[^$]*+(?:\$(?!\$)[^$]*+)*+)\$\$"
    r"|(?<!\\)\$([^$][^$]*+(?:(?<=\\)\$[^$]*+)*+)\$"
    r"|\\\((.[^\\]*+(?:\\(?!\))[^\\]*+)*+)\\\)"
    r"|\\\[(.[^\\]*+(?:\\(?!\])[^\\]*+)*+)\\\]",
    re.S,
)
_CHOICE_FORM_RE = re.compile(
    r"\s*(?:\(([A-E])\)|([A-E])(?=$|[.):](?:\s|$)))\s*[.:)]?\s*(.*)|\s*([A-E])\s+([A-Z][a-z].*)", re.S
)
_STANDALONE_LETTER_RE = re.compile(r"(?<![A-Za-z0-9\\_^{*+/=-])\(?([A-E])\)?(?![A-Za-z0-9_^(*+/=-])")
_PLAIN_GOLD_RE = re.compile(r"\s*-?[\d.,/ ]+\s*")
_SENTENCE_BREAK_RE = re.compile(r"[.!?]\s+[A-Z]")
_HEDGED_CHOICE_RE = re.compile(r"\s*(?:or|and|,|/)\s*\(?[A-E]\)?(?![A-Za-z0-9])")
_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|bf|rm)\s*\{([^{}]*)\}")


def _match_brace(text: str, start: int, stop: int | None = None) -> int:
    """Index of the ``}`` closing the group whose content starts at *start* (before *stop*), or -1."""
    depth = 1
    for m in _BRACE_RE.finditer(text, start, len(text) if stop is None else stop):
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


def _box_at(text: str, match: re.Match, stop: int) -> tuple[str, int] | None:
    r"""(content, end) of the box starting at *match* (braced, or ``\boxed 5``); None when broken or when its
    content runs past ``MAX_ANSWER_CHARS`` (the closing brace is looked for that far only)."""
    window = min(stop, match.end() + MAX_ANSWER_CHARS + 64)
    rest = text[match.end() : window]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        open_at = match.end() + (len(rest) - len(stripped)) + 1
        end = _match_brace(text, open_at, min(stop, open_at + MAX_ANSWER_CHARS + 1))
        return (text[open_at:end], end + 1) if end >= 0 else None
    if rest[:1].isspace():
        token = re.match(r"[^\s$]+", stripped)
        cut = window < stop and token is not None and token.end() == len(stripped)  # it may go on: over-long
        if token and not cut and len(token.group(0)) <= MAX_ANSWER_CHARS:
            start = match.end() + (len(rest) - len(stripped))
            return token.group(0), start + len(token.group(0))
    return None


def _separator_joins(separator: str) -> bool:
    """Whether the text between two boxes makes them parts of one answer."""
    if len(separator) > _MAX_SEPARATOR:
        return False
    s = _WRAPPER_RE.sub(r" \1 ", separator)
    s = re.sub(r"\\q?quad|\\[()\[\],;:! ]|\$|~", " ", s)
    s = re.sub(r"\(\s*[a-z]\s*\)", " ", s)  # "part (a)"
    s = re.sub(r"\(?\s*[A-Za-z](?:_\{?\w+\}?)?(?:\s*,\s*[A-Za-z](?:_\{?\w+\}?)?)*\s*\)?\s*=", " ", s)  # labels
    words = re.findall(r"[A-Za-z]+", s)
    if re.search(r"\d", s):
        return False
    if not words:
        return True
    return len(words) <= 6 and words[-1].lower() in ("and", "or")


def _last_box(text: str) -> re.Match | None:
    r"""The last ``\boxed``/``\fbox`` token of *text*, found from the end (each candidate is looked at once)."""
    end = len(text)
    while end > 0:
        at = max(text.rfind("\\boxed", 0, end), text.rfind("\\fbox", 0, end))
        if at < 0:
            return None
        match = _BOX_ANY_RE.match(text, at)
        if match:
            return match
        end = at
    return None


def _final_boxes(text: str) -> list[str] | None:
    """Contents of the final group of boxes (see module docstring); [] for a broken or over-long last box; None:
    no box. Only boxes within reach of the last one are looked at, however long the text before them."""
    last = _last_box(text)
    if last is None:
        return None
    starts = list(_BOX_ANY_RE.finditer(text, max(0, last.start() - _MAX_GROUP * _BOX_REACH), last.end()))
    group: list[str] = []
    stop = len(text)
    next_start = None
    for match in reversed(starts[-_MAX_GROUP:]):
        box = _box_at(text, match, stop)
        if box is None:
            if not group:
                return []
            break
        content, end = box
        if next_start is not None and not _separator_joins(text[end:next_start]):
            break
        group.append(content.strip())
        next_start, stop = match.start(), match.start()
    unique = list(dict.fromkeys(c for c in reversed(group) if c))
    return unique


def _answer_region(text: str) -> str:
    """The part of a completion that may hold its final answer (rule 1 of the module docstring)."""
    if "<answer>" in text:
        tags = _ANSWER_TAG_RE.findall(text)
        if tags and tags[-1].strip():
            text = tags[-1]
    if "</think>" in text:
        after = text.rsplit("</think>", 1)[1]
        if after.strip():
            text = after
    token = _CHAT_TOKEN_RE.search(text)
    if token and text[: token.start()].strip():
        text = text[: token.start()]
    return text


def _span_matches(text: str):
    r"""The matches of ``_SPAN_RE`` in *text*, in linear time (read contents from *text*, not from the matches).

    ``_SPAN_RE`` alone is quadratic when ``\(`` or ``\[`` openers have no closer after them (``\(`` a million
    times: each one scans to the end), so those openers, which can match nothing, are blanked out of a copy of
    the text (``(`` -> ``\x01``, same length) that the regular expression then reads. Every other opener that
    fails does so at most once or twice (a ``$`` or ``$$`` lacks a closer only after the last one).
    """
    return _SPAN_RE.finditer(_blank_dead_openers(text))


def _blank_dead_openers(text: str) -> str:
    r"""*text* with each ``\(`` / ``\[`` that has no closer after it turned into ``\`` + ``\x01``."""
    for opener, closer in (("\\(", "\\)"), ("\\[", "\\]")):
        cut = max(text.rfind(closer) - 2, 0)
        if opener in text[cut:]:
            text = text[:cut] + text[cut:].replace(opener, "\\\x01")
    return text


def math_spans(text: str) -> list[tuple[int, int, str]]:
    r"""(start, end, content) of the ``$...$``, ``$$...$$``, ``\(...\)``, ``\[...\]`` spans of *text*."""
    spans = []
    for m in _span_matches(text):
        group = m.lastindex
        content = text[m.start(group) : m.end(group)].strip()
        if group == 2 and "\n" in content:
            continue  # inline math does not run across lines
        spans.append((m.start(), m.end(), content))
    return spans


def _masked(text: str, spans: list[tuple[int, int, str]]) -> str:
    """*text* with every math span replaced by the same number of ``M`` characters."""
    out, last = [], 0
    for start, end, _ in spans:
        out.append(text[last:start])
        out.append("\x00" * (end - start))
        last = end
    out.append(text[last:])
    return "".join(out)


def _prose_words(text: str) -> list[str]:
    """English words outside LaTeX commands, ``\\text{}`` wrappers and environment names (not ``xy``)."""
    text = re.sub(r"\\(?:begin|end)\s*\{[^{}]*\}", " ", _WRAPPER_RE.sub(" ", text))
    return [w for w in _WORD_RE.findall(text) if len(w) >= 4 or w.lower() in _SHORT_WORDS]


def _outside_spans(text: str) -> tuple[str, bool]:
    """*text* with each math span replaced by one NUL, and whether it has any span (the C regex's own
    substitution when no inline span can run across lines: a megabyte of spans in a fraction of a second)."""
    if "$" not in text and "\\(" not in text and "\\[" not in text:
        return text, False
    if "\n" not in text:
        outside, count = _SPAN_RE.subn("\x00", _blank_dead_openers(text))
        return outside, count > 0  # blanked openers read as they did: "\\\x01" holds no word, digit or space
    pieces, last = [], 0
    for start, end, _ in math_spans(text):
        pieces += [text[last:start], "\x00"]
        last = end
    pieces.append(text[last:])
    return "".join(pieces), last > 0


def _is_all_math(text: str) -> bool:
    """Rule 5: math spans joined by connectives, or a bare answer with at most one prose word (at any length)."""
    masked, spans = _outside_spans(text)
    if spans:
        outside = re.sub(r"[\x00\s,.;:!]+", " ", masked)
        words = _prose_words(outside)
        return all(w.lower() in _CONNECTIVES or w.lower() in _UNIT_WORDS for w in words) and not re.search(
            r"\d", outside
        )
    if "\n\n" in text.strip():
        return False
    prose = count = 0
    for token in _TOKEN_RE.finditer(_WRAPPER_RE.sub(r" \1 ", text)):  # read lazily: a megabyte stops at its 2nd word
        count += 1
        word = token.group(0).rstrip(".,;:!?").lower()
        if _LETTERS_RE.fullmatch(word) and word not in _NOT_PROSE:
            if _VERB_RE.fullmatch(word):
                return False
            prose += 1
        if prose > 1 or (prose == 1 and count > 3):
            return False
    return True


def _sentences(text: str, masked: str) -> list[tuple[int, int]]:
    """(start, end) of the sentences of *text*: split on . ! ? or a line break outside math spans, and
    after a displayed formula (``$$...$$``, ``\\[...\\]``) that the next sentence follows."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)|\n", masked)]
    ends += [m.end() for m in re.finditer(r"(?:\$\$|\\\])(?=\s+[A-Z])", text) if masked[m.end() - 1] == "\x00"]
    bounds, start = [], 0
    for end in sorted(set(ends)):
        if end > start:
            bounds.append((start, end))
        start = end
    if start < len(text):
        bounds.append((start, len(text)))
    return bounds


def _is_mathy(content: str) -> bool:
    """A math span worth reading as an answer (not prose in dollars such as ``$? just about 1$``)."""
    words = [w for w in _prose_words(content) if w.lower() not in _CONNECTIVES]
    return bool(content.strip()) and not words


def _join_spans(contents: list[str]) -> str:
    return ", ".join(c for c in contents if c)


def _leading_answer(clause: str) -> str | None:
    """The answer a clause starts with: math spans (joined by connectives), a number, or a short phrase."""
    clause = clause.strip().lstrip(":*\\\"'“").strip()
    if not clause:
        return None
    spans = math_spans(clause)
    if spans and spans[0][0] == 0 and _is_mathy(spans[0][2]):
        taken, end = [spans[0][2]], spans[0][1]
        for start, stop, content in spans[1:]:
            gap = clause[end:start].strip(" ,;")
            if gap.lower() not in ("and", "or", "", "\\text{and}", "\\text{or}") or not _is_mathy(content):
                break
            taken.append(content)
            end = stop
        return _join_spans(taken)
    number = _NUMBER_RE.match(clause)
    if number:
        return number.group(0)
    letter = re.match(r"\(?([A-E])\)?(?=[\s,.;:]|$)", clause)
    if letter:
        return letter.group(1)  # "the answer is B, since ..."
    return None


def _answer_in_clause(clause: str) -> str | None:
    """The answer stated by a clause: leading answer, else after its last verb, else last math/number."""
    clause = clause.strip().lstrip(":*").strip().rstrip(".").strip()
    if not clause:
        return None
    lead = _leading_answer(clause)
    if lead:
        return lead
    spans = math_spans(clause)
    masked = _masked(clause, spans)
    verbs = list(_VERB_RE.finditer(masked))
    if verbs:
        rest = clause[verbs[-1].end() :]
        after = _leading_answer(rest)
        rest_masked = masked[verbs[-1].end() :]
        if after and len(_NUMBER_RE.findall(rest_masked)) + len(re.findall("\x00+", rest_masked)) <= 1:
            return after
    mathy = [s for s in spans if _is_mathy(s[2])]
    if mathy:
        return mathy[-1][2]
    numbers = list(_NUMBER_RE.finditer(clause.replace("$", " ")))  # prose in dollars: read its numbers
    if numbers:
        return numbers[-1].group(0)
    return None


_TOO_LONG = object()  # an answer that runs past MAX_ANSWER_CHARS: extract_answer returns None, no later rule is asked


def _after_phrase(text: str) -> str | object | None:
    """Rule 4: the answer after the last "answer is"/"answer:" phrase, read to the end of its sentence; ``_TOO_LONG``
    when that is all math and runs past ``MAX_ANSWER_CHARS``."""
    last = None
    for last in _ANSWER_IS_RE.finditer(text):
        pass
    if last is None:
        return None
    tail = text[last.end() : last.end() + MAX_ANSWER_CHARS]
    spans = math_spans(tail)
    masked = _masked(tail, spans)
    end = re.search(r"[.!?](?=\s|$)|\n\s*\n|\n(?=\s*[A-Z*#])", masked)
    clause = tail[: end.start()] if end else tail
    cut = end is None and last.end() + MAX_ANSWER_CHARS < len(text)  # the sentence goes on past the window
    clause = clause.strip().strip("*").strip()
    if not clause:
        return None
    if len(spans) == 1 and spans[0][0] == tail.find(clause) and spans[0][1] - spans[0][0] == len(clause) and not cut:
        return spans[0][2]
    if _is_all_math(clause):
        return _TOO_LONG if cut else clause
    return _answer_in_clause(clause)


def _tail(text: str) -> str:
    """The last ``_TAIL_CHARS`` characters, starting at a paragraph or line break so that no math span is cut."""
    if len(text) <= _TAIL_CHARS:
        return text
    cut = len(text) - _TAIL_CHARS
    for boundary in ("\n\n", "\n"):
        at = text.find(boundary, cut)
        if 0 <= at < len(text) - 200:
            return text[at:]
    before = text[:cut]
    unpaired = (len(re.findall(r"(?<!\\)\$", before)) - 2 * before.count("$$")) % 2
    return text[cut + (text[cut:].find("$") + 1 if unpaired else 0) :]


def _concluding_sentence_answer(text: str) -> str | None:
    """Rule 6: the answer of the last sentence that holds a math span or a number."""
    tail = _tail(text)
    spans = math_spans(tail)
    masked = _masked(tail, spans)
    for start, end in reversed(_sentences(tail, masked)):
        if not _NUMBER_RE.search(tail[start:end].replace("$", " ")) and "\x00" not in masked[start:end]:
            continue
        answer = _answer_in_clause(tail[start:end])
        if answer:
            return answer
    return None


@functools.lru_cache(maxsize=4096)
def _extract_cached(completion: str) -> str | None:
    text = _answer_region(completion)
    boxes = _final_boxes(text)
    if boxes is not None:
        last_box = text.rfind("\\boxed")
        later = _FINAL_ANSWER_RE.search(text, max(last_box, text.rfind("\\fbox"), 0))
        if boxes and later and _BOX_ANY_RE.search(text, later.end()) is None:
            phrase = _after_phrase(text[later.start() :])
            if phrase is _TOO_LONG:
                return None
            if phrase:
                return phrase  # "Final Answer: ..." written after the last box restates the answer
        return ", ".join(boxes) or None  # a broken last box is a broken answer: no fall-back
    gsm8k = _GSM8K_RE.search(text, max(text.rfind("####"), 0))
    if gsm8k and gsm8k.group(1).strip():
        return gsm8k.group(1).strip()
    phrase = _after_phrase(text)
    if phrase is _TOO_LONG:
        return None
    if phrase:
        return phrase
    stripped = text.strip()
    if _is_all_math(stripped):
        return stripped or None
    sentence = _concluding_sentence_answer(text)
    if sentence:
        return sentence
    if len(stripped.split()) <= 4 and not stripped.endswith((".", "!", "?")):
        return stripped  # a few words such as "No solution"
    return None


def extract_answer(completion: str) -> str | None:
    r"""The final answer of a completion (see the module docstring for the order of the rules)."""
    if not isinstance(completion, str) or not completion.strip():
        return None
    if len(completion) <= 20_000:
        return _extract_cached(completion)
    return _extract_cached.__wrapped__(completion)


def gold_text(gold: Any) -> str | None:
    """A dataset's gold value as an answer string (list -> element 0, 27.0 -> "27", box, ####, solution)."""
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
    if _PLAIN_GOLD_RE.fullmatch(gold):
        return gold.strip() or None
    if "####" in gold and not _BOX_ANY_RE.search(gold):
        return gold[gold.rfind("####") + 4 :].strip().split("\n", 1)[0] or None
    if _BOX_ANY_RE.search(gold) and not _final_boxes(gold):
        tail = gold[list(_BOX_ANY_RE.finditer(gold))[-1].end() :].strip().lstrip("{").strip()
        return tail[:MAX_ANSWER_CHARS] or None  # a gold whose last box is left open: the rest of it
    if len(gold) <= 300 and "\n" not in gold.strip() and not _BOX_ANY_RE.search(gold):
        if not _SENTENCE_BREAK_RE.search(_masked(gold, math_spans(gold))) and not _ANSWER_IS_RE.search(gold):
            return gold.strip() or None  # a one-line gold answer is taken as written
    return extract_answer(gold)


def gold_candidates(gold: Any) -> list[str]:
    """The gold answer as written and, for a one-line gold that reads as a sentence, its extracted answer."""
    primary = gold_text(gold)
    if primary is None:
        return []
    if isinstance(gold, (list, tuple)):
        gold = gold[0] if gold else None
    if isinstance(gold, str) and primary == gold.strip() and not _PLAIN_GOLD_RE.fullmatch(gold):
        extracted = extract_answer(gold)
        if extracted and extracted != primary:
            return [primary, extracted]
    return [primary]


def choice_of_gold(answer: str) -> tuple[str, str] | None:
    """(letter, option text) when a gold answer is a multiple-choice option such as ``C`` or ``(B) Paris``."""
    first = answer.lstrip()[:1]
    if not first or first not in "(ABCDE$\\":
        return None
    s = _WRAPPER_RE.sub(r"\1", answer.replace("$", " ")).strip()
    if len(s) > 200:
        return None
    m = _CHOICE_FORM_RE.fullmatch(s)
    if not m:
        return None
    letter = m.group(1) or m.group(2) or m.group(4)
    text = (m.group(3) if m.group(4) is None else m.group(5)) or ""
    return letter, text.strip()


def _choice_only(answer: str) -> str | None:
    """The letter of an answer that is nothing but a choice (``B``, ``(B)``, ``B. text``); else None."""
    found = choice_of_gold(answer)
    return found[0] if found else None


def choice_in_completion(completion: str) -> str | None:
    """The multiple-choice letter a completion picks (see the module docstring), or None."""
    if not isinstance(completion, str) or not completion.strip():
        return None
    text = _answer_region(completion)
    boxes = _final_boxes(text)
    if boxes is not None:
        return _choice_only(boxes[-1]) if len(boxes) == 1 else None
    last = None
    for last in _ANSWER_IS_RE.finditer(text):
        pass
    if last is not None:
        clause = re.split(r"[.!?](?=\s|$)|\n", text[last.end() : last.end() + 300], maxsplit=1)[0]
        clause = _WRAPPER_RE.sub(r" \1 ", clause).replace("$", " ")
        letter = _STANDALONE_LETTER_RE.search(clause)
        if letter:
            if _HEDGED_CHOICE_RE.match(clause, letter.end()):
                return None  # "the answer is A or B" picks nothing
            return letter.group(1)
    stripped = _WRAPPER_RE.sub(r" \1 ", text).replace("$", " ").strip()
    whole = _choice_only(stripped) if len(stripped) <= 200 else None
    if whole or _is_all_math(text):
        return whole  # a bare answer is a choice only when it is nothing but one
    lead = re.match(r"\(?([A-E])[.):](?:\s|$)", stripped)
    if lead:
        return lead.group(1)
    letters = list(_STANDALONE_LETTER_RE.finditer(stripped[-_TAIL_CHARS:]))
    return letters[-1].group(1) if letters else None
