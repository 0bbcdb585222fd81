"""Datasets: the five bundled evaluation sets, training-prompt loaders and the arithmetic demo task.

Every loader returns a `datasets.Dataset` in TRL's format: a conversational ``prompt`` column (the paper's
system and user template, ALGORITHM.md §4) and an ``answer`` column holding the gold final answer as a
string, which is what :func:`gvm_trl.rewards.math_reward` reads.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import datasets

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
USER_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}"

EVAL_SETS = ("math500", "minerva_math", "olympiad_bench", "aime24", "amc23")
EVAL_DISPLAY_NAMES = {
    "math500": "Math500",
    "minerva_math": "Minerva Math",
    "olympiad_bench": "Olympiad Bench",
    "aime24": "AIME24",
    "amc23": "AMC23",
}

# Shipped inside the package (package-data), so that they load from an installed wheel, not only from a clone.
BUNDLED_TRAIN_SETS = {
    "gsm8k": "gsm8k_train.jsonl.gz",
    "gsm8k_test": "gsm8k_test.jsonl.gz",
    "math": "math_train_12k.jsonl.gz",
}

PROBLEM_COLUMNS = ("problem", "question", "prompt", "query", "input")
ANSWER_COLUMNS = ("answer", "gt", "ground_truth", "final_answer", "solution", "target")


def _read_jsonl(path: Path | Any) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def normalize_gold(value: Any) -> str:
    """A dataset's stored gold answer as one string.

    Lists keep their first element (OlympiadBench), integral floats lose their ``.0`` (AMC23), ``$`` math
    delimiters are removed, and GSM8K's ``#### x`` or a solution's last ``\\boxed{}`` is reduced to the
    final answer itself.
    """
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    elif "\\boxed" in text or "\\fbox" in text:
        from gvm_trl.rewards import extract_boxed

        text = extract_boxed(text) or text
    return re.sub(r"(?<!\\)\$", "", text).strip()  # math delimiters; an escaped \$ is a currency sign


def load_eval_dataset(name: str) -> datasets.Dataset:
    """One of the five bundled evaluation sets with uniform ``problem`` / ``answer`` string columns.

    The set's other columns (``solution``, ``level``, ``id``, ...) are kept, except Minerva Math's
    full-solution ``answer``, which moves to ``solution`` once its boxed gold answer is extracted.
    """
    if name not in EVAL_SETS:
        raise ValueError(f"Unknown evaluation set {name!r}; choose one of {', '.join(EVAL_SETS)}.")
    rows = _read_jsonl(resources.files(__package__) / f"{name}.jsonl")
    for row in rows:
        if name == "minerva_math":
            row["solution"] = row["answer"]
        if isinstance(row.get("solution"), list):
            row["solution"] = "\n".join(row["solution"])
        row["answer"] = normalize_gold(row["answer"])
        row.pop("question", None)
    return datasets.Dataset.from_list(rows)


def make_conversation(problem: str, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The paper's chat prompt for one problem (system turn optional)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": problem + USER_SUFFIX})
    return messages


def _pick_column(columns: list[str], candidates: tuple[str, ...], wanted: str | None, role: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"The {role} column {wanted!r} is not in the dataset (columns: {columns}).")
        return wanted
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise ValueError(
        f"Cannot find the {role} column among {columns}; pass `{role}_column=` naming it "
        f"(looked for {', '.join(candidates)})."
    )


def _load_raw(name_or_path: str, split: str) -> datasets.Dataset:
    if name_or_path in BUNDLED_TRAIN_SETS:
        with resources.as_file(resources.files(__package__) / BUNDLED_TRAIN_SETS[name_or_path]) as path:
            if not path.exists():
                raise FileNotFoundError(
                    f"The bundled training set {name_or_path!r} is missing from this installation ({path}): "
                    "reinstall gvm-trl (`pip install --force-reinstall gvm-trl`) or pass a path."
                )
            return datasets.load_dataset("json", data_files=str(path), split="train")
    path = Path(name_or_path)
    if path.exists():
        suffixes = "".join(path.suffixes)
        builder = next(
            (kind for ext, kind in ((".json", "json"), (".parquet", "parquet"), (".csv", "csv")) if ext in suffixes),
            None,
        )
        if builder is not None:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir():
            saved = datasets.load_from_disk(str(path))
            return saved[split] if isinstance(saved, datasets.DatasetDict) else saved
        raise ValueError(f"Cannot read {path}: use a .json/.jsonl(.gz), .parquet or .csv file, or a saved dataset.")
    return datasets.load_dataset(name_or_path, split=split)


def load_train_dataset(
    name_or_path: str,
    *,
    split: str = "train",
    problem_column: str | None = None,
    answer_column: str | None = None,
    system_prompt: str | None = SYSTEM_PROMPT,
    limit: int | None = None,
    seed: int | None = None,
) -> datasets.Dataset:
    """Training prompts in TRL's conversational format with a gold ``answer`` column.

    ``name_or_path`` is a bundled name (``gsm8k``, ``gsm8k_test``, ``math``, ``arithmetic``), a local
    ``.json``/``.jsonl``/``.parquet``/``.csv`` file or saved dataset, or a Hub dataset id. The problem and
    gold columns are found by their usual names unless given; a gold column holding whole solutions
    (GSM8K's ``#### x``, MATH's ``\\boxed{}``) is reduced to the final answer. ``seed`` shuffles before
    ``limit`` takes the first rows.
    """
    if name_or_path == "arithmetic":
        return make_arithmetic_dataset(limit or 256, seed=seed or 0)
    raw = _load_raw(name_or_path, split)
    problem_col = _pick_column(raw.column_names, PROBLEM_COLUMNS, problem_column, "problem")
    answer_col = _pick_column(raw.column_names, ANSWER_COLUMNS, answer_column, "answer")
    if seed is not None:
        raw = raw.shuffle(seed=seed)
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))

    def to_prompt(row: dict) -> dict:
        problem = row[problem_col]
        if not isinstance(problem, str):
            raise ValueError(f"Column {problem_col!r} must hold problem text, got {type(problem).__name__}.")
        return {"prompt": make_conversation(problem, system_prompt), "answer": normalize_gold(row[answer_col])}

    return raw.map(to_prompt, remove_columns=raw.column_names)


ARITHMETIC_OPERATORS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}
ARITHMETIC_FEW_SHOT = (
    ("What is 12 + 7? Put the final answer in \\boxed{}.", "12 + 7 = 19. The answer is \\boxed{19}."),
    ("What is 6 * 8? Put the final answer in \\boxed{}.", "6 * 8 = 48. The answer is \\boxed{48}."),
)


def make_arithmetic_dataset(
    num_prompts: int, *, seed: int = 0, max_operand: int = 60, few_shot: bool = True
) -> datasets.Dataset:
    """Seeded two-operand arithmetic prompts ("What is 17 + 9?") with gold answers.

    Small instruction models solve such prompts some of the time and not others, which gives the spread
    of per-prompt accept rates GVM's allocation exploits. Two worked examples as earlier chat turns teach
    the ``\\boxed{}`` format. Different seeds give different prompts: use one seed for training and
    another for a held-out split.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(num_prompts):
        operator = rng.choice(sorted(ARITHMETIC_OPERATORS))
        a, b = rng.randint(2, max_operand), rng.randint(2, max_operand if operator != "*" else 12)
        question = f"What is {a} {operator} {b}? Put the final answer in \\boxed{{}}."
        messages = []
        if few_shot:
            for example_question, example_answer in ARITHMETIC_FEW_SHOT:
                messages += [
                    {"role": "user", "content": example_question},
                    {"role": "assistant", "content": example_answer},
                ]
        messages.append({"role": "user", "content": question})
        rows.append({"prompt": messages, "answer": str(ARITHMETIC_OPERATORS[operator](a, b))})
    return datasets.Dataset.from_list(rows)


__all__ = [
    "EVAL_SETS",
    "SYSTEM_PROMPT",
    "load_eval_dataset",
    "load_train_dataset",
    "make_arithmetic_dataset",
    "make_conversation",
    "normalize_gold",
]
