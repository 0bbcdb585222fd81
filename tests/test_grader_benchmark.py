"""Smoke test of benchmarks/grader.py: its --quick mode on the two small sets, and its restated golds."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from conftest import load_benchmark

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def grader():
    yield load_benchmark("grader")
    sys.modules.pop("benchmark_grader", None)


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


def test_math_verify_is_graded_side_by_side(grader, tmp_path):
    pytest.importorskip("math_verify")
    output = tmp_path / "grader.json"
    grader.main(["--quick", "--baseline", "none", "--sets", "amc23", "--throughput-n", "20", "--output", str(output)])
    report = json.loads(output.read_text())
    mv = report["math_verify"]
    assert mv["version"] and mv["sets"]["amc23"]["self_consistency"]["n"] == 40
    assert report["false_acceptance"]["perturbed_math_verify"]["n"] == report["false_acceptance"]["perturbed_now"]["n"]
    assert all("math_verify" in speeds for speeds in report["throughput_answers_per_s"].values())
    verifier = grader.MathVerify()  # TRL's accuracy_reward: a boxed equal answer passes, a different one does not
    assert verifier.grade(r"so \boxed{\frac{1}{2}}", "0.5", 5.0) and not verifier.grade(r"\boxed{3}", "4", 5.0)


def test_a_revision_served_by_another_python_grades_as_in_process(grader):
    """The baseline server (benchmarks/verifier_server.py), here this interpreter serving the last commit's verifier."""
    served = grader.ProcessBaseline("HEAD", sys.executable)
    pairs = [(r"The answer is \boxed{\sqrt{8}}.", r"2\sqrt{2}"), (r"\boxed{x^2+1}", "1+x^2"), (r"\boxed{7}", "8"),
             (r"so $x = \frac{3}{4}$", "0.75"), (r"\boxed{(1,2)}", "(2,1)")]
    expected = [grader.grade_answer(c, g) for c, g in pairs]
    assert expected == [True, True, False, True, False]
    assert [served.grade(c, g, 5.0) for c, g in pairs] == expected
    served.cold()
    assert served.sympy_pairs(pairs, 5.0) == grader.CurrentVerifier().sympy_pairs(pairs, 5.0)
    assert 0.0 < served.time_chunk(pairs, 5.0) < 60.0


def test_throughput_mode_compares_serial_and_batched_grading(grader, tmp_path):
    output = tmp_path / "throughput.json"
    code = grader.main(["--throughput", "--quick", "--sets", "amc23", "--throughput-n", "20", "--expensive", "2",
                        "--timeout", "0.5", "--batch-size", "8", "--workers", "2", "--output", str(output)])
    report = json.loads(output.read_text())
    assert code == 0 and report["workers"] == 2 and report["batch_size"] == 8
    for case in ("realistic_mix", "expensive_batch"):
        r = report[case]
        assert r["identical"] and r["serial_rows_per_s"] > 0 and r["batched_rows_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["serial_s"] / r["batched_s"], rel=0.02, abs=0.1)  # times rounded to ms
    assert report["expensive_batch"]["expensive_rows"] == 2 and report["expensive_batch"]["n"] == 8
    assert report["expensive_batch"]["accepted"] <= 6  # the two expensive rows time out: correct, not accepted
