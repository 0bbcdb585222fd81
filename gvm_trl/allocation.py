"""Rollout-budget allocation and estimator weights of GVM.

Implements the allocation rule of Yao et al. 2025, "Optimizing Chain-of-Thought Reasoners via Gradient
Variance Minimization in Rejection Sampling and RL" (arXiv:2505.02391):

- :func:`allocation_weights` — Theorem 3 / Algorithm 2 (line 5): w_i = G_i / sqrt(p_i + α / p_i^(β−1)).
- :func:`allocate_budget` — integer sample sizes n_i ∝ w_i with Σ n_i = N (Theorem 3), optional
  per-prompt floor/cap (water-filling, which is the exact minimiser of eq. (5) under those bounds),
  the official code's ``filter_threshold`` / ``filter_insufficient`` filters, largest-remainder rounding.
- :func:`uniform_allocation` — the uniform split of the same budget (the baseline).
- :func:`dynamic_sampling_allocation` — DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476) as a budget
  policy: prompts whose estimate says all-correct or all-wrong get nothing, the rest share the budget equally.
- :func:`knapsack_allocation` — Knapsack RL's rule (Li et al. 2025, arXiv:2509.25849): maximise
  Σ_i P(non-zero GRPO gradient | n_i, p_i) · p_i(1 − p_i)^k over integer n_i in [low, high] (greedy, exact here).
- :func:`reinforce_ada_round`, :func:`reinforce_ada_finished`, :func:`reinforce_ada_group` — Reinforce-Ada
  (Xiong et al. 2025, arXiv:2510.04996): rounds of sampling until each prompt can fill a balanced group, then the
  fixed-size group it trains on.
- :func:`variance_bound` — the objective of eq. (5): Σ_i 1/(1 + α/p_i^β) · G_i² / (p_i n_i).
- :func:`lemma1_weights` — the per-prompt factors 1/(n_i p_i) of the unbiased estimator of Lemma 1, eq. (4).
- :func:`mean_weights` — Algorithm 1's practical factors 1/|D_i| (observed accepted count).

Everything is pure Python with ``math.fsum`` sums and a fixed tie-breaking order, so identical inputs give
identical outputs on every process of a distributed run. Inputs may be any 1-D sequence of real numbers:
lists, tuples, numpy arrays, torch tensors (CPU or GPU).
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Iterable

from .validation import Bounds, as_count, as_nonnegative, as_rates, check_same_length

__all__ = [
    "allocate_budget",
    "allocation_weights",
    "dynamic_sampling_allocation",
    "knapsack_allocation",
    "knapsack_value",
    "lemma1_weights",
    "mean_weights",
    "reinforce_ada_finished",
    "reinforce_ada_group",
    "reinforce_ada_round",
    "uniform_allocation",
    "variance_bound",
]

RealSequence = Iterable[float]

# The admissible ranges of the paper's parameters: the functions below and the config's `gvm_*` fields check these.
ALPHA_RANGE = Bounds(low=0.0, low_open=True)  # α > 0 of eq. (5)
BETA_RANGE = Bounds(low=2.0)  # β ≥ 2 of eq. (5)
FILTER_THRESHOLD_RANGE = Bounds(low=0.0, high=1.0, low_open=True)  # an accept rate above which a prompt is skipped
FILTER_INSUFFICIENT_RANGE = Bounds(low=0.0)  # an expected accepted count
DYNAMIC_EPSILON_RANGE = Bounds(low=0.0, high=0.5, high_open=True)  # DAPO's margin of "all-correct or all-wrong"
INFO_POWER_RANGE = Bounds(low=0.0)  # Knapsack RL's k


def _check_regulariser(alpha: Any, beta: Any) -> tuple[float, float]:
    return ALPHA_RANGE.check(alpha, "alpha"), BETA_RANGE.check(beta, "beta")


def _weights(rates: list[float], norms: list[float], alpha: float, beta: float) -> list[float]:
    weights = []
    for p, g in zip(rates, norms):
        if p == 0.0 or g == 0.0:
            weights.append(0.0)
            continue
        power = p ** (beta - 1.0)
        penalty = alpha / power if power > 0.0 else math.inf
        weights.append(g / math.sqrt(p + penalty))
    return weights


def allocation_weights(
    accept_rates: RealSequence, grad_norms: RealSequence, *, alpha: float, beta: float
) -> list[float]:
    """Theorem 3's unnormalised allocation weights w_i = G_i / sqrt(p_i + α / p_i^(β−1)).

    w_i = 0 where p_i = 0 or G_i = 0 (the limit of the formula as p_i → 0 for β ≥ 2). Raises ValueError
    on α ≤ 0, β < 2, p outside [0, 1], G negative or not finite, or lengths that differ.
    """
    alpha_, beta_ = _check_regulariser(alpha, beta)
    rates = as_rates(accept_rates, "accept_rates")
    norms = as_nonnegative(grad_norms, "grad_norms")
    check_same_length(accept_rates=rates, grad_norms=norms)
    return _weights(rates, norms, alpha_, beta_)


def _normalised_weights(rates: list[float], norms: list[float], alpha: float, beta: float) -> list[float]:
    """The weights, rescaled only when their sum would overflow (the ratios are what matter)."""
    weights = _weights(rates, norms, alpha, beta)
    try:
        total = math.fsum(weights)
    except OverflowError:
        total = math.inf
    if math.isfinite(total):
        return weights
    largest_norm = max(norms)
    weights = _weights(rates, [g / largest_norm for g in norms], alpha, beta)
    largest_weight = max(weights)
    return [w / largest_weight for w in weights]


def _proportional(weights: list[float], budget: int) -> list[float]:
    total = math.fsum(weights)
    if total == 0.0:
        return [0.0] * len(weights)
    return [budget * (w / total) for w in weights]


def _water_fill(weights: list[float], budget: int, low: int, high: float) -> list[float]:
    """The continuous minimiser of Σ w_i²/n_i subject to Σ n_i = budget, low ≤ n_i ≤ high for w_i > 0.

    Σ w_i²/n_i is eq. (5): each of its terms is p^β/(p^β + α) · G²/(p n) = w²/n.

    By the KKT conditions the minimiser is n_i = clip(λ w_i, low, high). Each round computes the
    proportional split of what is left among the free prompts; if the cap overshoot exceeds the floor
    shortfall, λ must grow, so every prompt over the cap is capped at the optimum too (and symmetrically
    for floors); the fixed prompts leave the problem and the round repeats. Prompts with w_i = 0 get 0.
    The caller guarantees feasibility: low · #{w_i > 0} ≤ budget ≤ high · #{w_i > 0}.
    """
    sizes = [0.0] * len(weights)
    free = [i for i, w in enumerate(weights) if w > 0.0]
    remaining = float(budget)
    while free:
        total = math.fsum(weights[i] for i in free)
        trial = {i: remaining * (weights[i] / total) for i in free}
        over = [i for i in free if trial[i] > high]
        under = [i for i in free if trial[i] < low]
        if not over and not under:
            for i in free:
                sizes[i] = trial[i]
            break
        overshoot = math.fsum(trial[i] - high for i in over)
        shortfall = math.fsum(low - trial[i] for i in under)
        fixed: list[tuple[int, float]] = []
        if overshoot >= shortfall:
            fixed += [(i, high) for i in over]
        if shortfall >= overshoot:
            fixed += [(i, float(low)) for i in under]
        for i, value in fixed:
            sizes[i] = value
        fixed_indices = {i for i, _ in fixed}
        free = [i for i in free if i not in fixed_indices]
        remaining = budget - math.fsum(sizes)
    return sizes


def _round_largest_remainder(targets: list[float], budget: int, high: float) -> list[int]:
    """Floor every target, then hand the missing units to the largest remainders (ties: lower index).

    Integer bounds low ≤ x ≤ high on a target carry over to its count: floor(x), and floor(x) + 1 for a
    non-integral x, both lie in [low, high]. Units never go to prompts whose target is 0.
    """
    counts = [math.floor(x) for x in targets]
    missing = budget - sum(counts)
    if missing > 0:
        eligible = [i for i, x in enumerate(targets) if x > 0.0 and counts[i] + 1 <= high]
        eligible.sort(key=lambda i: (-(targets[i] - counts[i]), i))
        for i in eligible[:missing]:
            counts[i] += 1
    return counts


def allocate_budget(
    accept_rates: RealSequence,
    grad_norms: RealSequence,
    budget: int,
    *,
    alpha: float = 1e-3,
    beta: float = 2.0,
    min_samples: int = 0,
    max_samples: int | None = None,
    filter_threshold: float | None = None,
    filter_insufficient: float = 0.0,
    explore_samples: int = 0,
) -> list[int]:
    """Integer sample sizes n_i for phase 2 (Theorem 3, Algorithm 2 line 5), with Σ n_i = budget.

    0. ``explore_samples`` (0 = off): every prompt with p_i = 0 first gets this many samples out of the budget
       (an exploration floor, so that a rare-success prompt whose probes all failed can still be found); if the
       budget, less the ``min_samples`` floors of the other prompts, cannot cover them all, what it can is spread
       evenly over them (lower indices first). Steps 1-4 then split what is left over the other prompts.

    Steps:

    1. w_i = :func:`allocation_weights` (0 where p_i = 0 or G_i = 0).
    2. ``filter_threshold`` (None = off): prompts with p_i > filter_threshold get w_i = 0 (strict ">", as
       in the official code; p_i == threshold is kept). Must lie in (0, 1]; note the official code used 0
       to mean "off", here that is None.
    3. ``filter_insufficient`` (0 = off): with the proportional split x_i = budget · w_i / Σ w of the
       survivors of step 2, prompts with x_i · p_i < filter_insufficient (expected accepted count below
       the threshold) get w_i = 0. One pass, as in the official code (which computes x_i before
       renormalising away step 2's prompts; here after, i.e. from the split the prompt would really get).
    4. Split the budget over the prompts with w_i > 0: n_i = clip(λ w_i, min_samples, max_samples) with λ
       such that Σ n_i = budget (water-filling; without bounds n_i = budget · w_i / Σ w, and with bounds
       the exact minimiser of eq. (5) under them), then largest-remainder rounding: each n_i is the floor
       or the ceiling of its continuous value, ties go to the lower index.

    Prompts with w_i = 0 always get 0 samples: ``min_samples`` floors apply only to prompts with positive
    weight (a prompt with p_i = 0 or G_i = 0 carries no gradient signal, and the regulariser is meant to
    starve it). ``max_samples`` caps every prompt.

    Infeasible cases:

    - every weight is 0 (e.g. p_i = 0 for all i, or no prompts): returns all zeros; the caller decides
      what to do (skip the update, fall back to :func:`uniform_allocation`).
    - min_samples · #{w_i > 0} > budget: raises ValueError naming min_samples.
    - max_samples · #{w_i > 0} < budget: every positive-weight prompt gets max_samples and the result
      sums to less than the budget (zero-weight prompts still get 0).
    """
    alpha_, beta_ = _check_regulariser(alpha, beta)
    rates = as_rates(accept_rates, "accept_rates")
    norms = as_nonnegative(grad_norms, "grad_norms")
    check_same_length(accept_rates=rates, grad_norms=norms)
    budget_ = as_count(budget, "budget")
    low = as_count(min_samples, "min_samples")
    high: float = math.inf
    if max_samples is not None:
        high = as_count(max_samples, "max_samples")
        if high < 1 or high < low:
            raise ValueError(f"max_samples must be >= 1 and >= min_samples ({low}), got {high}")
    threshold = None if filter_threshold is None else FILTER_THRESHOLD_RANGE.check(filter_threshold, "filter_threshold")
    min_expected_accepted = FILTER_INSUFFICIENT_RANGE.check(filter_insufficient, "filter_insufficient")
    explore = as_count(explore_samples, "explore_samples")

    if not rates:
        return []
    unsolved = [i for i, p in enumerate(rates) if p == 0.0]
    if explore and unsolved:
        solved = [i for i, p in enumerate(rates) if p > 0.0]
        reserved = low * sum(1 for i in solved if norms[i] > 0.0)  # exploration never takes min_samples' floors
        floors = uniform_allocation(len(unsolved), max(0, min(budget_ - reserved, explore * len(unsolved))))
        rest = allocate_budget(
            [rates[i] for i in solved],
            [norms[i] for i in solved],
            budget_ - sum(floors),
            alpha=alpha_,
            beta=beta_,
            min_samples=low,
            max_samples=max_samples,
            filter_threshold=threshold,
            filter_insufficient=min_expected_accepted,
        )
        sizes = [0] * len(rates)
        for i, size in zip(unsolved, floors):
            sizes[i] = size
        for i, size in zip(solved, rest):
            sizes[i] = size
        return sizes
    weights = _normalised_weights(rates, norms, alpha_, beta_)
    if threshold is not None:
        weights = [0.0 if p > threshold else w for w, p in zip(weights, rates)]
    if min_expected_accepted > 0.0:
        split = _proportional(weights, budget_)
        weights = [0.0 if x * p < min_expected_accepted else w for w, x, p in zip(weights, split, rates)]

    num_positive = sum(1 for w in weights if w > 0.0)
    if num_positive == 0:
        return [0] * len(weights)
    if low * num_positive > budget_:
        raise ValueError(
            f"min_samples={low} for {num_positive} prompts with positive weight needs "
            f"{low * num_positive} samples, more than budget={budget_}"
        )
    if high * num_positive <= budget_:
        return [int(high) if w > 0.0 else 0 for w in weights]
    targets = _water_fill(weights, budget_, low, high)
    return _round_largest_remainder(targets, budget_, high)


def _check_bounds(min_samples: Any, max_samples: Any) -> tuple[int, float]:
    low = as_count(min_samples, "min_samples")
    if max_samples is None:
        return low, math.inf
    high = as_count(max_samples, "max_samples")
    if high < 1 or high < low:
        raise ValueError(f"max_samples must be >= 1 and >= min_samples ({low}), got {high}")
    return low, high


def dynamic_sampling_allocation(
    accept_rates: RealSequence,
    budget: int,
    *,
    epsilon: float = 0.0,
    min_samples: int = 0,
    max_samples: int | None = None,
) -> list[int]:
    """DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476, §3.2) as a per-prompt budget, Σ n_i = budget.

    A prompt is *informative* iff ε < p_i < 1 − ε: one whose estimate says all-wrong (p_i ≤ ε) or all-correct
    (p_i ≥ 1 − ε) gets 0 samples (its GRPO group would have zero advantage everywhere). The budget is split equally
    over the informative prompts: budget // k each, and the budget % k units left one each to the lowest indices
    (largest remainder with equal remainders), so every process computes the same split.

    ``epsilon`` (default 0, in [0, 0.5)): with a probe estimate p̂ = a/N′ any ε < 1/N′ is the same as 0 and drops
    exactly the groups DAPO drops (every probe rejected, or every probe accepted). With a history estimate (the
    decayed posterior mean of :class:`gvm_trl.estimates.PromptHistory`), p̃ is exactly 0 or 1 only when no visit
    ever saw the other outcome; ε > 0 also drops prompts the history says are almost surely solved or unsolved.

    ``min_samples`` floors and ``max_samples`` caps apply to informative prompts (the others always get 0).

    Infeasible cases, as in :func:`allocate_budget`:

    - no informative prompt (or no prompts): returns all zeros; the caller decides what to do (skip the update, or
      fall back to :func:`uniform_allocation`). ``sum(result) < budget`` is the signal.
    - min_samples · k > budget (k informative prompts): raises ValueError naming min_samples.
    - max_samples · k < budget: every informative prompt gets max_samples; the result sums to less than the budget.
    """
    rates = as_rates(accept_rates, "accept_rates")
    budget_ = as_count(budget, "budget")
    threshold = DYNAMIC_EPSILON_RANGE.check(epsilon, "epsilon")
    low, high = _check_bounds(min_samples, max_samples)
    informative = [i for i, p in enumerate(rates) if threshold < p < 1.0 - threshold]
    sizes = [0] * len(rates)
    if not informative:
        return sizes
    count = len(informative)
    if low * count > budget_:
        raise ValueError(
            f"min_samples={low} for {count} informative prompts needs {low * count} samples, more than "
            f"budget={budget_}"
        )
    shares = [int(high)] * count if high * count <= budget_ else uniform_allocation(count, budget_)
    for i, share in zip(informative, shares):
        sizes[i] = share
    return sizes


def _check_info_power(info_power: Any) -> float:
    return INFO_POWER_RANGE.check(info_power, "info_power")


def knapsack_value(num_samples: int, accept_rate: float, *, info_power: float = 2.0) -> float:
    """Knapsack RL's value of giving a prompt n samples (Li et al. 2025, arXiv:2509.25849, §3):

        V(n, p) = P(non-zero gradient | n, p) · InfoGain(p) = (1 − p^n − (1 − p)^n) · p (1 − p)^k,

    where 1 − p^n − (1 − p)^n is the chance that a GRPO group of n samples holds both an accepted and a rejected one
    (otherwise every advantage is 0), and InfoGain(p) = p(1 − p)^k approximates the gain in success probability one
    update brings; the paper's approximation is k = 2 (``info_power``). V(0, p) = 0; V(n, p) = 0 for p ∈ {0, 1}.
    """
    n = as_count(num_samples, "num_samples")
    p = as_rates([accept_rate], "accept_rate")[0]
    power = _check_info_power(info_power)
    if n == 0:
        return 0.0
    return (1.0 - p**n - (1.0 - p) ** n) * p * (1.0 - p) ** power


def knapsack_allocation(
    accept_rates: RealSequence,
    budget: int,
    *,
    min_samples: int = 1,
    max_samples: int | None = None,
    info_power: float = 2.0,
) -> list[int]:
    """Knapsack RL's budgets (Li et al. 2025, arXiv:2509.25849): the integer n_i in [min_samples, max_samples] with
    Σ n_i = budget that maximise Σ_i :func:`knapsack_value` (n_i, p_i).

    Every prompt starts at ``min_samples``; each remaining unit goes to the prompt whose value grows most by one more
    sample, Δ_i(n) = V(n + 1, p_i) − V(n, p_i) = p_i(1 − p_i)^k · (p_i^n (1 − p_i) + p_i (1 − p_i)^n), ties to the
    lowest index. For n ≥ 1 both terms of Δ_i(n) shrink as n grows, so each V(·, p_i) is concave there and this
    greedy is an exact maximiser of the separable objective under the bounds (the paper solves the same knapsack by
    dynamic programming). That is why ``min_samples`` must be ≥ 1: V(0) = V(1) = 0 (one sample never has a non-zero
    GRPO gradient), so the value is not concave from 0. The paper bounds budgets to [2, 128].

    Prompts with p_i ∈ {0, 1} have value 0: they get ``min_samples`` and nothing more. When no prompt can take a
    unit with positive gain (every p_i ∈ {0, 1}, or the others are at ``max_samples``), the rest of the budget is
    left unspent: the result sums to less than ``budget`` and the caller decides (e.g. :func:`uniform_allocation`).
    min_samples · #prompts > budget raises ValueError naming min_samples.
    """
    rates = as_rates(accept_rates, "accept_rates")
    budget_ = as_count(budget, "budget")
    low, high = _check_bounds(min_samples, max_samples)
    if low < 1:
        raise ValueError(
            "min_samples must be >= 1 for knapsack_allocation: the value of one sample is 0 (a group of one has no "
            f"GRPO gradient), so the value is concave only from 1 sample on (Knapsack RL uses 2); got {low}"
        )
    power = _check_info_power(info_power)
    if not rates:
        return []
    if low * len(rates) > budget_:
        raise ValueError(
            f"min_samples={low} for {len(rates)} prompts needs {low * len(rates)} samples, more than budget={budget_}"
        )
    scale = [p * (1.0 - p) ** power if 0.0 < p < 1.0 else 0.0 for p in rates]  # V(·, 0) = V(·, 1) = 0, any k

    def gain(i: int, n: int) -> float:
        p = rates[i]
        return scale[i] * (p**n * (1.0 - p) + p * (1.0 - p) ** n)

    sizes = [low] * len(rates)
    heap = [(-gain(i, low), i) for i in range(len(rates)) if scale[i] > 0.0 and low < high]
    heapq.heapify(heap)
    for _ in range(budget_ - low * len(rates)):
        while heap and heap[0][0] >= 0.0:  # a gain that underflowed to 0 adds nothing
            heapq.heappop(heap)
        if not heap:
            break
        _, i = heapq.heappop(heap)
        sizes[i] += 1
        if sizes[i] < high:
            heapq.heappush(heap, (-gain(i, sizes[i]), i))
    return sizes


def uniform_allocation(num_prompts: int, budget: int) -> list[int]:
    """The uniform split of ``budget`` over ``num_prompts`` prompts (the non-GVM baseline).

    Each prompt gets budget // num_prompts; the remaining budget % num_prompts units go one each to the
    lowest indices (largest remainder with all remainders equal). num_prompts = 0 gives [].
    """
    count = as_count(num_prompts, "num_prompts")
    budget_ = as_count(budget, "budget")
    if count == 0:
        return []
    base, extra = divmod(budget_, count)
    return [base + 1 if i < extra else base for i in range(count)]


def variance_bound(
    accept_rates: RealSequence,
    grad_norms: RealSequence,
    sizes: RealSequence,
    *,
    alpha: float,
    beta: float,
) -> float:
    """The objective of eq. (5): Σ_i 1/(1 + α/p_i^β) · G_i² / (p_i n_i), for diagnostics.

    Each term is computed as G_i² p_i^(β−1) / ((p_i^β + α) n_i), which equals the paper's form for p_i > 0
    and is its limit (0) as p_i → 0 when β ≥ 2. Terms with G_i = 0 or p_i = 0 contribute 0; a term with
    G_i > 0, p_i > 0 and n_i = 0 contributes +inf. ``sizes`` may be real (continuous allocations).
    """
    alpha_, beta_ = _check_regulariser(alpha, beta)
    rates = as_rates(accept_rates, "accept_rates")
    norms = as_nonnegative(grad_norms, "grad_norms")
    sizes_ = as_nonnegative(sizes, "sizes")
    check_same_length(accept_rates=rates, grad_norms=norms, sizes=sizes_)
    terms = []
    for p, g, n in zip(rates, norms, sizes_):
        if p == 0.0 or g == 0.0:
            continue
        if n == 0.0:
            return math.inf
        terms.append(g * g * p ** (beta_ - 1.0) / ((p**beta_ + alpha_) * n))
    try:
        return math.fsum(terms)
    except OverflowError:
        return math.inf


def lemma1_weights(sizes: RealSequence, accept_rates: RealSequence) -> list[float]:
    """Lemma 1's per-prompt factors 1/(n_i p_i) of the unbiased estimator, eq. (4); 0 where n_i p_i = 0.

    Lemma 1's p_i is the true accept rate; a trainer passes its estimate (e.g. the probe rate).
    """
    sizes_ = as_nonnegative(sizes, "sizes")
    rates = as_rates(accept_rates, "accept_rates")
    check_same_length(sizes=sizes_, accept_rates=rates)
    return [1.0 / (n * p) if n > 0.0 and p > 0.0 else 0.0 for n, p in zip(sizes_, rates)]


def mean_weights(num_accepted: RealSequence) -> list[float]:
    """Algorithm 1's per-prompt factors 1/|D_i| (observed accepted count); 0 where |D_i| = 0."""
    counts = as_nonnegative(num_accepted, "num_accepted")
    return [1.0 / d if d > 0.0 else 0.0 for d in counts]


REINFORCE_ADA_EXITS = ("balanced", "positive")


def reinforce_ada_finished(accepted: int, rejected: int, *, group_size: int, exit_rule: str) -> bool:
    """Reinforce-Ada's exit rule (Xiong et al. 2025, arXiv:2510.04996, Algorithm 1): a prompt stops being sampled
    once its drawn rows can fill a fixed-size update group of n = `group_size` with signal — ``"balanced"``
    (Reinforce-Ada-balance): at least ⌊n/2⌋ accepted and n − ⌊n/2⌋ rejected rows; ``"positive"``
    (Reinforce-Ada-pos): at least one accepted row."""
    accepted_, rejected_ = as_count(accepted, "accepted"), as_count(rejected, "rejected")
    n = _check_reinforce_ada(group_size, exit_rule)
    if exit_rule == "positive":
        return accepted_ >= 1
    return accepted_ >= n // 2 and rejected_ >= n - n // 2


def reinforce_ada_round(
    accepted: RealSequence,
    rejected: RealSequence,
    round_index: int,
    *,
    round_size: int = 8,
    max_rounds: int = 4,
    group_size: int = 4,
    exit_rule: str = "balanced",
) -> list[int]:
    """Completions to draw for each prompt in round `round_index` (0-based) of Reinforce-Ada's successive
    elimination, given what its earlier rounds drew (`accepted`/`rejected` per prompt): `round_size` for each prompt
    not yet finished (:func:`reinforce_ada_finished`), 0 for the finished ones and for every prompt from round
    `max_rounds` on, so no prompt is drawn more than `round_size` · `max_rounds` times. The defaults are the paper's
    code's (`round_repeat=8`, `max_rounds=4`, `n=4`, balanced)."""
    accepted_, rejected_ = as_nonnegative(accepted, "accepted"), as_nonnegative(rejected, "rejected")
    check_same_length(accepted=accepted_, rejected=rejected_)
    size, rounds, index = as_count(round_size, "round_size"), as_count(max_rounds, "max_rounds"), as_count(
        round_index, "round_index")
    if size < 1 or rounds < 1:
        raise ValueError(f"round_size and max_rounds must be >= 1, got {size} and {rounds}")
    if index >= rounds:
        return [0] * len(accepted_)
    return [0 if reinforce_ada_finished(int(a), int(r), group_size=group_size, exit_rule=exit_rule) else size
            for a, r in zip(accepted_, rejected_)]


def reinforce_ada_group(outcomes: Iterable[bool], *, group_size: int = 4) -> list[int]:
    """The fixed-size update group Reinforce-Ada trains on, from one prompt's drawn rows in draw order (`outcomes`:
    whether each was accepted): the indices of min(n, rows) rows holding ⌊n/2⌋ accepted ones where there are that
    many, else as close to it as the rows allow, the earliest drawn of each kind — what the paper's code keeps,
    under either exit rule and for a prompt that never finished (under ``"positive"`` that one has no accepted
    row, so its group is all rejected rows)."""
    flags = [bool(o) for o in outcomes]
    n = _check_reinforce_ada(group_size, "balanced")
    positives = [i for i, accepted in enumerate(flags) if accepted]
    negatives = [i for i, accepted in enumerate(flags) if not accepted]
    take = min(n, len(flags))
    kept_positives = min(len(positives), n // 2)
    kept_negatives = min(len(negatives), take - kept_positives)
    kept_positives += min(len(positives) - kept_positives, take - kept_positives - kept_negatives)
    return sorted(positives[:kept_positives] + negatives[:kept_negatives])


def _check_reinforce_ada(group_size: Any, exit_rule: str) -> int:
    n = as_count(group_size, "group_size")
    if n < 1:
        raise ValueError(f"group_size must be >= 1, got {n}")
    if exit_rule not in REINFORCE_ADA_EXITS:
        raise ValueError(f"exit_rule must be one of {REINFORCE_ADA_EXITS}, got {exit_rule!r}")
    return n
