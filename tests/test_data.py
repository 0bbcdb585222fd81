import json

import pytest

from gvm_trl.data import (
    EVAL_SETS,
    SYSTEM_PROMPT,
    load_eval_dataset,
    load_train_dataset,
    make_arithmetic_dataset,
    normalize_gold,
)

EXPECTED_ROWS = {"math500": 500, "minerva_math": 272, "olympiad_bench": 675, "aime24": 30, "amc23": 40}


@pytest.mark.parametrize("name", EVAL_SETS)
def test_eval_sets_have_uniform_string_columns(name):
    dataset = load_eval_dataset(name)
    assert len(dataset) == EXPECTED_ROWS[name]
    assert {"problem", "answer"} <= set(dataset.column_names)
    assert all(isinstance(answer, str) and answer for answer in dataset["answer"])
    assert all(isinstance(problem, str) and problem for problem in dataset["problem"])


def test_eval_gold_answers_are_normalised():
    assert load_eval_dataset("amc23")["answer"][0] == "27"
    minerva = load_eval_dataset("minerva_math")
    assert minerva["answer"][0] == "1.6" and "\\boxed{1.6}" in minerva["solution"][0]
    olympiad = load_eval_dataset("olympiad_bench")
    assert not any("$" in answer for answer in olympiad["answer"])


def test_unknown_eval_set_names_the_choices():
    with pytest.raises(ValueError, match="math500"):
        load_eval_dataset("gsm9k")


@pytest.mark.parametrize(
    "stored, gold",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,080", "1080"),
        (27.0, "27"),
        (-1.0, "-1"),
        (["$(3,2),(-3,2)$"], "(3,2),(-3,2)"),
        ("so the answer is $\\boxed{\\frac{1}{2}}$ cm", "\\frac{1}{2}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ],
)
def test_normalize_gold(stored, gold):
    assert normalize_gold(stored) == gold


def test_bundled_gsm8k_in_trl_format():
    dataset = load_train_dataset("gsm8k", limit=3)
    assert sorted(dataset.column_names) == ["answer", "prompt"]
    assert dataset[0]["answer"] == "72"
    system, user = dataset[0]["prompt"]
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert user["role"] == "user" and user["content"].endswith("output the final answer within \\boxed{}")


def test_bundled_math_keeps_stored_answer():
    dataset = load_train_dataset("math", limit=2, system_prompt=None)
    assert dataset[0]["answer"] == "2" and len(dataset[0]["prompt"]) == 1


def test_local_file_with_custom_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"What is {i}+{i}?", "gt": 2 * i}) for i in range(4)))
    with pytest.raises(ValueError, match="problem_column"):
        load_train_dataset(str(path))
    dataset = load_train_dataset(str(path), problem_column="q", seed=0, limit=2)
    assert len(dataset) == 2 and all(answer.isdigit() for answer in dataset["answer"])


def test_arithmetic_task_is_seeded_and_correct():
    first, again, other = (make_arithmetic_dataset(20, seed=s) for s in (0, 0, 1))
    assert first["prompt"] == again["prompt"] and first["prompt"] != other["prompt"]
    for row in first:
        question = row["prompt"][-1]["content"]
        a, operator, b = question.removeprefix("What is ").split("?")[0].split()
        assert int(row["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[operator]
    assert [message["role"] for message in first[0]["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert load_train_dataset("arithmetic", limit=5, seed=3)["prompt"] == make_arithmetic_dataset(5, seed=3)["prompt"]
