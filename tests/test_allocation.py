"""Tests for gvm_trl.allocation (Yao et al. 2025, arXiv:2505.02391: eq. (5), Theorem 3, Lemma 1)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gvm_trl.allocation import (
    _water_fill,
    allocate_budget,
    allocation_weights,
    dynamic_sampling_allocation,
    knapsack_allocation,
    knapsack_value,
    lemma1_weights,
    mean_weights,
    uniform_allocation,
    variance_bound,
)

ALPHA, BETA = 1e-3, 2.0
FAST = settings(max_examples=60, deadline=None)

rates = st.floats(min_value=0.0, max_value=1.0)
positive_rates = st.floats(min_value=1e-3, max_value=1.0)
norms = st.floats(min_value=0.0, max_value=1e3)
positive_norms = st.floats(min_value=1e-3, max_value=1e3)
alphas = st.floats(min_value=1e-6, max_value=1.0)
betas = st.floats(min_value=2.0, max_value=6.0)


@st.composite
def problems(draw, min_size=1, max_size=12, rate=rates, norm=norms):
    size = draw(st.integers(min_size, max_size))
    p = draw(st.lists(rate, min_size=size, max_size=size))
    g = draw(st.lists(norm, min_size=size, max_size=size))
    return p, g


def numpy_weights(p, g, alpha=ALPHA, beta=BETA):
    p, g = np.asarray(p, dtype=float), np.asarray(g, dtype=float)
    with np.errstate(divide="ignore", over="ignore"):
        w = g / np.sqrt(p + alpha / p ** (beta - 1.0))
    return np.where((p == 0) | (g == 0), 0.0, w)


def paper_bound(p, g, n, alpha=ALPHA, beta=BETA):
    """Eq. (5) exactly as printed (all p_i > 0, n_i > 0)."""
    p, g, n = (np.asarray(x, dtype=float) for x in (p, g, n))
    return float(np.sum(1.0 / (1.0 + alpha / p**beta) * g**2 / (p * n)))


# --- hand-worked examples ---------------------------------------------------------------------------


def test_two_prompt_example_by_hand():
    # w_1 = 1 / sqrt(0.5 + 0.001/0.5)   = 1 / sqrt(0.502) = 1.41139...
    # w_2 = 2 / sqrt(0.25 + 0.001/0.25) = 2 / sqrt(0.254) = 3.96838...
    # budget 16: 16 w / Σw = (4.1976, 11.8024) -> floors (4, 11), one unit left -> larger remainder (.80)
    weights = allocation_weights([0.5, 0.25], [1.0, 2.0], alpha=1e-3, beta=2.0)
    assert weights == pytest.approx([1 / math.sqrt(0.502), 2 / math.sqrt(0.254)], rel=1e-15)
    assert weights == pytest.approx(numpy_weights([0.5, 0.25], [1.0, 2.0]).tolist(), rel=1e-14)
    assert allocate_budget([0.5, 0.25], [1.0, 2.0], 16, alpha=1e-3, beta=2.0) == [4, 12]


def test_weights_match_numpy_for_beta_three():
    p, g = [0.9, 0.3, 0.05, 0.0, 0.6], [2.0, 1.0, 3.0, 5.0, 0.0]
    expected = numpy_weights(p, g, alpha=0.01, beta=3.0)
    assert allocation_weights(p, g, alpha=0.01, beta=3.0) == pytest.approx(expected.tolist(), rel=1e-14)
    assert expected[3] == 0.0 and expected[4] == 0.0


def test_regulariser_starves_hard_prompts():
    # p* = sqrt(alpha) for beta = 2: below it the weight falls towards 0 as p -> 0
    weights = allocation_weights([1e-6, 0.0316, 0.5], [1.0, 1.0, 1.0], alpha=1e-3, beta=2.0)
    assert weights[0] < weights[2] < weights[1]


def test_zero_weight_prompts_get_nothing():
    assert allocate_budget([0.0, 0.5, 0.5, 0.5], [1.0, 0.0, 1.0, 1.0], 10) == [0, 0, 5, 5]


def test_all_weights_zero_gives_all_zeros():
    assert allocate_budget([0.0, 0.0, 0.7], [1.0, 2.0, 0.0], 12) == [0, 0, 0]
    assert allocate_budget([0.0, 0.0], [1.0, 1.0], 12, min_samples=2, max_samples=4) == [0, 0]
    assert allocate_budget([], [], 12) == []


def test_ties_go_to_the_lower_index():
    assert allocate_budget([0.5] * 4, [1.0] * 4, 10) == [3, 3, 2, 2]
    assert allocate_budget([0.5] * 4, [1.0] * 4, 10) == uniform_allocation(4, 10)


def test_zero_budget():
    assert allocate_budget([0.5, 0.2], [1.0, 1.0], 0) == [0, 0]


def test_cap_is_water_filled():
    # p = 1 everywhere, so w ∝ G = (1, 1, 8): 10 · (0.1, 0.1, 0.8) = (1, 1, 8); cap 5 fixes the third at 5,
    # the other 5 split (2.5, 2.5) -> tie, lower index first
    assert allocate_budget([1.0] * 3, [1.0, 1.0, 8.0], 10, max_samples=5) == [3, 2, 5]


def test_floor_is_water_filled():
    # 20 · (1, 1, 98) / 100 = (0.2, 0.2, 19.6); floor 3 fixes the first two, the third gets 20 - 6
    assert allocate_budget([1.0] * 3, [1.0, 1.0, 98.0], 20, min_samples=3) == [3, 3, 14]


def test_floor_and_cap_together():
    # (1, 1, 4, 94)/100 · 40 = (0.4, 0.4, 1.6, 37.6); floor 2 and cap 20 -> (2, 2, 2, 20) leaves 14 free,
    # which is more than the cap allows once the last is capped: the remaining 18 go to the three small
    # ones in proportion (1, 1, 4) -> (3, 3, 12), all above the floor
    assert allocate_budget([1.0] * 4, [1.0, 1.0, 4.0, 94.0], 38, min_samples=2, max_samples=20) == [3, 3, 12, 20]


def test_floors_skip_zero_weight_prompts():
    assert allocate_budget([0.0, 0.5, 0.5], [1.0, 1.0, 1.0], 4, min_samples=2) == [0, 2, 2]
    assert allocate_budget([0.9, 0.5, 0.5], [1.0, 1.0, 1.0], 6, min_samples=2, filter_threshold=0.8) == [0, 3, 3]


def test_floors_exactly_feasible():
    assert allocate_budget([0.5, 0.1, 0.9], [1.0, 9.0, 1.0], 6, min_samples=2) == [2, 2, 2]


def test_floors_infeasible_raise():
    with pytest.raises(ValueError, match="min_samples"):
        allocate_budget([0.5, 0.1, 0.9], [1.0, 9.0, 1.0], 5, min_samples=2)


def test_caps_unreachable_return_capped_values():
    assert allocate_budget([0.5, 0.0, 0.3], [1.0, 1.0, 1.0], 100, max_samples=8) == [8, 0, 8]
    assert allocate_budget([0.5, 0.3], [1.0, 3.0], 16, max_samples=8) == [8, 8]


def test_filter_threshold_is_strict():
    assert allocate_budget([1.0, 0.5, 0.5], [1.0, 1.0, 1.0], 10, filter_threshold=0.9) == [0, 5, 5]
    assert allocate_budget([0.5, 0.5], [1.0, 1.0], 10, filter_threshold=0.5) == [5, 5]
    assert allocate_budget([1.0, 1.0], [1.0, 1.0], 10, filter_threshold=1.0) == [5, 5]
    assert allocate_budget([1.0, 1.0], [1.0, 1.0], 10, filter_threshold=0.99) == [0, 0]


def test_filter_insufficient():
    # w = (1/sqrt(0.502), 1/sqrt(0.11), 1/sqrt(0.502)) = (1.411, 3.015, 1.411); budget 30 gives
    # expected accepted counts (7.25 · 0.5, 15.5 · 0.01, 7.25 · 0.5) = (3.6, 0.155, 3.6) -> drop the middle
    p, g = [0.5, 0.01, 0.5], [1.0, 1.0, 1.0]
    assert allocate_budget(p, g, 30) == [7, 16, 7]
    assert allocate_budget(p, g, 30, filter_insufficient=1.0) == [15, 0, 15]


def test_filter_insufficient_boundary_is_kept():
    # each prompt: 4 · 1/2 = 2 samples, 2 · 0.5 = 1.0 expected accepted, exactly the threshold
    assert allocate_budget([0.5, 0.5], [1.0, 1.0], 4, filter_insufficient=1.0) == [2, 2]
    assert allocate_budget([0.5, 0.5], [1.0, 1.0], 4, filter_insufficient=1.0 + 1e-9) == [0, 0]


def test_filter_insufficient_uses_the_split_after_the_threshold_filter():
    # without the p = 1 prompt the others share 8 samples: 4 · 0.5 = 2 >= 2 (kept); with it they would
    # get 8/3 each · 0.5 < 2
    assert allocate_budget([1.0, 0.5, 0.5], [1.0, 1.0, 1.0], 8, filter_threshold=0.9, filter_insufficient=2.0) == [
        0,
        4,
        4,
    ]


def test_sequence_types_agree():
    p, g = [0.5, 0.25, 0.75, 0.0], [1.0, 2.0, 0.5, 1.0]
    expected = allocate_budget(p, g, 21)
    assert allocate_budget(tuple(p), tuple(g), 21) == expected
    assert allocate_budget(np.array(p), np.array(g, dtype=np.float32), np.int64(21)) == expected
    assert allocate_budget(torch.tensor(p), torch.tensor(g, dtype=torch.float64), torch.tensor(21)) == expected
    assert allocate_budget(p, g, 21.0) == expected
    assert all(type(n) is int for n in expected)


def test_huge_norms_do_not_overflow():
    assert allocate_budget([0.5, 0.5], [1e308, 1e308], 10) == [5, 5]
    assert allocate_budget([1e-300, 0.5], [1.0, 1.0], 10, beta=5.0) == [0, 10]


# --- error paths --------------------------------------------------------------------------------------

GOOD_P, GOOD_G = [0.5, 0.25], [1.0, 2.0]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"alpha": math.inf}, "alpha"),
        ({"alpha": True}, "alpha"),
        ({"beta": 1.99}, "beta"),
        ({"beta": math.nan}, "beta"),
        ({"beta": math.inf}, "beta"),
        ({"budget": -1}, "budget"),
        ({"budget": 8.5}, "budget"),
        ({"budget": True}, "budget"),
        ({"budget": np.bool_(True)}, "budget"),
        ({"budget": math.nan}, "budget"),
        ({"budget": math.inf}, "budget"),
        ({"budget": "8"}, "budget"),
        ({"budget": None}, "budget"),
        ({"alpha": "1e-3"}, "alpha"),
        ({"accept_rates": [0.5]}, "lengths differ"),
        ({"accept_rates": [0.5, 1.5]}, "accept_rates"),
        ({"accept_rates": [-0.1, 0.5]}, "accept_rates"),
        ({"accept_rates": [math.nan, 0.5]}, "accept_rates"),
        ({"accept_rates": [True, 0.5]}, "accept_rates"),
        ({"accept_rates": ["0.5", 0.5]}, "accept_rates"),
        ({"accept_rates": "0.5"}, "accept_rates"),
        ({"accept_rates": 0.5}, "accept_rates"),
        ({"accept_rates": [[0.5], [0.25]]}, "accept_rates"),
        ({"grad_norms": [-1.0, 1.0]}, "grad_norms"),
        ({"grad_norms": [math.nan, 1.0]}, "grad_norms"),
        ({"grad_norms": [math.inf, 1.0]}, "grad_norms"),
        ({"min_samples": -1}, "min_samples"),
        ({"min_samples": 1.5}, "min_samples"),
        ({"min_samples": 3, "max_samples": 2}, "max_samples"),
        ({"max_samples": 0}, "max_samples"),
        ({"max_samples": -2}, "max_samples"),
        ({"filter_threshold": 0.0}, "filter_threshold"),
        ({"filter_threshold": 1.5}, "filter_threshold"),
        ({"filter_threshold": math.nan}, "filter_threshold"),
        ({"filter_insufficient": -1.0}, "filter_insufficient"),
        ({"filter_insufficient": math.inf}, "filter_insufficient"),
        ({"filter_insufficient": math.nan}, "filter_insufficient"),
    ],
)
def test_allocate_budget_rejects_bad_input(kwargs, name):
    arguments = {"accept_rates": GOOD_P, "grad_norms": GOOD_G, "budget": 8, **kwargs}
    with pytest.raises(ValueError, match=name):
        allocate_budget(**arguments)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: allocation_weights(GOOD_P, GOOD_G, alpha=0.0, beta=2.0), "alpha"),
        (lambda: allocation_weights(GOOD_P, GOOD_G, alpha=1e-3, beta=1.0), "beta"),
        (lambda: allocation_weights([0.5], GOOD_G, alpha=1e-3, beta=2.0), "lengths differ"),
        (lambda: allocation_weights([2.0, 0.5], GOOD_G, alpha=1e-3, beta=2.0), "accept_rates"),
        (lambda: allocation_weights(GOOD_P, [1.0, -2.0], alpha=1e-3, beta=2.0), "grad_norms"),
        (lambda: variance_bound(GOOD_P, GOOD_G, [1, 2], alpha=-1.0, beta=2.0), "alpha"),
        (lambda: variance_bound(GOOD_P, GOOD_G, [1, 2], alpha=1e-3, beta=0.5), "beta"),
        (lambda: variance_bound(GOOD_P, GOOD_G, [1], alpha=1e-3, beta=2.0), "lengths differ"),
        (lambda: variance_bound(GOOD_P, GOOD_G, [1, -2], alpha=1e-3, beta=2.0), "sizes"),
        (lambda: variance_bound(GOOD_P, GOOD_G, [1, math.nan], alpha=1e-3, beta=2.0), "sizes"),
        (lambda: variance_bound([0.5, math.nan], GOOD_G, [1, 2], alpha=1e-3, beta=2.0), "accept_rates"),
        (lambda: variance_bound(GOOD_P, [math.inf, 1.0], [1, 2], alpha=1e-3, beta=2.0), "grad_norms"),
        (lambda: uniform_allocation(-1, 8), "num_prompts"),
        (lambda: uniform_allocation(2.5, 8), "num_prompts"),
        (lambda: uniform_allocation(True, 8), "num_prompts"),
        (lambda: uniform_allocation(4, -8), "budget"),
        (lambda: uniform_allocation(4, 7.5), "budget"),
        (lambda: lemma1_weights([1, 2], [0.5]), "lengths differ"),
        (lambda: lemma1_weights([1, -2], GOOD_P), "sizes"),
        (lambda: lemma1_weights([1, 2], [0.5, 1.1]), "accept_rates"),
        (lambda: mean_weights([1, -1]), "num_accepted"),
        (lambda: mean_weights([1, math.inf]), "num_accepted"),
        (lambda: mean_weights(None), "num_accepted"),
    ],
)
def test_helpers_reject_bad_input(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# --- uniform split, Lemma 1 and Algorithm 1 weights ---------------------------------------------------


def test_uniform_allocation():
    assert uniform_allocation(4, 10) == [3, 3, 2, 2]
    assert uniform_allocation(3, 9) == [3, 3, 3]
    assert uniform_allocation(5, 2) == [1, 1, 0, 0, 0]
    assert uniform_allocation(0, 8) == []
    assert uniform_allocation(np.int64(2), 8.0) == [4, 4]


def test_lemma1_weights():
    assert lemma1_weights([4, 12, 0, 5], [0.5, 0.25, 0.5, 0.0]) == [0.5, 1 / 3, 0.0, 0.0]
    assert lemma1_weights(torch.tensor([2, 8]), np.array([0.5, 0.125])) == [1.0, 1.0]


def test_mean_weights():
    assert mean_weights([4, 1, 0]) == [0.25, 1.0, 0.0]
    assert mean_weights(np.array([2, 5])) == [0.5, 0.2]


def test_lemma1_estimator_is_unbiased_in_expectation():
    # E|D_i| = n_i p_i, so E[|D_i| / (n_i p_i)] = 1 for every prompt with n_i p_i > 0
    sizes, p = [4, 12, 7], [0.5, 0.25, 0.9]
    factors = lemma1_weights(sizes, p)
    assert [f * n * q for f, n, q in zip(factors, sizes, p)] == pytest.approx([1.0, 1.0, 1.0])


# --- eq. (5) -------------------------------------------------------------------------------------------


def test_variance_bound_by_hand():
    # terms p^beta/(p^beta + alpha) · G² / (p n):
    #   (0.25/0.251) · 1/(0.5 · 4) = 0.49800797; (0.0625/0.0635) · 4/(0.25 · 12) = 1.31233596
    value = variance_bound([0.5, 0.25], [1.0, 2.0], [4, 12], alpha=1e-3, beta=2.0)
    assert value == pytest.approx(0.25 / 0.251 / 2 + 0.0625 / 0.0635 * 4 / 3, rel=1e-14)
    assert value == pytest.approx(paper_bound([0.5, 0.25], [1.0, 2.0], [4, 12]), rel=1e-14)


def test_variance_bound_conventions():
    assert variance_bound([0.0, 0.5], [1.0, 1.0], [0, 2], alpha=ALPHA, beta=BETA) == pytest.approx(
        paper_bound([0.5], [1.0], [2])
    )
    assert variance_bound([0.5, 0.5], [0.0, 1.0], [0, 2], alpha=ALPHA, beta=BETA) == pytest.approx(
        paper_bound([0.5], [1.0], [2])
    )
    assert variance_bound([0.5, 0.5], [1.0, 1.0], [0, 2], alpha=ALPHA, beta=BETA) == math.inf
    assert variance_bound([], [], [], alpha=ALPHA, beta=BETA) == 0.0
    tiny = variance_bound([1e-300], [1.0], [1], alpha=ALPHA, beta=BETA)
    assert 0.0 <= tiny < 1e-290


@FAST
@given(problems(rate=positive_rates), st.data())
def test_variance_bound_matches_paper_form(problem, data):
    p, g = problem
    n = data.draw(st.lists(st.floats(0.5, 100.0), min_size=len(p), max_size=len(p)))
    assert variance_bound(p, g, n, alpha=ALPHA, beta=BETA) == pytest.approx(paper_bound(p, g, n), rel=1e-12)


# --- properties of the allocation ----------------------------------------------------------------------


def proportional_targets(p, g, budget, alpha=ALPHA, beta=BETA):
    w = numpy_weights(p, g, alpha, beta)
    return budget * w / w.sum() if w.sum() > 0 else np.zeros_like(w)


@FAST
@given(problems(), st.integers(0, 500), alphas, betas)
def test_sum_and_rounding_within_one(problem, budget, alpha, beta):
    p, g = problem
    n = allocate_budget(p, g, budget, alpha=alpha, beta=beta)
    w = numpy_weights(p, g, alpha, beta)
    if w.sum() == 0:
        assert n == [0] * len(p)
        return
    assert sum(n) == budget
    targets = budget * w / w.sum()
    assert np.all(np.abs(np.array(n) - targets) < 1 + 1e-9)
    assert all(ni == 0 for ni, wi in zip(n, w) if wi == 0)
    assert n == allocate_budget(np.array(p), torch.tensor(g, dtype=torch.float64), budget, alpha=alpha, beta=beta)


@FAST
@given(problems(min_size=2), st.integers(1, 300), st.data())
def test_more_gradient_never_means_fewer_samples(problem, budget, data):
    p, g = problem
    i = data.draw(st.integers(0, len(p) - 1))
    larger = list(g)
    larger[i] = g[i] * data.draw(st.floats(1.001, 100.0)) + data.draw(st.floats(1e-3, 10.0))
    assert allocate_budget(p, larger, budget)[i] >= allocate_budget(p, g, budget)[i]


@FAST
@given(problems(min_size=2), st.integers(1, 300), alphas, st.data())
def test_higher_rate_above_the_minimiser_never_means_more_samples(problem, budget, alpha, data):
    # w ∝ 1/sqrt(p + α/p^(β−1)) decreases in p for p ≥ p* = ((β−1)α)^(1/β)
    p, g = problem
    beta = data.draw(betas)
    p_star = ((beta - 1.0) * alpha) ** (1.0 / beta)
    assume(p_star < 0.99)
    i = data.draw(st.integers(0, len(p) - 1))
    low = data.draw(st.floats(p_star, 0.99))
    high = data.draw(st.floats(low + 1e-3, 1.0))
    before, after = list(p), list(p)
    before[i], after[i] = low, high
    assert allocate_budget(after, g, budget, alpha=alpha, beta=beta)[i] <= allocate_budget(
        before, g, budget, alpha=alpha, beta=beta
    )[i]


@FAST
@given(problems(), st.integers(0, 400), st.integers(0, 6), st.integers(1, 80))
def test_floors_and_caps(problem, budget, min_samples, cap_extra):
    p, g = problem
    max_samples = max(min_samples, 1) + cap_extra - 1
    w = numpy_weights(p, g)
    positive = int(np.count_nonzero(w))
    if positive * min_samples > budget:
        with pytest.raises(ValueError, match="min_samples"):
            allocate_budget(p, g, budget, min_samples=min_samples, max_samples=max_samples)
        return
    n = allocate_budget(p, g, budget, min_samples=min_samples, max_samples=max_samples)
    assert all(ni == 0 for ni, wi in zip(n, w) if wi == 0)
    assert all(min_samples <= ni <= max_samples for ni, wi in zip(n, w) if wi > 0)
    if positive == 0:
        assert sum(n) == 0
    elif positive * max_samples >= budget:
        assert sum(n) == budget
    else:
        assert n == [max_samples if wi > 0 else 0 for wi in w]


@FAST
@given(problems(rate=positive_rates, norm=positive_norms), st.integers(1, 400), st.integers(0, 5), st.data())
def test_water_fill_is_the_bounded_optimum(problem, budget, low, data):
    # KKT conditions of min Σ w_i²/n_i s.t. Σ n_i = budget, low ≤ n_i ≤ high: n_i = clip(λ w_i, low, high)
    p, g = problem
    w = allocation_weights(p, g, alpha=ALPHA, beta=BETA)
    m = len(w)
    assume(low * m <= budget)
    high = data.draw(st.integers(max(low, 1, -(-budget // m)), max(low, 1, budget) + 1))
    n = _water_fill(w, budget, low, high)
    assert math.fsum(n) == pytest.approx(budget, rel=1e-9, abs=1e-9)
    tol = 1e-9 * max(1, budget)
    assert all(low - tol <= x <= high + tol for x in n)
    free = [x / wi for x, wi in zip(n, w) if low + tol < x < high - tol]
    if free:
        lam = free[0]
        assert free == pytest.approx([lam] * len(free), rel=1e-9)
        assert all(high / wi <= lam * (1 + 1e-9) for x, wi in zip(n, w) if x >= high - tol)
        assert all(low / wi >= lam * (1 - 1e-9) for x, wi in zip(n, w) if x <= low + tol)


@FAST
@given(problems(rate=positive_rates, norm=positive_norms), st.integers(1, 1000), alphas, betas)
def test_theorem3_optimum_value_and_uniform_comparison(problem, budget, alpha, beta):
    # at n = N w/Σw each term w_i²/n_i equals w_i Σw/N, so eq. (5) = (Σw)²/N; any other split with the
    # same total, the uniform one included, is no better (Theorem 3)
    p, g = problem
    w = allocation_weights(p, g, alpha=alpha, beta=beta)
    continuous = [budget * wi / math.fsum(w) for wi in w]
    optimum = variance_bound(p, g, continuous, alpha=alpha, beta=beta)
    assert optimum == pytest.approx(math.fsum(w) ** 2 / budget, rel=1e-10)
    uniform = [budget / len(p)] * len(p)
    assert optimum <= variance_bound(p, g, uniform, alpha=alpha, beta=beta) * (1 + 1e-12)
    uniform_integers = uniform_allocation(len(p), budget)
    assert optimum <= variance_bound(p, g, uniform_integers, alpha=alpha, beta=beta) * (1 + 1e-12)


@FAST
@given(problems(rate=positive_rates, norm=positive_norms), st.integers(1, 1000), st.data())
def test_theorem3_random_perturbation_does_not_help(problem, budget, data):
    p, g = problem
    assume(len(p) >= 2)
    w = np.array(allocation_weights(p, g, alpha=ALPHA, beta=BETA))
    optimum = budget * w / w.sum()
    direction = np.array(data.draw(st.lists(st.floats(-1.0, 1.0), min_size=len(p), max_size=len(p))))
    direction -= direction.mean()
    assume(np.abs(direction).max() > 1e-6)
    step = data.draw(st.floats(1e-3, 0.99)) * np.min(optimum / np.abs(direction).max())
    perturbed = optimum + step * direction
    assert perturbed.sum() == pytest.approx(budget)
    assert variance_bound(p, g, perturbed.tolist(), alpha=ALPHA, beta=BETA) >= variance_bound(
        p, g, optimum.tolist(), alpha=ALPHA, beta=BETA
    ) * (1 - 1e-12)


@FAST
@given(problems(rate=positive_rates, norm=positive_norms), st.integers(1, 2000))
def test_integer_rounding_loss_is_bounded(problem, budget):
    # each n_i ≥ floor(x_i) > x_i − 1, so term_i(n) ≤ term_i(x) · x_i/(x_i − 1) when every x_i > 1:
    # the integer GVM bound is within max_i x_i/(x_i − 1) of the continuous optimum (which no split beats)
    p, g = problem
    targets = proportional_targets(p, g, budget)
    assume(targets.min() > 1.0)
    n = allocate_budget(p, g, budget)
    continuous = variance_bound(p, g, targets.tolist(), alpha=ALPHA, beta=BETA)
    integer = variance_bound(p, g, n, alpha=ALPHA, beta=BETA)
    assert continuous * (1 - 1e-12) <= integer <= continuous * float(np.max(targets / (targets - 1))) * (1 + 1e-12)


def test_gvm_beats_uniform_on_a_paper_like_batch():
    # 16 prompts, N' = 8 probes each, N = 8 m: spread accept rates and gradient norms
    rng = np.random.default_rng(0)
    p = rng.integers(1, 9, size=16) / 8
    g = rng.uniform(0.5, 3.0, size=16)
    budget = 8 * 16
    gvm = variance_bound(p, g, allocate_budget(p, g, budget), alpha=ALPHA, beta=BETA)
    uniform = variance_bound(p, g, uniform_allocation(16, budget), alpha=ALPHA, beta=BETA)
    assert gvm < uniform


# -- the exploration floor -----------------------------------------------------------------------------------------


def test_exploration_floor_goes_to_unsolved_prompts_first():
    rates, grad_norms = [0.0, 0.5, 0.25, 0.0], [0.0, 1.0, 1.0, 0.0]
    sizes = allocate_budget(rates, grad_norms, 16, explore_samples=2)
    assert sizes[0] == sizes[3] == 2
    assert sizes[1:3] == allocate_budget(rates[1:3], grad_norms[1:3], 12)  # Theorem 3 on what is left
    assert allocate_budget(rates, grad_norms, 16) == [0, *allocate_budget(rates[1:3], grad_norms[1:3], 16), 0]


def test_exploration_floor_shrinks_to_the_budget_and_keeps_min_samples():
    rates, grad_norms = [0.0, 0.5, 0.25, 0.0], [0.0, 1.0, 1.0, 0.0]
    assert allocate_budget(rates, grad_norms, 3, explore_samples=2) == [2, 0, 0, 1]
    assert allocate_budget(rates, grad_norms, 4, explore_samples=2, min_samples=2) == [0, 2, 2, 0]
    assert allocate_budget(rates, grad_norms, 6, explore_samples=2, min_samples=2) == [1, 2, 2, 1]


def test_exploration_floor_when_nothing_was_accepted():
    assert allocate_budget([0.0] * 4, [0.0] * 4, 8, explore_samples=1) == [1, 1, 1, 1]
    assert allocate_budget([0.0] * 4, [0.0] * 4, 8) == [0, 0, 0, 0]


@FAST
@given(
    problem=st.lists(st.tuples(rates, positive_norms), min_size=1, max_size=12),
    budget=st.integers(min_value=0, max_value=64),
    explore=st.integers(min_value=0, max_value=4),
)
def test_exploration_floor_properties(problem, budget, explore):
    rates_, norms_ = zip(*problem)
    sizes = allocate_budget(rates_, norms_, budget, explore_samples=explore)
    unsolved = [i for i, p in enumerate(rates_) if p == 0.0]
    assert sum(sizes) <= budget and min(sizes) >= 0
    floors = [sizes[i] for i in unsolved]
    assert all(size <= explore for size in floors)
    if floors:
        assert max(floors) - min(floors) <= 1
        assert sum(floors) == min(budget, explore * len(unsolved))
    if any(weight > 0 for weight in allocation_weights(rates_, norms_, alpha=1e-3, beta=2.0)):
        assert sum(sizes) == budget  # every positive-weight prompt can take the rest (p ≈ 5e-324 underflows to 0)


# -- DAPO's dynamic sampling as a budget policy ----------------------------------------------------------------------


def test_dynamic_sampling_by_hand():
    # informative: 0.5, 0.25, 0.75 (indices 1, 3, 4); 10 = 3 · 3 + 1, the extra unit to the lowest index
    assert dynamic_sampling_allocation([0.0, 0.5, 1.0, 0.25, 0.75], 10) == [0, 4, 0, 3, 3]
    assert dynamic_sampling_allocation([0.5, 0.5], 0) == [0, 0]
    assert dynamic_sampling_allocation([0.3], 7) == [7]
    assert dynamic_sampling_allocation([0.1, 0.9], 8) == [4, 4]


def test_dynamic_sampling_with_no_informative_prompt_returns_zeros():
    assert dynamic_sampling_allocation([0.0, 1.0, 0.0], 12) == [0, 0, 0]
    assert dynamic_sampling_allocation([0.0, 1.0], 12, min_samples=2, max_samples=4) == [0, 0]
    assert dynamic_sampling_allocation([], 12) == []


def test_dynamic_sampling_epsilon_drops_near_certain_history_estimates():
    rates = [0.01, 0.5, 0.995, 0.05]
    assert dynamic_sampling_allocation(rates, 8) == [2, 2, 2, 2]
    assert dynamic_sampling_allocation(rates, 8, epsilon=0.02) == [0, 4, 0, 4]
    assert dynamic_sampling_allocation(rates, 8, epsilon=0.05) == [0, 8, 0, 0]  # the boundary counts as certain
    # with N' = 4 probes, p̂ ∈ {0, 1/4, ..., 1}: any ε < 1/4 drops the same prompts as ε = 0
    probes = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert dynamic_sampling_allocation(probes, 9, epsilon=0.2) == dynamic_sampling_allocation(probes, 9)


def test_dynamic_sampling_floors_and_caps():
    assert dynamic_sampling_allocation([0.5, 0.0, 0.5], 12, max_samples=4) == [4, 0, 4]
    assert dynamic_sampling_allocation([0.5, 0.0, 0.5], 7, max_samples=4) == [4, 0, 3]
    assert dynamic_sampling_allocation([0.5, 0.0, 0.5], 4, min_samples=2) == [2, 0, 2]
    with pytest.raises(ValueError, match="min_samples=2 for 2 informative prompts"):
        dynamic_sampling_allocation([0.5, 0.0, 0.5], 3, min_samples=2)


@FAST
@given(st.lists(st.sampled_from([0.0, 1.0, 0.125, 0.5, 0.875]) | rates, max_size=16), st.integers(0, 200),
       st.sampled_from([0.0, 0.01, 0.2]), st.integers(0, 3), st.none() | st.integers(3, 40))
def test_dynamic_sampling_matches_an_independent_split(p, budget, epsilon, low, high):
    informative = np.array([epsilon < x < 1 - epsilon for x in p], dtype=bool)
    k = int(informative.sum())
    if k and low * k > budget:
        with pytest.raises(ValueError, match="min_samples"):
            dynamic_sampling_allocation(p, budget, epsilon=epsilon, min_samples=low, max_samples=high)
        return
    sizes = dynamic_sampling_allocation(np.array(p), budget, epsilon=epsilon, min_samples=low, max_samples=high)
    expected = np.zeros(len(p), dtype=int)
    if k:
        share = budget / k if high is None else min(budget / k, high)
        rank = np.cumsum(informative) - 1  # position among the informative prompts
        extra = budget - k * math.floor(share) if share < (high or math.inf) else 0
        expected[informative] = math.floor(share) + (rank[informative] < extra)
    assert sizes == expected.tolist()
    assert all(type(n) is int for n in sizes)
    if k:
        assert sum(sizes) == (budget if high is None or high * k >= budget else high * k)
        assert all(low <= n <= (high or budget) for n, keep in zip(sizes, informative) if keep)


# -- Knapsack RL ------------------------------------------------------------------------------------------------------


def test_knapsack_value_by_hand():
    # p = 0.5, n = 3: P(mixed group) = 1 − 1/8 − 1/8 = 3/4; InfoGain = 0.5 · 0.25 = 1/8
    assert knapsack_value(3, 0.5) == pytest.approx(3 / 32, rel=1e-15)
    assert knapsack_value(3, 0.5, info_power=3.0) == pytest.approx(3 / 64, rel=1e-15)
    assert knapsack_value(1, 0.3) == 0.0 and knapsack_value(0, 0.3) == 0.0
    assert knapsack_value(8, 0.0) == 0.0 and knapsack_value(8, 1.0) == 0.0


def test_knapsack_by_hand():
    # p = (0.5, 0.1), floors 2, 2 more units. Marginal gains c·(p^n (1−p) + p (1−p)^n), c = p (1−p)²:
    #   prompt 0: c = 0.125, n = 2: 0.125 · 0.25 = 0.03125; n = 3: 0.125 · 0.125 = 0.015625
    #   prompt 1: c = 0.081, n = 2: 0.081 · (0.009 + 0.081) = 0.00729
    # so both units go to prompt 0
    assert knapsack_allocation([0.5, 0.1], 6, min_samples=2) == [4, 2]
    # prompts with p ∈ {0, 1} keep their floor; a tie (equal p) goes to the lower index first
    assert knapsack_allocation([0.0, 0.5, 0.5, 1.0], 7) == [1, 3, 2, 1]


def test_knapsack_spends_on_mixed_groups_not_on_equal_shares():
    # p = 0.1 needs many samples for a group with both outcomes and has a large InfoGain: it gets the most; p = 0.9
    # also needs many for a rejected sample, so it gets more than p = 0.5, whose small groups are already mixed
    sizes = knapsack_allocation([0.9, 0.5, 0.1, 0.02], 64, min_samples=2, max_samples=40)
    assert sum(sizes) == 64 and max(sizes) == sizes[2] and sizes[0] > sizes[1] and sizes[3] > 2


def test_knapsack_leaves_unspendable_budget_to_the_caller():
    assert knapsack_allocation([0.0, 1.0], 10) == [1, 1]
    assert knapsack_allocation([0.5, 0.0], 10, max_samples=4) == [4, 1]
    assert knapsack_allocation([1.0, 0.5], 6, info_power=0.0) == [1, 5]  # InfoGain p·(1−p)⁰ is 1 at p = 1; V is 0
    assert knapsack_allocation([], 10) == []


def test_knapsack_refuses_infeasible_and_unsupported_floors():
    with pytest.raises(ValueError, match="min_samples=2 for 3 prompts needs 6 samples"):
        knapsack_allocation([0.5, 0.5, 0.5], 5, min_samples=2)
    with pytest.raises(ValueError, match="min_samples must be >= 1 for knapsack_allocation"):
        knapsack_allocation([0.5, 0.5], 8, min_samples=0)
    with pytest.raises(ValueError, match="min_samples"):
        knapsack_allocation([0.5], 0)


def brute_force_knapsack(p, budget, low, high, power):
    """The best total value over every integer vector in [low, high]^m with Σ n ≤ budget (V is non-decreasing in n,
    so Σ n = budget is as good where it is reachable), value written as in the paper."""
    p = np.asarray(p, dtype=float)
    best = -1.0
    for n in itertools.product(range(low, high + 1), repeat=len(p)):
        if sum(n) <= budget:
            n_ = np.asarray(n, dtype=float)
            best = max(best, float(np.sum((1 - p**n_ - (1 - p) ** n_) * p * (1 - p) ** power)))
    return best


@settings(max_examples=80, deadline=None)
# (below p ≈ 1e-150 a gain underflows to 0 and the unit is left unspent, as the docstring says)
@given(st.lists(st.sampled_from([0.0, 1.0, 0.5, 0.02]) | rates.filter(lambda x: x == 0 or x > 1e-100), min_size=1,
                max_size=4), st.integers(0, 14),
       st.integers(1, 3), st.integers(0, 6), st.sampled_from([0.0, 2.0, 3.0]))
def test_knapsack_matches_brute_force(p, budget, low, cap_extra, power):
    high = low + cap_extra
    if low * len(p) > budget:
        with pytest.raises(ValueError, match="min_samples"):
            knapsack_allocation(p, budget, min_samples=low, max_samples=high, info_power=power)
        return
    sizes = knapsack_allocation(p, budget, min_samples=low, max_samples=high, info_power=power)
    assert all(low <= n <= high for n in sizes) and sum(sizes) <= budget
    total = math.fsum(knapsack_value(n, x, info_power=power) for n, x in zip(sizes, p))
    assert total == pytest.approx(brute_force_knapsack(p, budget, low, high, power), rel=1e-9, abs=1e-15)
    valuable = [i for i, x in enumerate(p) if 0 < x < 1 and x * (1 - x) ** power > 0]  # InfoGain not underflowed
    if sum(sizes) < budget:  # only when no prompt with value can take another unit
        assert all(sizes[i] == high for i in valuable)
    assert all(sizes[i] == low for i in range(len(p)) if i not in valuable)


@FAST
@given(st.lists(rates, min_size=1, max_size=24), st.integers(24, 600))
def test_knapsack_is_deterministic_and_type_blind(p, budget):
    sizes = knapsack_allocation(p, budget, min_samples=1, max_samples=64)
    assert sizes == knapsack_allocation(tuple(p), float(budget), min_samples=1, max_samples=64)
    assert sizes == knapsack_allocation(torch.tensor(p, dtype=torch.float64), np.int64(budget), min_samples=1,
                                        max_samples=64)
    assert all(type(n) is int for n in sizes)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: dynamic_sampling_allocation([0.5, 1.5], 8), "accept_rates"),
        (lambda: dynamic_sampling_allocation([0.5, math.nan], 8), "accept_rates"),
        (lambda: dynamic_sampling_allocation([0.5], -1), "budget"),
        (lambda: dynamic_sampling_allocation([0.5], 8, epsilon=0.5), "epsilon"),
        (lambda: dynamic_sampling_allocation([0.5], 8, epsilon=-0.1), "epsilon"),
        (lambda: dynamic_sampling_allocation([0.5], 8, epsilon=True), "epsilon"),
        (lambda: dynamic_sampling_allocation([0.5], 8, min_samples=-1), "min_samples"),
        (lambda: dynamic_sampling_allocation([0.5], 8, min_samples=3, max_samples=2), "max_samples"),
        (lambda: knapsack_allocation([0.5, -0.5], 8), "accept_rates"),
        (lambda: knapsack_allocation([0.5], 8.5), "budget"),
        (lambda: knapsack_allocation([0.5], 8, max_samples=0), "max_samples"),
        (lambda: knapsack_allocation([0.5], 8, info_power=-1.0), "info_power"),
        (lambda: knapsack_allocation([0.5], 8, info_power=math.inf), "info_power"),
        (lambda: knapsack_value(-1, 0.5), "num_samples"),
        (lambda: knapsack_value(2, 1.5), "accept_rate"),
    ],
)
def test_budget_policies_reject_bad_input(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# -- Reinforce-Ada ------------------------------------------------------------------------------------------------------

from gvm_trl.allocation import reinforce_ada_finished, reinforce_ada_group, reinforce_ada_round  # noqa: E402


def brute_force_group(outcomes: list[bool], n: int) -> list[int]:
    """Every subset of min(n, rows) rows: the accepted count closest to ⌊n/2⌋, then the earliest rows of each kind."""
    take = min(n, len(outcomes))
    best = None
    for subset in itertools.combinations(range(len(outcomes)), take):
        accepted = sum(outcomes[i] for i in subset)
        positives = [i for i in subset if outcomes[i]]
        negatives = [i for i in subset if not outcomes[i]]
        key = (abs(accepted - n // 2), positives, negatives)
        if best is None or key < best[0]:
            best = (key, list(subset))
    return best[1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.booleans(), max_size=10), st.integers(1, 6))
def test_reinforce_ada_group_is_the_closest_to_balanced_earliest_subset(outcomes, n):
    assert reinforce_ada_group(outcomes, group_size=n) == brute_force_group(outcomes, n)


def test_reinforce_ada_group_by_hand():
    assert reinforce_ada_group([True, True, True, False, True, False, False], group_size=4) == [0, 1, 3, 5]
    assert reinforce_ada_group([False] * 6, group_size=4) == [0, 1, 2, 3]  # a prompt that never finished
    assert reinforce_ada_group([True] * 5 + [False], group_size=4) == [0, 1, 2, 5]
    assert reinforce_ada_group([True, False], group_size=4) == [0, 1]  # fewer rows than the group


@pytest.mark.parametrize("accepted, rejected, balanced, positive", [
    (0, 8, False, False), (1, 7, False, True), (2, 1, False, True), (2, 2, True, True), (5, 9, True, True),
])
def test_reinforce_ada_exit_rules(accepted, rejected, balanced, positive):
    assert reinforce_ada_finished(accepted, rejected, group_size=4, exit_rule="balanced") is balanced
    assert reinforce_ada_finished(accepted, rejected, group_size=4, exit_rule="positive") is positive


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6), st.integers(0, 2**31 - 1),
       st.sampled_from(["balanced", "positive"]))
def test_reinforce_ada_rounds_stop_at_the_exit_or_the_cap(rates, seed, exit_rule):
    """Simulated rounds: a prompt is drawn 8 at a time exactly until its exit rule holds, never past 4 rounds."""
    rng = np.random.default_rng(seed)
    accepted, rejected = [0] * len(rates), [0] * len(rates)
    for index in range(6):
        sizes = reinforce_ada_round(accepted, rejected, index, exit_rule=exit_rule)
        for i, size in enumerate(sizes):
            done = reinforce_ada_finished(accepted[i], rejected[i], group_size=4, exit_rule=exit_rule)
            assert size == (0 if done or index >= 4 else 8)
            hits = int(rng.binomial(size, rates[i]))
            accepted[i], rejected[i] = accepted[i] + hits, rejected[i] + size - hits
    assert all(a + r <= 32 for a, r in zip(accepted, rejected))


def test_reinforce_ada_refuses_bad_arguments():
    with pytest.raises(ValueError, match="exit_rule"):
        reinforce_ada_finished(1, 1, group_size=4, exit_rule="both")
    with pytest.raises(ValueError, match="round_size"):
        reinforce_ada_round([0], [0], 0, round_size=0)
    with pytest.raises(ValueError, match="group_size"):
        reinforce_ada_group([True], group_size=0)
