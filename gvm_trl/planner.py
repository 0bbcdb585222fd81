"""Estimate, then allocate: one generation batch's plan from what its probes showed (Algorithm 2, lines 4-5).

:func:`plan_allocation` turns per-prompt probe evidence (accepted probes, gradient-norm sums) into the estimates p_i
and G_i (the probes alone, or combined with the prompt's history, :class:`~gvm_trl.estimates.PromptHistory`) and the
budget n_i of Theorem 3 (:func:`~gvm_trl.allocation.allocate_budget`) — or of the peers that use the same probes and
history without Theorem 3: DAPO's dynamic sampling and Knapsack RL — falling back to the uniform split when no
prompt can be allocated to. It is pure and deterministic, so every process plans the same batch, and it is
the one planner: the trainers and `benchmarks/allocation_sim.py` both call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .allocation import allocate_budget, dynamic_sampling_allocation, knapsack_allocation, uniform_allocation
from .estimates import PromptEvidence, PromptHistory, optimistic_rates, pooled_rates

__all__ = [
    "AllocationRule",
    "BatchAllocation",
    "per_prompt_sums",
    "plan_allocation",
    "probe_evidence",
    "uniform_record",
    "unspent_budget_warning",
    "visit_evidence",
]


@dataclass(frozen=True)
class AllocationRule:
    """How one generation batch's budget is split (the config's `gvm_*` fields).

    ``policy``: ``"gvm"`` (Theorem 3), ``"dynamic"`` (DAPO's dynamic sampling) or ``"knapsack"`` (Knapsack RL);
    ``reused_probes``: probes per prompt that also train (Knapsack RL values each prompt's whole group);
    ``grad_norms``: ``"measured"`` G_i, or ``"constant"`` (Theorem 3 with G_i ≡ 1: no gradient-norm pass);
    ``rate_floor_quantile``: q, the rate of a prompt with nothing accepted (probes and history) becomes the q-quantile
    of its posterior (:func:`~gvm_trl.estimates.optimistic_rates`) instead of 0, and its G_i the batch's mean;
    ``rate_prior``: ``"batch"`` shrinks every rate towards a Beta prior fitted to the batch
    (:func:`~gvm_trl.estimates.pooled_rates`), a prompt with nothing accepted again taking the batch's mean G_i;
    ``ada_*``: Reinforce-Ada's completions per unfinished prompt and round, its most rounds, the size of each prompt's
    update group and its exit rule (policy ``"reinforce-ada"``, run by its own schedule rather than planned here).
    """

    budget: int
    num_probes: int
    policy: str = "gvm"
    reused_probes: int = 0
    dynamic_epsilon: float = 0.0
    alpha: float = 1e-3
    beta: float = 2.0
    min_samples: int = 0
    max_samples: int | None = None
    filter_threshold: float | None = None
    filter_insufficient: float = 0.0
    explore_samples: int = 0
    grad_norms: str = "measured"
    rate_floor_quantile: float | None = None
    rate_prior: str = "none"
    ada_round_size: int = 8
    ada_max_rounds: int = 4
    ada_group_size: int = 4
    ada_exit: str = "balanced"

    @classmethod
    def from_config(cls, args: Any) -> AllocationRule:
        return cls(
            budget=args.gvm_budget,
            num_probes=args.gvm_num_probes,
            policy=args.gvm_allocation,
            reused_probes=args.gvm_reused_probes,
            dynamic_epsilon=args.gvm_dynamic_epsilon,
            alpha=args.gvm_alpha,
            beta=args.gvm_beta,
            min_samples=args.gvm_min_samples,
            max_samples=args.gvm_max_samples,
            filter_threshold=args.gvm_filter_threshold,
            filter_insufficient=args.gvm_filter_insufficient,
            explore_samples=args.gvm_explore_samples,
            grad_norms=args.gvm_grad_norms,
            rate_floor_quantile=args.gvm_rate_floor_quantile,
            rate_prior=args.gvm_rate_prior,
            ada_round_size=args.gvm_ada_round_size,
            ada_max_rounds=args.gvm_ada_max_rounds,
            ada_group_size=args.gvm_ada_group_size,
            ada_exit=args.gvm_ada_exit,
        )

    @property
    def needs_grad_norms(self) -> bool:
        """Only Theorem 3 with measured G_i runs the gradient-norm pass."""
        return self.policy == "gvm" and self.grad_norms == "measured"


@dataclass(frozen=True)
class BatchAllocation:
    """One generation batch's plan: the record the log, the metrics and the per-prompt history read.

    ``accept_rates``/``grad_norms`` are the estimates the allocation used (probes, combined with the history when it
    is kept); ``probe_step`` is the optimizer step whose weights drew the probes (None: no probe round, as under
    uniform allocation, where ``num_probes`` is 0 and the estimates come from the batch's own rows).
    """

    prompt_keys: list[int]
    budget: int
    sizes: list[int]
    accept_rates: list[float]
    grad_norms: list[float] | None
    num_probes: int
    probe_step: int | None
    probes_accepted: list[int] = field(default_factory=list)
    probe_norm_sums: list[float] = field(default_factory=list)
    probe_norm_counts: list[int] = field(default_factory=list)
    fallback: bool = False

    @property
    def num_prompts(self) -> int:
        return len(self.sizes)

    @property
    def unspent(self) -> int:
        """Completions of the budget the plan does not spend (a cap on n_i with too few prompts left to take them)."""
        return max(self.budget - sum(self.sizes), 0)

    def log_line(self, step: int, allocated_accepted: list[int]) -> dict[str, Any]:
        """The JSONL line of this generation batch, with the accepted count of each prompt's allocated rows."""
        return {
            "step": step,
            "probe_step": self.probe_step,
            "budget": self.budget,
            "uniform_fallback": self.fallback,
            "prompts": [
                {
                    "index": self.prompt_keys[i],
                    "accept_rate": self.accept_rates[i],
                    "grad_norm": None if self.grad_norms is None else self.grad_norms[i],
                    "num_samples": self.sizes[i],
                    "num_accepted": allocated_accepted[i],
                    "probes_accepted": self.probes_accepted[i] if self.probes_accepted else None,
                }
                for i in range(self.num_prompts)
            ],
        }


def per_prompt_sums(values: torch.Tensor, slots: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """Float64 per-prompt sums of per-row `values`; rows whose slot is negative (padding) are left out."""
    valid = slots >= 0
    totals = torch.zeros(num_prompts, dtype=torch.float64)
    return totals.index_add_(0, slots[valid], values[valid].double())


def probe_evidence(
    keys: list[int], slots: torch.Tensor, accepted: torch.Tensor, norms: torch.Tensor | None, num_probes: int
) -> PromptEvidence:
    """What each prompt's N′ probes showed (Algorithm 2, line 4), from per-row facts: N′ trials, the accepted
    probes, and the sum and count of the measured gradient norms — the accepted probes' with a norm above 0 (`norms`
    None: no gradient-norm pass, so none). `slots`: each row's prompt slot in `keys` (-1: a padding row).

    The trainers' schedules and `benchmarks/allocation_sim.py` both build their evidence here."""
    measured = accepted & (norms > 0) if norms is not None else torch.zeros_like(accepted)
    norms = torch.zeros(len(accepted)) if norms is None else norms
    num_prompts = len(keys)
    return PromptEvidence(
        keys=list(keys),
        trials=[float(num_probes)] * num_prompts,
        accepted=per_prompt_sums(accepted, slots, num_prompts).tolist(),
        norm_sums=per_prompt_sums(norms * measured, slots, num_prompts).tolist(),
        norm_counts=per_prompt_sums(measured, slots, num_prompts).tolist(),
    )


def plan_allocation(
    evidence: PromptEvidence, rule: AllocationRule, history: PromptHistory | None = None, probe_step: int | None = None
) -> BatchAllocation:
    """p_i and G_i from `evidence` (and `history`), then n_i by the rule's policy; the uniform split when no prompt
    can be allocated to (``fallback``: for Theorem 3 no prompt with both an accepted probe and a gradient norm, for
    the others no prompt with 0 < p_i < 1 left). `history` is read, not changed."""
    counts = evidence if history is None else history.combined(evidence)
    rates, grad_norms = counts.estimates()
    if rule.policy == "gvm":
        rates, grad_norms = _theorem3_inputs(rule, counts, rates, grad_norms)
    sizes = _policy_sizes(rule, rates, grad_norms)
    fallback = sizes is None or (sum(sizes) == 0 < rule.budget)  # (a weight can underflow to 0 for p ≈ 1e-320)
    if fallback:
        sizes = uniform_allocation(len(rates), rule.budget)
    return BatchAllocation(
        prompt_keys=list(evidence.keys),
        budget=rule.budget,
        sizes=sizes,
        accept_rates=rates,
        grad_norms=grad_norms if rule.policy == "gvm" else None,
        num_probes=rule.num_probes,
        probe_step=probe_step,
        probes_accepted=[int(a) for a in evidence.accepted],
        probe_norm_sums=list(evidence.norm_sums),
        probe_norm_counts=[int(c) for c in evidence.norm_counts],
        fallback=fallback,
    )


def _theorem3_inputs(
    rule: AllocationRule, counts: PromptEvidence, rates: list[float], grad_norms: list[float]
) -> tuple[list[float], list[float]]:
    """The (p_i, G_i) Theorem 3 reads under the rule's levers: G_i ≡ 1, and the posterior floor on p_i for prompts
    with nothing accepted or the batch-fitted prior on every p_i, under which a prompt with nothing accepted (its G_i
    never measured) takes the mean of the batch's measured G_i."""
    if rule.grad_norms == "constant":
        grad_norms = [1.0] * len(rates)
    if rule.rate_floor_quantile is not None:
        floored = optimistic_rates(counts.accepted, counts.trials, quantile=rule.rate_floor_quantile)
    elif rule.rate_prior == "batch":
        floored = pooled_rates(counts.accepted, counts.trials)
    else:
        return rates, grad_norms
    measured = [g for g in grad_norms if g > 0]
    fill = sum(measured) / len(measured) if measured else 0.0
    grad_norms = [g if a > 0 or g > 0 else fill for a, g in zip(counts.accepted, grad_norms)]
    return floored, grad_norms


def _policy_sizes(rule: AllocationRule, rates: list[float], grad_norms: list[float]) -> list[int] | None:
    """n_i under the rule's policy, or None when no prompt can be allocated to."""
    if rule.policy == "gvm":
        if not any(p > 0 and g > 0 for p, g in zip(rates, grad_norms)):
            return None
        return allocate_budget(
            rates,
            grad_norms,
            rule.budget,
            alpha=rule.alpha,
            beta=rule.beta,
            min_samples=rule.min_samples,
            max_samples=rule.max_samples,
            filter_threshold=rule.filter_threshold,
            filter_insufficient=rule.filter_insufficient,
            explore_samples=rule.explore_samples,
        )
    margin = rule.dynamic_epsilon if rule.policy == "dynamic" else 0.0
    if not any(margin < p < 1.0 - margin for p in rates):
        return None
    if rule.policy == "dynamic":
        return dynamic_sampling_allocation(
            rates, rule.budget, epsilon=margin, min_samples=rule.min_samples, max_samples=rule.max_samples
        )
    if rule.policy == "knapsack":  # over whole groups: the reused probes count towards each n
        reused = rule.reused_probes
        groups = knapsack_allocation(
            rates,
            rule.budget + reused * len(rates),
            min_samples=max(reused + rule.min_samples, 1),
            max_samples=None if rule.max_samples is None else reused + rule.max_samples,
        )
        return [max(group - reused, 0) for group in groups]
    raise ValueError(f"Unknown allocation policy {rule.policy!r}; choose gvm, dynamic or knapsack.")


def unspent_budget_warning(allocation: BatchAllocation, max_samples: int | None) -> str:
    """What a user is told (once) when a plan leaves part of the budget unspent."""
    return (
        f"{allocation.unspent} of the {allocation.budget} completions of a generation batch's budget were not "
        f"allocated: only {sum(size > 0 for size in allocation.sizes)} prompts could take completions, each capped at "
        f"gvm_max_samples={max_samples} (gvm/budget_unspent logs it per batch). Raise gvm_max_samples, or lower "
        "gvm_budget_per_prompt, to spend the budget you set."
    )


def uniform_record(keys: list[int], group_size: int, accepted: list[float]) -> BatchAllocation:
    """The record of a uniform round (no probes): `group_size` completions per prompt, rates from their acceptance."""
    return BatchAllocation(
        prompt_keys=list(keys),
        budget=group_size * len(keys),
        sizes=[group_size] * len(keys),
        accept_rates=[a / group_size for a in accepted],
        grad_norms=None,
        num_probes=0,
        probe_step=None,
    )


def visit_evidence(allocation: BatchAllocation, allocated_accepted: list[int]) -> PromptEvidence:
    """What a visit adds to the per-prompt history: its probes and its allocated rows, accepted counts and the probes'
    gradient norms."""
    return PromptEvidence(
        keys=allocation.prompt_keys,
        trials=[float(allocation.num_probes + n) for n in allocation.sizes],
        accepted=[float(a + b) for a, b in zip(allocation.probes_accepted, allocated_accepted)],
        norm_sums=allocation.probe_norm_sums,
        norm_counts=[float(c) for c in allocation.probe_norm_counts],
    )
