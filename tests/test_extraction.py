r"""Tests for gvm_trl.answers.extraction: where the final answer of a completion (or a gold field) is."""

from __future__ import annotations

import time

import pytest

from gvm_trl.answers.extraction import (
    choice_in_completion,
    choice_of_gold,
    extract_answer,
    gold_candidates,
    gold_text,
    math_spans,
)

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
    start = time.monotonic()
    extract_answer(text)
    choice_in_completion(text)
    gold_text(text)
    assert time.monotonic() - start < 3.0


def test_non_strings():
    assert extract_answer(None) is None  # type: ignore[arg-type]
    assert choice_in_completion(42) is None  # type: ignore[arg-type]
    assert gold_text(7) == "7"
