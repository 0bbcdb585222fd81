"""Simulated rollouts from a known population: Lemma 1's gradient estimator under uniform and GVM allocations.

A population is, per prompt i, an accept rate p_i and the accepted outcomes y with their probabilities
q(y) = P(y | x_i, accepted) and gradients g(y) = ∇ ln P(y | x_i), given by their Gram matrix K. The EM gradient is
g* = Σ_i E_q g (a never-solved prompt contributes 0). A draw of prompt i is accepted with probability p_i and is then
outcome y with probability q(y). An estimator is a vector c over the outcomes (ĝ = Σ_k c_k g_k), so its error is
‖ĝ − g*‖² = (c − c*)ᵀ K (c − c*) exactly, without the gradients themselves; R replicates are drawn at
once.

A GVM step as the trainers run it, through the trainers' own planner and weights: N′ probes per prompt give the
estimates (p̂_i, Ĝ_i) — Ĝ_i the mean norm of the accepted probes — optionally combined with earlier visits by
`gvm_trl.estimates.PromptHistory`; `gvm_trl.planner.plan_allocation` splits the phase-2 budget by Theorem 3 (the
uniform split when no probe was accepted), the probes are reused, and each prompt's accepted rows get the weight of
`gvm_weighting` from `gvm_trl.weighting.prompt_weights`: ``lemma1`` = 1/((N′ + n_i) p̂_i) with the estimate the
allocation used (the pooled rate where it is 0), ``mean`` = 1/|D_i| (the pooled estimate: probes and phase 2). The practical uniform baseline draws N/m + N′ per prompt with 1/|D_i|: the same total.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

import torch

from gvm_trl import GVMGRPOConfig
from gvm_trl.allocation import allocate_budget, uniform_allocation
from gvm_trl.estimates import PromptHistory
from gvm_trl.planner import AllocationRule, plan_allocation, probe_evidence, visit_evidence
from gvm_trl.weighting import prompt_weights


@dataclass
class Population:
    """Per prompt its accept rate; per accepted outcome its prompt, its probability given acceptance, and K."""

    rates: np.ndarray  # [m]
    row_prompt: np.ndarray  # [K] int
    row_prob: np.ndarray  # [K], sums to 1 over each prompt's rows
    gram: np.ndarray  # [K, K]
    info: dict = field(default_factory=dict)

    @classmethod
    def from_pool(cls, pool) -> "Population":
        """A `gradient_pool.GradientPool`: each accepted pool completion is one outcome, all equally likely."""
        counts = [int(a.sum()) for a in pool.accepted]
        row_prompt = np.repeat(np.arange(len(counts)), counts)
        row_prob = np.concatenate([np.full(c, 1.0 / c) for c in counts if c] or [np.zeros(0)])
        return cls(pool.rates, row_prompt, row_prob, pool.gram, dict(pool.info))

    @property
    def size(self) -> int:
        return len(self.rates)

    @property
    def rows(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.row_prompt == i) for i in range(self.size)]

    @property
    def norms(self) -> np.ndarray:
        return np.sqrt(np.clip(np.diag(self.gram), 0.0, None))

    def subset(self, prompts) -> "Population":
        prompts = list(prompts)
        keep = np.concatenate([np.flatnonzero(self.row_prompt == i) for i in prompts] or [np.zeros(0, int)])
        renumber = {old: new for new, old in enumerate(prompts)}
        return Population(self.rates[prompts], np.array([renumber[i] for i in self.row_prompt[keep]], dtype=int),
                          self.row_prob[keep], self.gram[np.ix_(keep, keep)], self.info)

    def target(self) -> np.ndarray:
        """c*: g* = Σ_i E_q g = Σ_k q_k g_k."""
        return self.row_prob.copy()

    def moments(self) -> dict[str, np.ndarray]:
        """Per prompt: E‖g‖ (Algorithm 2's G_i), sqrt(E‖g‖²) (Lemma 2's), ‖μ_i‖² and E‖g‖² (0 if never solved)."""
        out = {"mean_norm": [], "rms_norm": [], "mu_sq": [], "second_moment": []}
        squares, norms = np.diag(self.gram), self.norms
        for rows in self.rows:
            q = self.row_prob[rows]
            second = float(q @ squares[rows]) if len(rows) else 0.0
            values = (float(q @ norms[rows]) if len(rows) else 0.0, math.sqrt(second),
                      float(q @ self.gram[np.ix_(rows, rows)] @ q) if len(rows) else 0.0, second)
            for key, value in zip(out, values):
                out[key].append(value)
        return {key: np.array(value) for key, value in out.items()}

    def exact_mse(self, sizes: np.ndarray) -> float:
        """Lemma 1, true p_i, fixed sizes: Σ_{n_i>0} (E‖g‖²/p_i − ‖μ_i‖²)/n_i + ‖Σ_{n_i=0} μ_i‖²."""
        stats = self.moments()
        variance = sum((stats["second_moment"][i] / self.rates[i] - stats["mu_sq"][i]) / sizes[i]
                       for i in range(self.size) if sizes[i] > 0 and self.rates[i] > 0)
        missed = np.where(np.asarray(sizes)[self.row_prompt] == 0, self.row_prob, 0.0)
        return float(variance + missed @ self.gram @ missed)

    def squared_errors(self, coefficients: np.ndarray) -> np.ndarray:
        """‖ĝ_r − g*‖² for each replicate row of `coefficients` [R, K]."""
        errors = coefficients - self.target()
        return np.einsum("rk,rk->r", errors @ self.gram, errors)


@dataclass
class Draws:
    """R replicates of draws: how often each accepted outcome came up [R, K], accepted per prompt [R, m], and the
    sum of the accepted draws' gradient norms per prompt [R, m]."""

    counts: np.ndarray
    accepted: np.ndarray
    norm_sums: np.ndarray


def draw(population: Population, sizes: np.ndarray, rng: np.random.Generator) -> Draws:
    """`sizes[r, i]` draws of prompt i in replicate r."""
    sizes = np.asarray(sizes, dtype=np.int64)
    replicates = len(sizes)
    counts = np.zeros((replicates, len(population.row_prompt)))
    accepted = rng.binomial(sizes, population.rates[None, :]) if population.size else np.zeros_like(sizes)
    norms = population.norms
    norm_sums = np.zeros(sizes.shape)
    for i, rows in enumerate(population.rows):
        if len(rows) and accepted[:, i].any():
            counts[:, rows] = rng.multinomial(accepted[:, i], population.row_prob[rows])
            norm_sums[:, i] = counts[:, rows] @ norms[rows]
    return Draws(counts, accepted.astype(float), norm_sums)


def combine(*parts: Draws) -> Draws:
    return Draws(sum(p.counts for p in parts), sum(p.accepted for p in parts), sum(p.norm_sums for p in parts))


def weighted(population: Population, draws: Draws, factors: np.ndarray) -> np.ndarray:
    """Estimator coefficients: each accepted draw of prompt i counts factors[r, i]."""
    return draws.counts * factors[:, population.row_prompt]


def inverse(values: np.ndarray) -> np.ndarray:
    """1/x, 0 where x = 0."""
    return np.divide(1.0, values, out=np.zeros(np.shape(values)), where=np.asarray(values) > 0)


# -- fixed allocations -------------------------------------------------------------------------------------------------


def uniform_sizes(population: Population, budget: int, replicates: int) -> np.ndarray:
    return np.broadcast_to(np.array(uniform_allocation(population.size, budget)), (replicates, population.size))


def fixed_estimators(population: Population, sizes: np.ndarray, rng) -> dict[str, np.ndarray]:
    """Lemma 1 with the true p_i, and Algorithm 1's 1/|D_i| (for uniform sizes: Lemma 1 with p̂ from its draws)."""
    draws = draw(population, sizes, rng)
    return {"true-p": weighted(population, draws, inverse(sizes * population.rates)),
            "mean": weighted(population, draws, inverse(draws.accepted))}


# -- GVM as the trainers run it ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GVMSetting:
    """One GVM configuration: probes N′, the weighting, the exploration floor, and the prompt history.

    With `history_visits` = V > 0 and a `decay` λ, the prompts were visited V times before (probes and phase 2 from
    the same population, each visit allocated as this one is) and their record is kept by `PromptHistory(λ)`.
    """

    probes: int
    weighting: str = "lemma1"
    explore: int = 0
    decay: float | None = None
    history_visits: int = 0
    grad_norms: str = "measured"  # gvm_grad_norms
    rate_floor: float | None = None  # gvm_rate_floor_quantile
    rate_prior: str = "none"  # gvm_rate_prior

    @property
    def label(self) -> str:
        parts = [f"N'={self.probes}", self.weighting]
        if self.explore:
            parts.append(f"explore={self.explore}")
        if self.decay is not None and self.history_visits:
            parts.append(f"history={self.history_visits}x,decay={self.decay:g}")
        if self.grad_norms != "measured":
            parts.append(f"G={self.grad_norms}")
        if self.rate_floor is not None:
            parts.append(f"floor={self.rate_floor:g}")
        if self.rate_prior != "none":
            parts.append(f"prior={self.rate_prior}")
        return "gvm[" + ",".join(parts) + "]"


@dataclass
class GVMOutcome:
    coefficients: np.ndarray  # [R, K]
    sizes: np.ndarray  # [R, m] phase-2 sizes of the measured visit
    rates: np.ndarray  # [R, m] the accept-rate estimates its allocation used
    fallbacks: int  # replicates whose plan fell back to the uniform split (no prompt had an accepted probe)


@lru_cache(maxsize=None)
def allocation_rule(setting: GVMSetting, num_prompts: int, budget: int, alpha: float = 1e-3,
                    beta: float = 2.0) -> AllocationRule:
    """The rule a trainer configured with `setting` plans with: built from a real `GVMGRPOConfig` (so its defaults
    and validation are the trainer's), m prompts of N′ probes per generation batch, for a phase-2 budget of `budget`
    completions (which need not be a multiple of m: the config takes the nearest per-prompt budget, the rule the
    exact total)."""
    config = GVMGRPOConfig(
        output_dir=tempfile.gettempdir(), use_cpu=True, bf16=False, report_to="none",
        num_generations=setting.probes, per_device_train_batch_size=num_prompts * setting.probes,
        gvm_num_probes=setting.probes, gvm_budget_per_prompt=max(round(budget / num_prompts), 0),
        gvm_weighting=setting.weighting, gvm_alpha=alpha, gvm_beta=beta, gvm_explore_samples=setting.explore,
        gvm_history_decay=0.0, gvm_grad_norms=setting.grad_norms,  # (the simulation keeps the history itself)
        gvm_rate_floor_quantile=setting.rate_floor, gvm_rate_prior=setting.rate_prior,
    )
    return replace(AllocationRule.from_config(config), budget=budget)


def probe_rows(population: Population, draws: Draws, replicate: int, probes: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replicate `replicate`'s probe rows as a trainer sees them: each row's prompt slot, whether it was accepted and
    its gradient norm (0 if not), every prompt's accepted draws first."""
    outcomes = np.repeat(np.arange(len(population.row_prompt)), draws.counts[replicate].astype(np.int64))
    misses = np.repeat(np.arange(population.size), probes - draws.accepted[replicate].astype(np.int64))
    slots = np.concatenate([population.row_prompt[outcomes], misses])
    norms = np.concatenate([population.norms[outcomes], np.zeros(len(misses))])
    accepted = np.arange(len(slots)) < len(outcomes)
    return torch.from_numpy(slots).long(), torch.from_numpy(accepted), torch.from_numpy(norms)


def simulate_gvm(population: Population, budget: int, setting: GVMSetting, replicates: int, rng,
                 alpha: float = 1e-3, beta: float = 2.0, earlier: list[Population] | None = None) -> GVMOutcome:
    """R replicates of a GVM step (after `history_visits` earlier visits when the setting keeps a history), planned
    and weighted by the trainers' own code: the evidence of `gvm_trl.planner.probe_evidence` from the probe rows,
    `gvm_trl.planner.plan_allocation` (with its uniform fallback) under the rule a trainer with this setting builds
    (:func:`allocation_rule`), and `gvm_trl.weighting.prompt_weights` (with its pooled-rate fallback for prompts
    whose planned rate is 0).

    `earlier`: the population at each earlier visit, oldest first (a policy that moved between visits); by default
    the same population every time.
    """
    m, probes = population.size, setting.probes
    keep_history = setting.decay is not None and setting.history_visits > 0
    visits = setting.history_visits + 1 if keep_history else 1
    if earlier is None:
        earlier = [population] * (visits - 1)
    if keep_history and len(earlier) != setting.history_visits:
        raise ValueError(f"earlier has {len(earlier)} populations for {setting.history_visits} earlier visits")
    if setting.weighting not in ("lemma1", "mean"):
        raise ValueError(f"weighting must be lemma1 or mean, got {setting.weighting!r}")
    histories = [PromptHistory(setting.decay) for _ in range(replicates)] if keep_history else [None] * replicates
    rule = allocation_rule(setting, m, budget, alpha, beta)
    keys = list(range(m))
    for visit in range(visits):
        current = population if visit == visits - 1 else earlier[visit]
        probe_draws = draw(current, np.full((replicates, m), probes), rng)
        plans = []
        for r in range(replicates):
            slots, accepted, norms = probe_rows(current, probe_draws, r, probes)
            measured = norms if rule.needs_grad_norms else None
            plans.append(plan_allocation(probe_evidence(keys, slots, accepted, measured, probes), rule, histories[r]))
        sizes = np.array([plan.sizes for plan in plans], dtype=np.int64)
        phase2 = draw(current, sizes, rng)
        if keep_history and visit < setting.history_visits:
            for plan, history, accepted in zip(plans, histories, phase2.accepted):
                history.record(visit_evidence(plan, accepted.tolist()))
    pooled = combine(probe_draws, phase2)
    factors = np.stack([
        prompt_weights(setting.weighting, plan.accept_rates, torch.tensor(size + probes, dtype=torch.float64),
                       torch.tensor(accepted, dtype=torch.float64)).numpy()
        for plan, size, accepted in zip(plans, sizes, pooled.accepted)
    ])
    rates = np.array([plan.accept_rates for plan in plans])
    return GVMOutcome(weighted(population, pooled, factors), sizes, rates, sum(plan.fallback for plan in plans))


def oracle_sizes(population: Population, budget: int, alpha: float = 1e-3, beta: float = 2.0) -> np.ndarray:
    """Theorem 3's allocation from the true p_i and G_i = sqrt(E‖g‖²)."""
    return np.array(allocate_budget(population.rates, population.moments()["rms_norm"], budget, alpha=alpha, beta=beta))


def optimal_sizes(population: Population, budget: int) -> np.ndarray:
    """n_i ∝ sqrt(Var of one draw's Lemma 1 term): the exact minimiser of Lemma 1's variance (true p_i)."""
    stats = population.moments()
    safe = np.where(population.rates > 0, population.rates, 1.0)
    spread = np.where(population.rates > 0, stats["second_moment"] / safe - stats["mu_sq"], 0.0)
    weights = np.sqrt(np.clip(spread, 0.0, None))
    return np.array(allocate_budget([1.0] * population.size, weights, budget, alpha=1e-12, beta=2.0))


def with_setting(setting: GVMSetting, **changes) -> GVMSetting:
    return replace(setting, **changes)


def error_summary(population: Population, coefficients: np.ndarray) -> dict:
    """MSE ± standard error of the replicates, and its split into variance and bias² (Var/R taken off the bias)."""
    squared = population.squared_errors(coefficients)
    replicates = len(squared)
    centred = coefficients - coefficients.mean(axis=0)
    variance = float(np.einsum("rk,rk->r", centred @ population.gram, centred).sum() / max(replicates - 1, 1))
    bias = coefficients.mean(axis=0) - population.target()
    return {
        "mse": float(squared.mean()),
        "mse_se": float(squared.std(ddof=1) / math.sqrt(replicates)) if replicates > 1 else 0.0,
        "variance": variance,
        "bias2": max(0.0, float(bias @ population.gram @ bias) - variance / replicates),
    }


# -- synthetic populations ---------------------------------------------------------------------------------------------


def gaussian_population(num_prompts: int, dim: int, seed: int, outcomes: int = 64) -> Population:
    """p_i geometric from 0.03 to 1; accepted gradients g = μ_i + σ_i ε (ε standard normal in `dim` dimensions),
    `outcomes` equally likely draws per prompt: gradients whose mean does not depend on p_i."""
    rng = np.random.default_rng(seed)
    rates = np.geomspace(0.03, 1.0, num_prompts)
    directions = rng.standard_normal((num_prompts, dim))
    means = directions / np.linalg.norm(directions, axis=1, keepdims=True) * rng.uniform(0.5, 2.0, (num_prompts, 1))
    sigmas = rng.uniform(0.5, 3.0, num_prompts) / math.sqrt(dim)
    vectors = means[:, None, :] + sigmas[:, None, None] * rng.standard_normal((num_prompts, outcomes, dim))
    vectors = vectors.reshape(-1, dim)
    return Population(rates, np.repeat(np.arange(num_prompts), outcomes), np.full(len(vectors), 1.0 / outcomes),
                      vectors @ vectors.T, {"family": "gaussian", "dim": dim, "outcomes_per_prompt": outcomes})


def softmax_prompt(rng, rate: float, outcomes: int, accepted: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(Φ [outcomes, dim], π [outcomes]): one prompt's policy π = softmax(b + Φθ) at θ = 0, whose first `accepted`
    outcomes pass with total probability `rate` (the bias b is shifted on them to make it so). The random draws do
    not depend on `rate`, so one seed gives the same prompts at any rate."""
    features = rng.standard_normal((outcomes, dim)) / math.sqrt(dim) * rng.uniform(0.5, 2.0)
    logits = rng.standard_normal(outcomes)
    if 0 < rate < 1:
        pass_mass, fail_mass = np.exp(logits[:accepted]).sum(), np.exp(logits[accepted:]).sum()
        logits[:accepted] += math.log(rate / (1 - rate) * fail_mass / pass_mass)
    policy = np.exp(logits - logits.max())
    return features, policy / policy.sum()


def gradlogp_population(num_prompts: int, seed: int, never_share: float = 0.125, low: float = 0.02,
                        high: float = 0.98, outcomes: int = 16, accepted: int = 4, dim: int = 64,
                        logit_shift: float = 0.0) -> Population:
    """Each prompt is a softmax policy over `outcomes` completions, `accepted` of which pass, with logits b_i + Φ_i θ
    in a parameter space of `dim` dimensions shared by all prompts; g(y) = ∇_θ ln π(y) = Φ_iᵀ(e_y − π_i). The
    mean accepted gradient is then E_q g = Φ_iᵀ(q_i − π_i) = ∇_θ ln p_i, which shrinks as p_i → 1, as for a real
    model.

    A share `never_share` of prompts has no accepted completion (p_i = 0); the others have p_i log-uniform in
    [low, high]. Each prompt's features are scaled by a factor in [0.5, 2] (prompts differ in gradient size).
    `logit_shift` moves every solvable prompt's ln(p/(1 − p)) by that much, the prompts otherwise unchanged: the same
    population after the policy learned (> 0) or forgot (< 0).
    """
    rng = np.random.default_rng(seed)
    never = round(never_share * num_prompts)
    rates = np.concatenate([np.zeros(never), np.geomspace(low, high, num_prompts - never)])
    rng.shuffle(rates)
    if logit_shift:
        rates = np.where(rates > 0, 1 / (1 + np.exp(-(np.log(rates / (1 - rates)) + logit_shift))), 0.0)
    vectors, row_prompt, row_prob = [], [], []
    for i, rate in enumerate(rates):
        features, policy = softmax_prompt(rng, rate, outcomes, accepted, dim)
        if rate == 0:
            continue
        posterior = policy[:accepted] / policy[:accepted].sum()
        for y in range(accepted):
            vectors.append(features.T @ (np.eye(outcomes)[y] - policy))
            row_prompt.append(i)
            row_prob.append(posterior[y])
    vectors = np.array(vectors).reshape(-1, dim)
    return Population(rates, np.array(row_prompt, dtype=int), np.array(row_prob), vectors @ vectors.T,
                      {"family": "gradlogp", "dim": dim, "outcomes_per_prompt": outcomes,
                       "accepted_per_prompt": accepted, "never_share": never_share})
