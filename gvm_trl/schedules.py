"""The three rollout schedules of a generation batch: which completions are drawn, in which generation calls.

- :class:`UniformSchedule` (``gvm_allocation="uniform"``): no probes, one round of N′ + N/m completions per prompt
  (with ``gvm_weighting="none"``, exactly `trl.GRPOTrainer`'s round).
- :class:`SequentialSchedule`: the paper's protocol (Algorithm 2): a probe round, the estimates and the plan, then the
  allocated completions.
- :class:`ProbeAheadSchedule`: one generation round per batch: this batch's allocated completions and the *next*
  batch's probes in the same call, under the same weights (as SPEED, arXiv 2506.09016, hides its screening round).
  It owns the probed batch waiting for its allocated round; the first batch of a run (or after resuming) gets a
  probe round of its own, and the last batch has no successor to probe.

A schedule asks its trainer for four things: ``_generate_rollout`` (TRL's generate-and-score for some rows),
``_accepted`` (which rows pass ``gvm_accept_threshold``), ``_probe_grad_norms`` (the gradient-norm pass over the
accepted probes) and, when probing ahead, ``_upcoming_prompts``/``_attach_sampling_logps``. Planning is the pure
:func:`~gvm_trl.planner.plan_allocation`.

Probing ahead with reused probes, the probes train a generation batch after they were drawn, so they need their
old log-probabilities; their gradient-norm pass runs right after their generation under the same weights, so where
the rule needs norms and ``_folds_sampling_logps`` holds, that pass's forward gives both (stage ``grad_norms``;
``probe_logps`` then stays 0). Otherwise (history-only policies, probes not reused, TRL computing them itself,
dropout) ``_attach_sampling_logps`` runs its own forward (stage ``probe_logps``, inside ``phase2``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
from accelerate.utils import gather_object

from .estimates import PromptEvidence
from .planner import AllocationRule, BatchAllocation, plan_allocation, uniform_record, visit_evidence
from .rollout import Rollout
from .weighting import per_prompt_sums

if TYPE_CHECKING:
    from .trainer import _GVMTrainer

__all__ = [
    "BatchRollouts",
    "ProbeAheadSchedule",
    "RolloutSchedule",
    "SequentialSchedule",
    "UniformSchedule",
    "deal",
    "resolve_probe_ahead",
    "schedule_for",
]


@dataclass
class BatchRollouts:
    """One generation batch's plan and rollouts: its probes (None: no probe round), its allocated rows (None: none
    were allocated) and the seconds of each stage that produced them."""

    allocation: BatchAllocation
    probes: Rollout | None
    allocated: Rollout | None
    timings: dict[str, float] = field(default_factory=dict)
    allocated_accepted: list[int] = field(default_factory=list)


def deal(sizes: list[int], num_processes: int) -> list[list[int]]:
    """Each process's prompt slots for the allocated rows: the n_i rows of each prompt dealt round-robin over the
    processes, padding rows (slot -1) keeping every process's count equal."""
    plan = [i for i, size in enumerate(sizes) for _ in range(size)]
    per_process = -(-len(plan) // num_processes)
    dealt = [plan[rank::num_processes] for rank in range(num_processes)]
    return [share + [-1] * (per_process - len(share)) for share in dealt]


class RolloutSchedule:
    """Draws the rollouts of one generation batch; :meth:`rollouts` is the whole of it."""

    def __init__(self, trainer: _GVMTrainer) -> None:
        self.trainer = trainer
        self.args = trainer.args
        self.rule = AllocationRule.from_config(trainer.args)
        self.num_prompts = trainer.args.num_prompts_per_generation

    def rollouts(self, prompts: list[dict], keys: list[int], all_prompts: list[dict]) -> BatchRollouts:
        """`prompts`: this process's distinct prompts; `keys`/`all_prompts`: every process's, in order."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget anything drawn ahead (a resumed run starts afresh)."""

    # -- the steps the schedules share ---------------------------------------------------------------------------

    def _probe_slots(self) -> torch.Tensor:
        """Prompt slot of each probe row: process-major, N′ consecutive rows per prompt."""
        return torch.arange(self.num_prompts).repeat_interleave(self.args.gvm_num_probes)

    def _count(self, rollout: Rollout | None) -> None:
        """Completions generated over the run, by phase (padding rows not counted)."""
        if rollout is not None:
            key = "probe_completions" if rollout.phase == "probe" else "budget_completions"
            self.trainer.gvm_state.rollout_totals[key] += int((rollout.prompts >= 0).sum())

    def _probe_and_plan(self, prompts: list[dict], keys: list[int]) -> BatchRollouts:
        """A probe round for `prompts` (N′ completions each), then its estimates and plan."""
        timings: dict[str, float] = {}
        with self.trainer.stage_timer.stage("probe", timings):
            probes = self.trainer._generate_rollout(
                [row for row in prompts for _ in range(self.args.gvm_num_probes)],
                group_size=self.args.gvm_num_probes,
                prompts=self._probe_slots(),
                phase="probe",
            )
        self._count(probes)
        return self._plan(keys, probes, timings)

    def _plan(
        self, keys: list[int], probes: Rollout, timings: dict[str, float], sampling_logps: bool = False
    ) -> BatchRollouts:
        """p_i and G_i from the probes (gradient-norm pass over the accepted ones), then n_i (Theorem 3).

        `sampling_logps`: the pass also attaches the old log-probabilities of the probes that train (one forward
        for both, timed as `grad_norms`); only where the rule needs the norms."""
        accepted = self.trainer._accepted(probes)
        norms = torch.zeros(len(accepted))
        if self.rule.needs_grad_norms:
            with self.trainer.stage_timer.stage("grad_norms", timings):
                if sampling_logps:
                    norms = self.trainer._probe_grad_norms(probes, accepted, sampling_logps=True)
                else:
                    norms = self.trainer._probe_grad_norms(probes, accepted)
        with self.trainer.stage_timer.stage("allocate", timings):
            measured = accepted & (norms > 0)
            per_prompt = partial(per_prompt_sums, slots=probes.prompts, num_prompts=self.num_prompts)
            evidence = PromptEvidence(
                keys=keys,
                trials=[float(self.args.gvm_num_probes)] * self.num_prompts,
                accepted=per_prompt(accepted).tolist(),
                norm_sums=per_prompt(norms * measured).tolist(),
                norm_counts=per_prompt(measured).tolist(),
            )
            allocation = plan_allocation(evidence, self.rule, self.trainer.gvm_state.prompt_history, probes.step)
        if allocation.fallback and not any(evidence.accepted):
            self.trainer._warn_no_accepted_probe()
        return BatchRollouts(allocation, probes, None, timings)

    def _record_visit(self, batch: BatchRollouts) -> BatchRollouts:
        """Count each prompt's accepted allocated rows and fold the visit into the per-prompt history (before the
        next batch is planned, which reads it)."""
        allocated = batch.allocated
        accepted = (
            per_prompt_sums(self.trainer._accepted(allocated), allocated.prompts, self.num_prompts)
            if allocated is not None
            else torch.zeros(self.num_prompts)
        )
        batch.allocated_accepted = [int(a) for a in accepted]
        history = self.trainer.gvm_state.prompt_history
        if history is not None and batch.allocation.num_probes:
            history.record(visit_evidence(batch.allocation, batch.allocated_accepted))
        return batch

    def _allocated_rows(self, allocation: BatchAllocation, all_prompts: list[dict]) -> tuple[list[dict], torch.Tensor]:
        """This process's allocated rows, and every process's row slots (process-major)."""
        dealt = deal(allocation.sizes, self.trainer.accelerator.num_processes)
        rows = [all_prompts[max(slot, 0)] for slot in dealt[self.trainer.accelerator.process_index]]
        return rows, torch.tensor([slot for share in dealt for slot in share], dtype=torch.long)


class UniformSchedule(RolloutSchedule):
    """No probes: one round of N′ + N/m completions per prompt, grouped per prompt as TRL groups them."""

    def rollouts(self, prompts, keys, all_prompts):
        group = self.args.gvm_uniform_group_size
        timings: dict[str, float] = {}
        with self.trainer.stage_timer.stage("phase2", timings):
            rollout = self.trainer._generate_rollout(
                [row for row in prompts for _ in range(group)],
                group_size=group,
                prompts=torch.arange(self.num_prompts).repeat_interleave(group),
                phase="allocated",
            )
        self._count(rollout)
        accepted = per_prompt_sums(self.trainer._accepted(rollout), rollout.prompts, self.num_prompts)
        batch = BatchRollouts(uniform_record(keys, group, accepted.tolist()), None, rollout, timings)
        return self._record_visit(batch)


class SequentialSchedule(RolloutSchedule):
    """The paper's protocol: probe, measure and plan, then generate the allocated rows."""

    def rollouts(self, prompts, keys, all_prompts):
        batch = self._probe_and_plan(prompts, keys)
        with self.trainer.stage_timer.stage("phase2", batch.timings):
            rows, slots = self._allocated_rows(batch.allocation, all_prompts)
            if len(slots):
                batch.allocated = self.trainer._generate_rollout(rows, group_size=1, prompts=slots, phase="allocated")
                self._count(batch.allocated)
        return self._record_visit(batch)


class ProbeAheadSchedule(RolloutSchedule):
    """This batch's allocated rows and the next batch's probes in one generation call (module docstring)."""

    def __init__(self, trainer: _GVMTrainer) -> None:
        super().__init__(trainer)
        self.pending: BatchRollouts | None = None

    def reset(self) -> None:
        self.pending = None

    def rollouts(self, prompts, keys, all_prompts):
        batch = self.pending
        if batch is None or batch.allocation.prompt_keys != keys:
            batch = self._probe_and_plan(prompts, keys)
        upcoming, upcoming_keys = [], []
        if not self.trainer._is_last_generation_batch():
            upcoming, upcoming_keys = self.trainer._upcoming_prompts(keys)
        if self.trainer.accelerator.num_processes > 1:  # every process probes ahead, or none does
            upcoming = upcoming if all(gather_object([bool(upcoming)])) else []
        with self.trainer.stage_timer.stage("phase2", batch.timings):
            batch.allocated, next_probes, fold = self._generate_allocated_and_probes(batch, all_prompts, upcoming)
        self._record_visit(batch)
        self.pending = None if next_probes is None else self._plan(upcoming_keys, next_probes, {}, fold)
        return batch

    def _folds_logps(self, probes: Rollout) -> bool:
        """Whether the probes' gradient-norm pass, right after their generation and under the same weights, also
        gives the reused probes' old log-probabilities (one forward for both instead of two)."""
        return self.args.gvm_reuse_probes and self.rule.needs_grad_norms and self.trainer._folds_sampling_logps(probes)

    def _generate_allocated_and_probes(
        self, batch: BatchRollouts, all_prompts: list[dict], upcoming: list[dict]
    ) -> tuple[Rollout | None, Rollout | None, bool]:
        """The allocated completions of `batch` and the N′ probes of each `upcoming` prompt, in one call; and
        whether the probes' gradient-norm pass is to attach their old log-probabilities (else they have them)."""
        num_processes = self.trainer.accelerator.num_processes
        rows, allocated_slots = self._allocated_rows(batch.allocation, all_prompts)
        probe_rows = [row for row in upcoming for _ in range(self.args.gvm_num_probes)]
        if not rows and not probe_rows:
            return None, None, False
        probe_slots = self._probe_slots() if probe_rows else torch.empty(0, dtype=torch.long)
        # Each process generates its allocated rows, then its probe rows; global rows stay process-major.
        slots = torch.cat([allocated_slots.view(num_processes, -1), probe_slots.view(num_processes, -1)], dim=1)
        rollout = self.trainer._generate_rollout(
            rows + probe_rows, group_size=1, prompts=slots.flatten(), phase="round"
        )
        allocated = rollout.part(slice(0, len(rows)), "allocated") if rows else None
        probes = rollout.part(slice(len(rows), None), "probe") if probe_rows else None
        self._count(allocated)
        self._count(probes)
        fold = probes is not None and self._folds_logps(probes)
        if probes is not None and self.args.gvm_reuse_probes and not fold:
            with self.trainer.stage_timer.stage("probe_logps", batch.timings):
                self.trainer._attach_sampling_logps(probes)
        return allocated, probes, fold


def resolve_probe_ahead(args, iterable: bool) -> bool:
    """Whether the config's schedule probes ahead (`gvm_probe_ahead=None`: where the dataset allows it)."""
    if args.gvm_allocation == "uniform":
        return False
    if args.gvm_probe_ahead and iterable:
        raise NotImplementedError(
            "gvm_probe_ahead=True needs a map-style training dataset (datasets.Dataset), whose sampler can look "
            "one generation batch ahead; convert the iterable dataset, or leave gvm_probe_ahead unset (then an "
            "iterable dataset runs the sequential schedule)."
        )
    return not iterable if args.gvm_probe_ahead is None else args.gvm_probe_ahead


def schedule_for(trainer: _GVMTrainer, probe_ahead: bool) -> RolloutSchedule:
    """The schedule the config asks for."""
    if trainer.args.gvm_allocation == "uniform":
        return UniformSchedule(trainer)
    return ProbeAheadSchedule(trainer) if probe_ahead else SequentialSchedule(trainer)
