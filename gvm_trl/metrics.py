"""What a GVM run reports: the `gvm/` metrics, the stage timer, and the allocation log (`gvm_allocations.jsonl`).

The metric functions are pure (they take the plan and the counts, and return name → value), so they can be tested
without a trainer; the trainer appends their values to TRL's metrics, which TRL averages per logging step.
:class:`AllocationLog` is the one writer and reader of the JSONL log: the example script and the benchmarks read it
through :func:`read_allocation_log` rather than parsing it by hand.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .allocation import uniform_allocation, variance_bound
from .planner import BatchAllocation

__all__ = [
    "ALLOCATIONS_FILE",
    "GVM_PAPER",
    "STAGES",
    "AllocationLog",
    "StageTimer",
    "allocation_metrics",
    "model_card_section",
    "group_reward_std",
    "read_allocation_log",
    "variance_bound_ratio",
]

ALLOCATIONS_FILE = "gvm_allocations.jsonl"
GVM_PAPER = {
    "title": "Optimizing Chain-of-Thought Reasoners via Gradient Variance Minimization in Rejection Sampling and RL",
    "id": "2505.02391",
    "citation": textwrap.dedent("""\
        @article{yao2025optimizing,
            title        = {{Optimizing Chain-of-Thought Reasoners via Gradient Variance Minimization in Rejection Sampling and RL}},
            author       = {Jiarui Yao and Yifan Hao and Hanning Zhang and Hanze Dong and Wei Xiong and Nan Jiang and Tong Zhang},
            year         = 2025,
            eprint       = {arXiv:2505.02391},
        }"""),
}


# The timed stages of a generation batch, in the order they run. ``probe_logps`` (the riding probes' old
# log-probabilities, probing ahead) runs inside ``phase2``, the generation round it follows.
STAGES = ("probe", "grad_norms", "allocate", "phase2", "probe_logps")


class StageTimer:
    """Seconds per stage of one generation batch (:data:`STAGES`), also added to the run's totals (``time_<stage>``)
    as soon as the stage has run."""

    def __init__(self, totals: dict[str, float]) -> None:
        self.totals = totals

    @contextmanager
    def stage(self, name: str, seconds: dict[str, float]) -> Iterator[None]:
        """Time the block as stage `name`, recording it in `seconds` (the batch's) and in the totals."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            seconds[name] = elapsed
            self.totals[f"time_{name}"] += elapsed


def samples_drawn(sizes: list[int], reused_probes: int) -> list[int]:
    """Training samples per prompt: its allocated completions plus its reused probes."""
    return [size + reused_probes for size in sizes]


def variance_bound_ratio(
    accept_rates: list[float], grad_norms: list[float], sizes: list[int], reused_probes: int, alpha: float, beta: float
) -> float:
    """Eq. (5) for this allocation over eq. (5) for the uniform split of the same budget (NaN: not finite).

    Sample sizes count the reused probes, as the Lemma 1 weights do.
    """
    uniform = uniform_allocation(len(sizes), sum(sizes))
    options = {"alpha": alpha, "beta": beta}
    bound = variance_bound(accept_rates, grad_norms, samples_drawn(sizes, reused_probes), **options)
    baseline = variance_bound(accept_rates, grad_norms, samples_drawn(uniform, reused_probes), **options)
    return bound / baseline if 0 < baseline < math.inf else math.nan


def group_reward_std(prompts: torch.Tensor, rewards: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """Per prompt: the std of the rewards of all its scored rows in the generation batch (for
    `frac_reward_zero_std`)."""
    stds = torch.zeros(num_prompts)
    for slot in range(num_prompts):
        values = rewards[(prompts == slot) & ~torch.isnan(rewards)]
        stds[slot] = values.std() if values.numel() > 1 else 0.0
    return stds


def allocation_metrics(
    allocation: BatchAllocation, timings: dict[str, float], reused_probes: int, alpha: float, beta: float
) -> dict[str, float]:
    """The `gvm/` metrics of one generation batch (the running ones, `gvm/empty_batches` and `gvm/probe_age`, are the
    trainer's: they need the run's state)."""
    sizes, rates, norms = allocation.sizes, allocation.accept_rates, allocation.grad_norms
    num_prompts = allocation.num_prompts
    metrics = {
        "gvm/accept_rate": sum(rates) / num_prompts,
        "gvm/samples_per_prompt_mean": sum(sizes) / num_prompts,
        "gvm/samples_per_prompt_min": float(min(sizes)),
        "gvm/samples_per_prompt_max": float(max(sizes)),
        "gvm/prompts_zero_budget": float(sum(size == 0 for size in sizes)),
        "gvm/probe_completions": float(allocation.num_probes * num_prompts),
        "gvm/budget_completions": float(sum(sizes)),
        "gvm/uniform_fallback": float(allocation.fallback),
    }
    metrics.update({f"gvm/time_{name}": seconds for name, seconds in timings.items()})
    if norms is not None:
        metrics["gvm/grad_norm"] = sum(norms) / num_prompts
        ratio = variance_bound_ratio(rates, norms, sizes, reused_probes, alpha, beta)
        if math.isfinite(ratio):
            metrics["gvm/variance_bound_ratio"] = ratio
    return metrics


class AllocationLog:
    """`output_dir/gvm_allocations.jsonl`: one line per generation batch (see `BatchAllocation.log_line`)."""

    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, ALLOCATIONS_FILE)

    def append(self, line: dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

    def truncate_from(self, step: int) -> None:
        """Drop the lines of steps ≥ `step`: a run resumed from the checkpoint of `step` redoes them."""
        if not os.path.exists(self.path):
            return
        kept = [line for line in read_allocation_log(self.path) if line["step"] < step]
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in kept)


def read_allocation_log(path: str) -> list[dict[str, Any]]:
    """The lines of an allocation log; `path` is the file or the run's output directory."""
    if os.path.isdir(path):
        path = os.path.join(path, ALLOCATIONS_FILE)
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def model_card_section(trainer_name: str, fields: dict[str, Any], paper_id: str) -> str:
    """The model card's "GVM settings" section: the `gvm_*` fields a model was trained with."""
    settings = "\n".join(f"| `{name}` | `{value}` |" for name, value in fields.items())
    return (
        f"\n## GVM settings\n\nTrained with `{trainer_name}` from [gvm-trl](https://github.com/gvm-trl/gvm-trl): GVM "
        "allocates each generation batch's rollout budget over its prompts to minimise the variance of the gradient "
        f"estimate ([arXiv:{paper_id}](https://huggingface.co/papers/{paper_id})).\n\n"
        f"| field | value |\n| --- | --- |\n{settings}\n"
    )
