"""What a GVM run reports: the `gvm/` metrics, the stage timer, and the allocation log (`gvm_allocations.jsonl`).

The metric functions are pure (they take the plan and the counts, and return name → value), so they can be tested
without a trainer; the trainer appends their values to TRL's metrics, which TRL averages per logging step.
:class:`AllocationLog` is the one writer and reader of the JSONL log: the example script and the benchmarks read it
through :func:`read_allocation_log` rather than parsing it by hand.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import textwrap
import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .allocation import uniform_allocation, variance_bound
from .planner import BatchAllocation
from .state import write_atomically

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
    allocation: BatchAllocation,
    timings: dict[str, float],
    reused_probes: int,
    alpha: float,
    beta: float,
    *,
    step: int | None = None,
    nonfinite: int = 0,
    rounds: int = 0,
) -> dict[str, float]:
    """The `gvm/` metrics of one generation batch trained at optimizer step `step` (the running count,
    `gvm/empty_batches`, is the trainer's); `nonfinite`: the infinite rewards its rows were scored with; `rounds`: the
    generation calls that drew its rows (its probes included, drawn with the previous batch's when probing ahead)."""
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
        "gvm/budget_unspent": float(allocation.unspent),
        "gvm/nonfinite_rewards": float(nonfinite),
        "gvm/generation_rounds": float(rounds),
    }
    if allocation.probe_step is not None and step is not None:
        metrics["gvm/probe_age"] = float(step - allocation.probe_step)
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

    def start(self, resumed_step: int | None) -> str | None:
        """Ready the log for a run. A run resumed from the checkpoint of step `resumed_step` redoes the steps from
        there: their lines are dropped (a torn last line too, with a warning). A fresh run never mixes with an
        earlier run's log: that one is kept, renamed `gvm_allocations.<k>.jsonl` (the lowest free k, named in a
        warning; returned), and the new run starts an empty log."""
        if not os.path.exists(self.path):
            return None
        if resumed_step is not None:
            kept = [line for line in read_allocation_log(self.path) if line["step"] < resumed_step]
            write_atomically(self.path, "".join(json.dumps(line) + "\n" for line in kept))
            return None
        stem, suffix = os.path.splitext(self.path)
        archive = next(f"{stem}.{k}{suffix}" for k in itertools.count(1) if not os.path.exists(f"{stem}.{k}{suffix}"))
        os.replace(self.path, archive)
        warnings.warn(f"{self.path} held an earlier run's allocations (this run does not resume it): kept as "
                      f"{archive}; this run writes a new log.", stacklevel=3)
        return archive


def read_allocation_log(path: str) -> list[dict[str, Any]]:
    """The lines of an allocation log; `path` is the file or the run's output directory. A torn last line (a kill
    while it was appended) is dropped with a warning; a torn line before it is an error naming the line."""
    if os.path.isdir(path):
        path = os.path.join(path, ALLOCATIONS_FILE)
    with open(path, encoding="utf-8") as handle:
        lines = [(number, line) for number, line in enumerate(handle, start=1) if line.strip()]
    records = []
    for number, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != lines[-1][0]:
                raise ValueError(f"{path} line {number} is not valid JSON, and later lines follow it: the log was "
                                 "edited or corrupted; restore it or delete the file.") from None
            warnings.warn(f"{path}: its last line is torn (a kill while it was written); dropped.", stacklevel=2)
    return records


def model_card_section(trainer_name: str, args: Any, history: Any = None) -> str:
    """The model card's "GVM settings" section: the `gvm_*` fields a model was trained with (the history decay as
    used: 0 where no history was kept)."""
    fields = {name: getattr(args, name) for name in vars(args) if name.startswith("gvm_")}
    fields["gvm_history_decay"] = history.decay if history is not None else 0.0
    settings = "\n".join(f"| `{name}` | `{value}` |" for name, value in fields.items())
    paper_id = GVM_PAPER["id"]
    return (
        f"\n## GVM settings\n\nTrained with `{trainer_name}` from [gvm-trl](https://github.com/gvm-trl/gvm-trl): GVM "
        "allocates each generation batch's rollout budget over its prompts to minimise the variance of the gradient "
        f"estimate ([arXiv:{paper_id}](https://huggingface.co/papers/{paper_id})).\n\n"
        f"| field | value |\n| --- | --- |\n{settings}\n"
    )
