"""Smoke tests of benchmarks/variance.py: its --quick modes, the per-sample gradients and the resampling."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gvm_trl.testing import make_char_tokenizer, make_tiny_llama

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "variance.py"


@pytest.fixture(scope="module")
def variance():
    spec = importlib.util.spec_from_file_location("benchmark_variance", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_per_sample_grads_match_autograd_loop(variance):
    tokenizer = make_char_tokenizer()
    model = make_tiny_llama(tokenizer, seed=0).eval()
    prompt = variance.prompt_ids(tokenizer, [{"role": "user", "content": "What is 3 + 4?"}])
    torch.manual_seed(0)
    completions = variance.sample_completions(model, tokenizer, prompt, 4, 8)
    # Different lengths, some ending in EOS, to exercise the right padding.
    completions = [c[:n] + [tokenizer.eos_token_id] for c, n in zip(completions, (0, 7, 3))] + completions[3:]
    module = variance.target_module(model, -1)
    fast = variance.per_sample_grads(model, prompt, completions, module, micro_batch=3)
    assert fast.shape == (4, module.weight.numel())
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    for row, completion in enumerate(completions):
        sequence = torch.cat([prompt[0], torch.tensor(completion)])[None]
        logits = model(input_ids=sequence).logits[0, prompt.shape[1] - 1 : -1]
        log_prob = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion)[:, None]).sum()
        (reference,) = torch.autograd.grad(log_prob, module.weight)
        torch.testing.assert_close(fast[row], reference.flatten(), rtol=1e-4, atol=1e-6)


def test_resampled_lemma1_is_unbiased_and_matches_exact_mse(variance):
    rng = np.random.default_rng(0)
    accepted = [np.array([1, 0, 0, 1, 1, 0], bool), np.zeros(5, bool), np.array([1, 1, 1, 1], bool)]
    vectors = rng.standard_normal((7, 5)) + 1.0
    pool = variance.Pool(accepted=accepted, gram=vectors @ vectors.T)
    sampler = variance.Resampler(pool, rng)
    sizes = np.array([4, 2, 3])
    reps = variance.run_replicates(lambda: sampler.fixed(sizes), 20000)
    mean_estimate = reps["lemma1"].mean(axis=0) @ vectors
    np.testing.assert_allclose(mean_estimate, pool.target() @ vectors, atol=0.05)
    summary = variance.error_summary(reps["lemma1"], pool.target(), pool.gram)
    exact = variance.exact_lemma1_mse(sizes, sampler.rates, pool.norm_stats(), pool)
    assert summary["mse"] == pytest.approx(exact, rel=0.05)
    assert summary["bias2"] < 0.01 * summary["mse"]


def test_quick_real_mode(variance, tmp_path, capsys):
    output = tmp_path / "real.json"
    variance.main(["--quick", "--output", str(output)])
    assert "E‖ĝ − g*‖²" in capsys.readouterr().out
    results = json.loads(output.read_text())
    assert output.with_suffix(".png").stat().st_size > 0
    assert "down_proj" in results["info"]["parameter_subset"]
    assert len(results["per_prompt"]["pool_accept_rate"]) == 4
    for row in results["rows"]:
        names = ("uniform", "uniform-mean", "gvm-oracle", "optimal", "gvm[N'=4]", "gvm-reuse[N'=4]", "uniform@N+4m")
        for name in names:
            assert math.isfinite(row["methods"][name]["mse"]) and row["methods"][name]["mse"] >= 0
        assert sum(row["allocations"]["uniform"]) == row["budget"]


def test_quick_synthetic_mode(variance, tmp_path):
    output = tmp_path / "synthetic.json"
    results = variance.main(["--synthetic", "--quick", "--output", str(output)])
    assert output.exists() and output.with_suffix(".png").exists()
    checks = results["checks"]
    for ratios in checks["mc_over_exact"]:
        assert all(0.5 < r < 2.0 for r in ratios)
    for ratios in checks["exact_over_lemma2"]:
        assert all(r is None or r <= 1.0 for r in ratios)
    assert checks["tv_to_oracle_decreases"]
