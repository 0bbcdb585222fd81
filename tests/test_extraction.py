r"""Tests for gvm_trl.answers.extraction: where the final answer of a completion (or a gold field) is."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gvm_trl.answers.extraction import (
    MAX_ANSWER_CHARS,
    choice_in_completion,
    choice_of_gold,
    extract_answer,
    gold_candidates,
    gold_text,
    math_spans,
)
from gvm_trl.rewards import grade_answer

REASONING = "First we expand the product and collect like terms; then we check both cases. "

ANSWERS = [
    # boxes and groups of boxes
    ("box_group_commas", r"so $\boxed{2}$, $\boxed{-3}$.", "2, -3"),
    ("box_group_labels_and", r"$a = \boxed{1}$ and $b = \boxed{4}$", "1, 4"),
    ("box_group_quad_text", r"\boxed{(0,1)} \quad\text{and}\quad \boxed{(1,0)}", "(0,1), (1,0)"),
    ("box_group_few_words", r"\boxed{3} apples and \boxed{5}", "3, 5"),
    ("boxes_with_a_sentence_between", r"\boxed{3} is wrong, as shown by the check above; so \boxed{5}", "5"),
    ("boxes_separated_by_digits", r"\boxed{3} + 4 = \boxed{7}", "7"),
    ("identical_boxes_once", r"\boxed{7}\n\n**Final Answer**\n\boxed{7}", "7"),
    ("box_then_final_answer_line", r"so \boxed{12} in May. Final Answer: The final answer is 15. I hope it is correct.", "15"),
    ("final_answer_inside_box_sentence", r"Final Answer: the total is $\boxed{40}$.", "40"),
    ("broken_last_box", r"\boxed{1} and then \boxed{2", None),
    # answer region
    ("answer_tags", "<think>it could be 9</think>\n<answer>The answer is 11</answer>", "11"),
    ("after_think", "<think>maybe \\boxed{9}</think> So it is \\boxed{10}.", "10"),
    ("chat_template_tail", "The result is 8.<|im_end|><|im_start|>user\nwhat about 9?", "8"),
    # phrases
    ("answer_is_first_letter", "After checking, the answer is B, since A and C fail.", "B"),
    ("final_answer_heading", "## Final Answer\n\n42", "42"),
    ("answer_is_after_name", "Final Answer: The largest possible $r$ is 17.", "17"),
    ("answer_is_quoted_spans", 'The final answer is "$3$ and $4$". I hope it is correct.', '"$3$ and $4$"'),
    ("answer_colon_chinese", "所以答案是 960", "960"),
    # whole texts that are all math
    ("bare_spans_connective", "$5$ or $-5$", "$5$ or $-5$"),
    ("bare_option", "(B) Paris", "(B) Paris"),
    ("bare_unit_words", "12 square units", "12 square units"),
    ("few_words", "No solution", "No solution"),
    ("not_a_sentence_answer", "I do not know.", None),
    # concluding sentence
    ("after_is", REASONING + "Hence the perimeter is 36 cm.", "36"),
    ("after_are", REASONING + "So there are 14 such numbers.", "14"),
    ("after_is_with_two_numbers", REASONING + "The value is 3.5 and then 7 apples", "7"),
    ("last_math_span", REASONING + r"Therefore $y = -\frac{1}{2}$ works.", r"y = -\frac{1}{2}"),
    ("display_math_ends_sentence", REASONING + r"We get $$x = 3.$$ Dividing by two gives 1.5 as the ratio.", "1.5"),
    ("prose_in_dollars_skipped", REASONING + "how many $? about 4$", "4"),
    ("digit_in_word_not_a_number", REASONING + "The password is K7Q.", None),
    ("percent_kept", REASONING + "The increase is 25 percent.", "25 percent"),
    ("fraction_number", REASONING + "The probability is 3/8.", "3/8"),
    ("gsm8k", "24 + 48 = 72 clips\n#### 72", "72"),
]


@pytest.mark.parametrize("text,expected", [c[1:] for c in ANSWERS], ids=[c[0] for c in ANSWERS])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_math_spans_kinds_and_inline_lines():
    text = r"a $x$ b $$y$$ c \(z\) d \[w\] e $no" + "\n" + "pe$"
    assert [c for _, _, c in math_spans(text)] == ["x", "y", "z", "w"]


GOLDS = [
    ("list_first", ["$3$", "$4$"], "$3$"),
    ("integral_float", 27.0, "27"),
    ("fraction_float", 0.25, "0.25"),
    ("boxed_solution", r"so the answer is $\boxed{1.6} \mathrm{~cm}$", "1.6"),
    ("gsm8k", "48/2 = 24\n#### 72", "72"),
    ("one_line_kept_whole", "$f(x)=ax+b$, where $b$ is any integer", "$f(x)=ax+b$, where $b$ is any integer"),
    ("open_box_rest", r"\boxed{x = 2 \text{ and } x = 5", r"x = 2 \text{ and } x = 5"),
    ("solution_text", REASONING + "\nThe answer is therefore $\\frac{3}{4}$.", r"\frac{3}{4}"),
    ("none", None, None),
    ("nan", float("nan"), None),
]


@pytest.mark.parametrize("gold,expected", [c[1:] for c in GOLDS], ids=[c[0] for c in GOLDS])
def test_gold_text(gold, expected):
    assert gold_text(gold) == expected


def test_gold_candidates_add_the_extracted_answer_of_a_sentence():
    assert gold_candidates("So the inverse is $-1$.") == ["So the inverse is $-1$.", "-1"]
    assert gold_candidates("$(3, 4)$") == ["$(3, 4)$"]
    assert gold_candidates("12") == ["12"]
    assert gold_candidates([]) == []


CHOICE_GOLDS = [
    ("letter", "C", ("C", "")),
    ("parenthesised_with_text", "(B) Paris", ("B", "Paris")),
    ("dot_with_text", "D. x = 4", ("D", "x = 4")),
    ("letter_and_name", "A Peter", ("A", "Peter")),
    ("text_macro", r"\text{(E)}", ("E", "")),
    ("expression_not_choice", r"\mathrm{B}+1", None),
    ("letter_digit_not_choice", "B2", None),
    ("number_not_choice", "12", None),
    ("variable_expression", "x + 1", None),
]


@pytest.mark.parametrize("gold,expected", [c[1:] for c in CHOICE_GOLDS], ids=[c[0] for c in CHOICE_GOLDS])
def test_choice_of_gold(gold, expected):
    assert choice_of_gold(gold) == expected


CHOICE_COMPLETIONS = [
    ("boxed_letter", r"so \boxed{D}", "D"),
    ("boxed_expression", r"so \boxed{D+1}", None),
    ("answer_is_first_letter", "The answer is for sure C, it cannot be A or B.", "C"),
    ("leading_letter", "E. because the others fail", "E"),
    ("last_standalone_letter", "It is not A, because of the sign, so I pick B", "B"),
    ("bare_math_not_a_letter", r"\mathrm{E}*2", None),
    ("no_letter", "The value is 12.", None),
    ("hedged_letters", "The answer is A or B.", None),
    ("letter_then_rejected_ones", "The answer is D, not A or B.", "D"),
]


@pytest.mark.parametrize("text,expected", [c[1:] for c in CHOICE_COMPLETIONS], ids=[c[0] for c in CHOICE_COMPLETIONS])
def test_choice_in_completion(text, expected):
    assert choice_in_completion(text) == expected


@pytest.mark.parametrize(
    "text",
    ["$" * 1_000_000, "\\boxed{1}, " * 100_000, "is 5. " * 200_000, "(" * 1_000_000, "\\(" * 500_000],
    ids=["dollars", "boxes", "sentences", "parens", "delimiters"],
)
def test_megabyte_texts_are_fast(text):
    """Linear, not quadratic: a megabyte takes well under a second of CPU (this process's CPU time, which a loaded
    machine inflates far less than the wall clock)."""
    start = time.process_time()
    extract_answer(text)
    choice_in_completion(text)
    gold_text(text)
    assert time.process_time() - start < 3.0


def test_non_strings():
    assert extract_answer(None) is None  # type: ignore[arg-type]
    assert choice_in_completion(42) is None  # type: ignore[arg-type]
    assert gold_text(7) == "7"


# ---------------------------------------------------------------------------------------------
# The length cap: the same rule at every size
# ---------------------------------------------------------------------------------------------


def _repeat(unit: str, sep: str, size: int) -> tuple[str, int]:
    count = max(1, size // (len(unit) + len(sep)))
    return sep.join([unit] * count), count


def _nested_fraction(size: int) -> tuple[str, int]:
    depth = max(1, size // 10)
    return "\\frac{1}{" * depth + "2" + "}" * depth, depth


# (id, completion of an answer of about `size` characters, its gold): each is graded True when short
LONG_FORMS = [
    ("box_list", lambda n: (r"So $\boxed{%s}$." % _repeat("1", ",", n)[0], "1")),
    ("box_sum", lambda n: (r"So $\boxed{%s}$." % _repeat("1", "+", n)[0], str(_repeat("1", "+", n)[1]))),
    ("box_variable_sum", lambda n: (r"\boxed{%s}" % _repeat("x", "+", n)[0], f"{_repeat('x', '+', n)[1]}x")),
    ("box_nested_fraction", lambda n: (r"\boxed{%s}" % _nested_fraction(n)[0],
                                       "2" if _nested_fraction(n)[1] % 2 == 0 else r"\frac{1}{2}")),
    ("dollar_list", lambda n: ("The result is $%s$." % _repeat("1", ",", n)[0], "1")),
    ("answer_is_list", lambda n: ("The answer is %s." % _repeat("1", ", ", n)[0], "1")),
    ("answer_is_sum", lambda n: ("The answer is %s." % _repeat("1", " + ", n)[0], str(_repeat("1", " + ", n)[1]))),
    ("bare_sum", lambda n: (_repeat("1", "+", n)[0], str(_repeat("1", "+", n)[1]))),
    ("answer_tag_list", lambda n: ("<think>ok</think><answer>%s</answer>" % _repeat("1", ",", n)[0], "1")),
    ("gsm8k_list", lambda n: ("We add.\n#### %s" % _repeat("1", ",", n)[0], "1")),
]
LONG_SIZES = [1 << 10, 4 << 10, 64 << 10, 1 << 20]


@pytest.mark.parametrize("form", [f for _, f in LONG_FORMS], ids=[i for i, _ in LONG_FORMS])
def test_an_answer_past_the_length_cap_is_refused_at_every_size(form):
    """The same answer form, 1 KB to 1 MB long, is refused the same way (a 1 MB ``\\boxed{1,1,...}`` once passed
    where 4 KB did not: the box search started 200,000 characters from the end and missed the box)."""
    short, gold = form(40)
    assert grade_answer(short, gold), "the form itself is accepted when short"
    for size in LONG_SIZES:
        completion, gold = form(size)
        start = time.process_time()  # refused before any parsing: all of it in this process
        answer = extract_answer(completion)
        assert answer is None or len(answer) > MAX_ANSWER_CHARS, (size, answer and answer[:40])
        assert grade_answer(completion, gold, timeout=2.0) is False, size
        assert time.process_time() - start < 3.0, size


@pytest.mark.parametrize("template", ["The answer is {}.", "{}", "<answer>{}</answer>"],
                         ids=["answer_is", "bare", "answer_tag"])
def test_a_long_sum_is_never_read_as_one_of_its_numbers(template):
    """``1 + 1 + ... + 1`` past 300 characters was read by its first number, so it matched a gold of 1."""
    for size in (200, 400, 900, 4 << 10, 64 << 10):
        completion = template.format(_repeat("1", " + ", size)[0])
        assert grade_answer(completion, "1", timeout=2.0) is False, size


def test_an_over_long_box_ends_a_group_of_boxes():
    """Its closing brace is looked for only as far as the cap, so it cannot join the box after it."""
    long_box = r"\boxed{" + ",".join(["1"] * 600) + "}"
    assert extract_answer(long_box + r", \boxed{5}") == "5"
    assert extract_answer(r"\boxed{4}, " + long_box) is None
    assert extract_answer(r"\boxed " + "7" * (MAX_ANSWER_CHARS + 10)) is None


def test_a_box_anywhere_in_a_long_completion_is_found():
    reasoning = "We check each case in turn and keep the ones that work. " * 20_000
    assert extract_answer(r"\boxed{12} " + reasoning) == "12"
    assert extract_answer(reasoning + r"\boxed{3}, \boxed{4}" + reasoning) == "3, 4"


LAZY_SPANS = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$((?:\\\$|[^$])+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)


def _lazy_math_spans(text: str) -> list[tuple[int, int, str]]:
    """math_spans as it was written before (the lazy pattern, quadratic on openers without a closer)."""
    out = []
    for m in LAZY_SPANS.finditer(text):
        content = next(g for g in m.groups() if g is not None)
        if m.group(2) is None or "\n" not in content.strip():
            out.append((m.start(), m.end(), content.strip()))
    return out


SPAN_PIECES = ["$", "$$", "\\", "\\$", "\\\\", "(", ")", "[", "]", "\\(", "\\)", "\\[", "\\]", "x", " ", "\n", "1"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(SPAN_PIECES), max_size=24))
def test_math_spans_are_those_of_the_lazy_pattern(pieces):
    text = "".join(pieces)
    assert math_spans(text) == _lazy_math_spans(text)


@pytest.mark.parametrize("text", ["\\[" * 500_000, "$x$ " * 200_000 + "\\(" * 200_000, "$" + "y" * 1_000_000 + "$"],
                         ids=["brackets", "spans_then_openers", "megabyte_span"])
def test_math_spans_take_linear_time(text):
    start = time.process_time()
    math_spans(text)
    extract_answer(text)
    assert time.process_time() - start < 3.0
