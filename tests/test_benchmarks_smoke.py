"""Smoke tests of benchmarks/step_cost.py (--quick, tiny random model) and the letter task of benchmarks/letters.py."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import benchmark_modules, load_benchmark


@pytest.fixture(scope="module")
def step_cost():
    yield load_benchmark("step_cost")
    sys.modules.pop("benchmark_step_cost", None)


def test_step_cost_quick(step_cost, tmp_path):
    output = tmp_path / "step_cost.json"
    step_cost.main(["--quick", "--output", str(output)])
    report = json.loads(output.read_text())
    assert output.with_suffix(".png").stat().st_size > 0
    runs = report["runs"]
    assert set(runs) == {"grpo", "uniform", "gvm-sequential", "gvm-grpo", "gvm-raft"}
    # Equal completions: m·G for plain GRPO and uniform, N′m probes + (G − N′)m allocated for GVM. Probing ahead,
    # the first step also probes its own batch (+N′m) and the last probes none (−N′m).
    for config in ("grpo", "uniform", "gvm-sequential"):
        assert runs[config]["completions_per_step"] == [8, 8, 8]
    for config in ("gvm-grpo", "gvm-raft"):
        assert runs[config]["completions_per_step"] == [12, 8, 4]
    summaries = report["summary_seconds_per_step"]
    assert {"probe", "grad_norms", "allocate", "phase2", "probe_logps", "bookkeeping", "update", "step"} <= set(
        summaries["gvm-grpo"]
    )
    assert summaries["gvm-grpo"]["probe"] == 0 < summaries["gvm-sequential"]["probe"]  # one round per steady step
    # Probing ahead, RAFT++'s riding probes (all accepted) take their old log-probabilities from the gradient-norm
    # pass's forward: no forward of their own (sequential: none needed). GRPO's fold on a CPU depends on the batch's
    # accept rate (`folds_sampling_logps`).
    assert summaries["gvm-raft"]["probe_logps"] == 0 == summaries["gvm-sequential"]["probe_logps"]
    assert summaries["gvm-raft"]["grad_norms"] > 0 and summaries["gvm-grpo"]["grad_norms"] > 0
    assert summaries["uniform"]["generation"] > 0 and "grad_norms" not in summaries["uniform"]
    assert report["comparison_to_grpo"]["gvm-grpo"]["ratio_step"] > 0
    assert runs["grpo"]["memory"]["cpu_peak_rss_mib"] > 0


def test_kl_weighting_quick(tmp_path):
    output = tmp_path / "kl.json"
    load_benchmark("kl_weighting").main(["--quick", "--output", str(output)])
    result = json.loads(output.read_text())["results"]["0.04"]
    assert 0 < result["relative_difference_median"] < 0.5 and result["cosine_min"] > 0.9


def test_step_cost_lockstep_runs_the_workers_in_turn(step_cost, tmp_path):
    results = step_cost.run_lockstep(["grpo", "gvm-grpo"], ["--tiny", "--steps", "3", "--max-completion-length", "4"], 3)
    assert set(results) == {"grpo", "gvm-grpo"} and all(len(r["steps"]) == 3 for r in results.values())


def test_letter_task_reward_and_warm_start():
    """The letter task's verifier, and the warm start it promises: a random letter of a-j whatever the prompt, so a
    prompt with k letters starts at accept rate ≈ k/10."""
    with benchmark_modules("letters") as modules:
        letters = modules["letters"]
    assert letters.letter_reward([[{"role": "user", "content": "dbg"}]] * 3, ["b", "a", ""]) == [1.0, 0.0, 0.0]
    sets = letters.letter_sets(200, seed=3)
    assert sets == letters.letter_sets(200, seed=3) and sets != letters.letter_sets(200, seed=4)
    assert {len(s) for s in sets} == {1, 2, 3, 4, 5} and all(len(set(s)) == len(s) for s in sets)

    import torch

    from gvm_trl.evaluation import generate_completions

    model, tokenizer = letters.warm_started_policy()
    rates = {}
    for k, prompt in [(1, "a"), (5, "abcde")]:
        text = tokenizer.apply_chat_template(letters.conversation(prompt), add_generation_prompt=True, tokenize=False)
        torch.manual_seed(0)
        (samples,) = generate_completions(model, tokenizer, [text], num_samples=400, temperature=1.0, max_new_tokens=2)
        assert sum(s[:1] in letters.LETTERS and s[:1] != "" for s in samples) / len(samples) > 0.9
        rates[k] = sum(letters.letter_reward([prompt] * len(samples), samples)) / len(samples)
    assert rates[1] == pytest.approx(0.1, abs=0.06) and rates[5] == pytest.approx(0.5, abs=0.1)


def test_report_tables_read_a_quick_regime_run(tmp_path, monkeypatch):
    """benchmarks/report_tables.py (issue 27's tables): every section renders from result files, and says so when a
    file is missing."""
    with benchmark_modules("common", "convergence", "report_tables") as modules:
        convergence, tables = modules["convergence"], modules["report_tables"]
        path = tmp_path / "regime.json"
        convergence.main(["--quick", "--methods", "grpo-mean", "gvm-grpo", "dynamic-grpo", "--never-share", "0.5",
                          "--method-lr", "grpo-mean=3e-4", "--output", str(path)])
        monkeypatch.setattr(tables, "REGIMES", {"never 0.5": path, "missing": tmp_path / "none.json"})
        monkeypatch.setattr(tables, "HELDOUT", path)
        monkeypatch.setattr(tables, "SWEEP", tmp_path / "no_sweep.json")
        text = tables.main(["--only", "regimes", "--only", "groups", "--only", "bands", "--only", "heldout",
                            "--only", "sweep"])
    assert "(no no_sweep.json yet)" in text
    assert "| never 0.5 | `gvm-grpo` (0.0001) | `grpo-mean` (0.0003) |" in text
    assert "| never 0.5 | `gvm-grpo` (0.0001) | `dynamic-grpo` (0.0001) |" in text  # Theorem 3 against skipping
    assert "| never 0.5 | `grpo-mean` |" in text  # the baseline's all-wrong / all-correct shares
    assert "never (6, 0.000)" in text and "Contribution of each band to L" in text
    assert "missing" not in text.replace("(no", "")
