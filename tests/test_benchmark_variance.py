"""benchmarks/variance.py and its parts: per-sample gradients, the sketch, the simulated estimators, --quick."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import benchmark_modules

from gvm_trl.testing import make_char_tokenizer, make_tiny_llama


@pytest.fixture(scope="module")
def benchmarks():
    """The benchmark scripts as modules (they import each other as siblings, as when run from their folder)."""
    with benchmark_modules("gradient_pool", "allocation_sim", "variance") as modules:
        yield modules


def test_per_sample_grads_match_autograd_loop(benchmarks):
    pool = benchmarks["gradient_pool"]
    tokenizer = make_char_tokenizer()
    model = make_tiny_llama(tokenizer, seed=0).eval()
    prompt = pool.prompt_ids(tokenizer, [{"role": "user", "content": "What is 3 + 4?"}])
    torch.manual_seed(0)
    completions = pool.sample_completions(model, tokenizer, prompt, 4, 8)
    # Different lengths, some ending in EOS, to exercise the right padding.
    completions = [c[:n] + [tokenizer.eos_token_id] for c, n in zip(completions, (0, 7, 3))] + completions[3:]
    module = pool.target_module(model, -1)
    fast = pool.per_sample_grads(model, prompt, completions, module, micro_batch=3)
    assert fast.shape == (4, module.weight.numel())
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    for row, completion in enumerate(completions):
        sequence = torch.cat([prompt[0], torch.tensor(completion)])[None]
        logits = model(input_ids=sequence).logits[0, prompt.shape[1] - 1 : -1]
        log_prob = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion)[:, None]).sum()
        (reference,) = torch.autograd.grad(log_prob, module.weight)
        torch.testing.assert_close(fast[row], reference.flatten(), rtol=1e-4, atol=1e-6)


def test_count_sketch_is_linear_and_keeps_squared_norms(benchmarks):
    sketch = benchmarks["gradient_pool"].CountSketch(50_000, 4096, seed=3)
    x = torch.randn(6, 50_000, dtype=torch.float64)
    sx = sketch(x)
    torch.testing.assert_close(sketch(x[:1] - 2 * x[1:2]), sx[:1] - 2 * sx[1:2])
    ratios = (sx**2).sum(1) / (x**2).sum(1)
    assert ((ratios - 1).abs() < 4 * math.sqrt(2 / 4096)).all()


def test_lemma1_with_true_p_is_unbiased_and_matches_exact_mse(benchmarks):
    sim, pools = benchmarks["allocation_sim"], benchmarks["gradient_pool"]
    rng = np.random.default_rng(0)
    accepted = [np.array([1, 0, 0, 1, 1, 0], bool), np.zeros(5, bool), np.array([1, 1, 1, 1], bool)]
    vectors = rng.standard_normal((7, 5)) + 1.0
    population = sim.Population.from_pool(pools.GradientPool(accepted, vectors @ vectors.T))
    sizes = np.broadcast_to(np.array([4, 2, 3]), (20_000, 3))
    estimates = sim.fixed_estimators(population, sizes, rng)["true-p"]
    np.testing.assert_allclose(estimates.mean(0) @ vectors, population.target() @ vectors, atol=0.05)
    summary = sim.error_summary(population, estimates)
    assert summary["mse"] == pytest.approx(population.exact_mse(sizes[0]), rel=0.05)
    assert summary["bias2"] < 0.01 * summary["mse"]
    # A prompt given no draws is missing from ĝ: exactly its ‖μ_i‖² more.
    starved = np.array([0, 2, 3])
    mu = vectors[:3].mean(0)
    assert population.exact_mse(starved) == pytest.approx(
        population.exact_mse(np.array([10**9, 2, 3])) + mu @ mu, rel=1e-6)


def test_gradlogp_family_has_mean_gradient_grad_log_p(benchmarks):
    sim = benchmarks["allocation_sim"]
    rng = np.random.default_rng(5)
    for rate in (0.03, 0.4, 0.95):
        features, policy = sim.softmax_prompt(rng, rate, outcomes=16, accepted=4, dim=8)
        assert policy[:4].sum() == pytest.approx(rate)
        theta = torch.zeros(8, dtype=torch.float64, requires_grad=True)
        logits = torch.tensor(np.log(policy)) + torch.tensor(features) @ theta
        (torch.logsumexp(logits[:4], 0) - torch.logsumexp(logits, 0)).backward()
        posterior = policy[:4] / policy[:4].sum()
        mean_gradient = sum(q * features.T @ (np.eye(16)[y] - policy) for y, q in enumerate(posterior))
        np.testing.assert_allclose(mean_gradient, theta.grad.numpy(), atol=1e-10)
    population = sim.gradlogp_population(40, seed=0, never_share=0.25)
    assert (population.rates == 0).sum() == 10 and population.moments()["mu_sq"][population.rates == 0].sum() == 0
    mu_sq = population.moments()["mu_sq"]
    easy, hard = mu_sq[population.rates > 0.7], mu_sq[(population.rates > 0) & (population.rates < 0.1)]
    assert easy.mean() < 0.2 * hard.mean()  # ‖∇ ln p_i‖ shrinks as p_i grows


def test_exploration_floor_and_history_act_as_documented(benchmarks):
    sim = benchmarks["allocation_sim"]
    population = sim.gradlogp_population(16, seed=2, never_share=0.0, low=0.02, high=0.9)
    rng = np.random.default_rng(0)
    plain = sim.simulate_gvm(population, 64, sim.GVMSetting(2), 200, rng)
    explored = sim.simulate_gvm(population, 64, sim.GVMSetting(2, explore=1), 200, rng)
    assert (plain.sizes[plain.rates == 0] == 0).all() and (plain.sizes.sum(1) <= 64).all()
    assert (explored.sizes[explored.rates == 0] >= 1).all() and (explored.sizes.sum(1) == 64).all()
    remembered = sim.simulate_gvm(population, 64, sim.GVMSetting(2, decay=1.0, history_visits=6), 200, rng)
    error = lambda outcome: np.abs(outcome.rates - population.rates).mean()  # noqa: E731
    assert error(remembered) < 0.6 * error(plain)
    assert (remembered.rates == 0).mean() < 0.5 * (plain.rates == 0).mean()


def test_quick_real_mode(benchmarks, tmp_path, capsys):
    output = tmp_path / "real.json"
    benchmarks["variance"].main(["--quick", "--pool", str(tmp_path / "pool.npz"), "--output", str(output)])
    assert "E‖ĝ − g*‖²" in capsys.readouterr().out
    results = json.loads(output.read_text())
    assert output.with_suffix(".png").stat().st_size > 0 and (tmp_path / "pool.npz").exists()
    assert "down_proj" in results["population"]["info"]["parameter_subset"]
    assert len(results["population"]["accept_rates"]) == 6
    for row in results["budget_table"] + results["options"]:
        assert row["completions"] == 6 * (row["probes"] + row["budget_per_prompt"])
        for name in ("uniform", "uniform-true-p", "oracle", "optimal", "gvm[N'=2,lemma1]", "gvm[N'=2,mean]"):
            assert math.isfinite(row["methods"][name]["mse"]) and row["methods"][name]["mse"] >= 0
    assert results["rare_share"]["rows"]


def test_quick_synthetic_modes(benchmarks, tmp_path):
    variance = benchmarks["variance"]
    gaussian = variance.main(["--quick", "--population", "gaussian", "--output", str(tmp_path / "gaussian.json")])
    checks = gaussian["checks"]
    assert all(0.5 < r < 2.0 for r in checks["mc_over_exact"])
    assert all(r is None or r <= 1.0 for r in checks["exact_over_lemma2"])
    assert checks["tv_to_oracle_decreases"]
    gradlogp = variance.main(["--quick", "--population", "gradlogp", "--output", str(tmp_path / "gradlogp.json")])
    assert [row["never_share"] for row in gradlogp["never_share"]] == [0.0, 0.5]
    assert (tmp_path / "gradlogp.png").stat().st_size > 0


def test_levers_act_as_documented(benchmarks, tmp_path):
    """The posterior floor leaves (almost) no prompt without samples; G ≡ 1 plans from the rates alone (a prompt's
    size then depends only on its estimated p); --levers writes only their table."""
    sim = benchmarks["allocation_sim"]
    population = sim.gradlogp_population(16, seed=2, never_share=0.0, low=0.02, high=0.9)
    rng = np.random.default_rng(0)
    plain = sim.simulate_gvm(population, 64, sim.GVMSetting(2, "mean"), 200, rng)
    floored = sim.simulate_gvm(population, 64, sim.GVMSetting(2, "mean", rate_floor=0.5), 200, rng)
    assert (floored.sizes == 0).mean() < 0.1 * (plain.sizes == 0).mean()  # (a rounding may still leave one at 0)
    assert (floored.rates > 0).all() and floored.rates.min() == pytest.approx(1 - 0.5 ** (1 / 3))  # Beta(1, 1 + 2)
    constant = sim.simulate_gvm(population, 64, sim.GVMSetting(2, "mean", grad_norms="constant"), 200, rng)
    for sizes, rates in zip(constant.sizes, constant.rates):
        for rate in set(rates.tolist()) - {0.0}:
            assert np.ptp(sizes[rates == rate]) <= 1  # equal rates, equal sizes (up to rounding)
    results = benchmarks["variance"].main(["--quick", "--population", "gaussian", "--levers",
                                           "--output", str(tmp_path / "levers.json")])
    assert set(results) == {"population", "target_norm_sq", "levers", "config", "runtime_s"}
    names = set(results["levers"][0]["methods"])
    assert {"gvm[N'=2,mean,floor=0.5]", "gvm[N'=2,mean,G=constant]", "gvm[N'=2,mean,explore=1]"} <= names
    assert results["levers"][0]["solvable_prompts_starved"]["gvm[N'=2,mean,floor=0.5]"] == 0
