"""Smoke test of benchmarks/grader.py: its --quick mode on the two small sets, and its restated golds."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def grader():
    spec = importlib.util.spec_from_file_location("benchmark_grader", BENCHMARKS / "grader.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_grader_quick(grader, tmp_path):
    output = tmp_path / "grader.json"
    code = grader.main(["--quick", "--baseline", "none", "--sets", "aime24", "amc23", "--throughput-n", "40",
                        "--output", str(output)])
    report = json.loads(output.read_text())
    assert code == 0
    assert report["sets"]["amc23"]["self_consistency"]["rate"] == 1.0
    assert report["false_acceptance"]["perturbed_now"]["n"] > 0
    assert report["false_acceptance"]["cross_gold_now"]["rate"] <= grader.MAX_FALSE_ACCEPTANCE
    assert report["families"]["rate"] == 1.0
    assert set(report["throughput_answers_per_s"]) >= {"realistic_mix", "realistic_mix_sympy", "common_int"}
    assert report["hostile"]["worst_s"] < report["hostile"]["timeout_s"] + 6.0


def test_restated_and_perturbed_forms(grader):
    rng = random.Random(1)
    for gold in ["12", r"\frac{3}{4}", r"2\sqrt{3}", "(1, 2)", "x + 1", "3, 5"]:
        restated = grader.restate(gold, rng)
        assert grader.grade_answer(restated, gold), (gold, restated)
        for wrong in grader.perturbations(gold):
            assert not grader.grade_answer(grader.synthetic(wrong), gold), (gold, wrong)
    assert grader.perturbations("0") == ["1"]  # "-0" would be the same answer
