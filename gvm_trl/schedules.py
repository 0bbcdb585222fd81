"""The rollout schedules of a generation batch: which completions are drawn, in which generation calls.

- :class:`UniformSchedule` (``gvm_allocation="uniform"``): no probes, one round of N′ + N/m completions per prompt
  (with ``gvm_weighting="none"``, exactly `trl.GRPOTrainer`'s round).
- :class:`SequentialSchedule`: the paper's protocol (Algorithm 2): a probe round, the estimates and the plan, then the
  allocated completions.
- :class:`ReinforceAdaSchedule` (``gvm_allocation="reinforce-ada"``): Reinforce-Ada's rounds, sampling each prompt
  until it can fill a balanced fixed-size update group (or a cap), no probes and no plan.
- :class:`ProbeAheadSchedule`: one generation round per batch: this batch's allocated completions and the *next*
  batch's probes in the same call, under the same weights (as SPEED, arXiv 2506.09016, hides its screening round).
  It owns the probed batch waiting for its allocated round; the first batch of a run (or after resuming) gets a
  probe round of its own, and the last batch has no successor to probe.

A schedule reaches its trainer only through a :class:`RolloutPort` (the trainer is one; `gvm_trl.testing` has a
model-free one for tests) and is handed everything else as plain values: :class:`ScheduleSettings`, the stage timer
and the prompt history. Planning is the pure :func:`~gvm_trl.planner.plan_allocation` on the evidence of
:func:`~gvm_trl.planner.probe_evidence`.

Probing ahead with reused probes, the probes train a generation batch after they were drawn, so they need their
old log-probabilities; their gradient-norm pass runs right after their generation under the same weights, so where
the rule needs norms and the port says the pass can also give them (:meth:`RolloutPort.folds_old_logps`), one
forward gives both (stage ``grad_norms``; ``probe_logps`` then stays 0). Otherwise (history-only policies, probes not
reused, TRL computing them itself, dropout) :meth:`RolloutPort.attach_old_logps` runs its own forward (stage
``probe_logps``, inside ``phase2``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from .allocation import reinforce_ada_group, reinforce_ada_round
from .estimates import PromptHistory
from .metrics import StageTimer
from .planner import AllocationRule, BatchAllocation, per_prompt_sums, plan_allocation, probe_evidence, uniform_record
from .planner import visit_evidence
from .rollout import Rollout

__all__ = [
    "BatchRollouts",
    "ProbeAheadSchedule",
    "ReinforceAdaSchedule",
    "RolloutPort",
    "RolloutSchedule",
    "ScheduleSettings",
    "SequentialSchedule",
    "UniformSchedule",
    "build_schedule",
    "deal",
]


class RolloutPort(Protocol):
    """What a schedule asks of the trainer it serves. Every method is collective: all processes call it together."""

    def generate_rollout(self, rows: list[dict], group_size: int, prompts: torch.Tensor, phase: str) -> Rollout:
        """Generate and score this process's `rows` (`group_size` consecutive rows per prompt) in one call;
        `prompts` holds every process's rows' prompt slots, process-major (-1: a padding row)."""

    def probe_grad_norms(self, probes: Rollout, *, with_old_logps: bool = False) -> torch.Tensor:
        """‖∇ ln P(y|x)‖ of the accepted probes, over all processes (0 for the others); `with_old_logps`: the same
        pass attaches the old log-probabilities of the probes that train (only where :meth:`folds_old_logps`)."""

    def folds_old_logps(self, probes: Rollout) -> bool:
        """Whether the gradient-norm pass over `probes` can also give their old log-probabilities, and costs less
        than two passes."""

    def attach_old_logps(self, probes: Rollout) -> None:
        """Attach the log-probabilities of the probes that train under the weights that drew them
        (``old_per_token_logps``), for rows trained a generation batch after they were drawn."""

    def upcoming_prompts(self, keys: list[int]) -> tuple[list[dict], list[int]]:
        """This process's share of the generation batch after the one of `keys`, and every process's keys of it;
        ([], []) on every process when any has none (the last batch of the run)."""

    def warn_no_accepted_probe(self) -> None:
        """Tell the user (once) that no probe of a batch reached the acceptance threshold."""


@dataclass(frozen=True)
class ScheduleSettings:
    """The plain values a schedule reads: the allocation rule (budget, probes, policy), m, and this process's place."""

    rule: AllocationRule
    num_prompts: int
    rank: int = 0
    num_processes: int = 1

    @classmethod
    def from_config(cls, args: Any, rank: int = 0, num_processes: int = 1) -> ScheduleSettings:
        return cls(AllocationRule.from_config(args), args.num_prompts_per_generation, rank, num_processes)

    @property
    def num_probes(self) -> int:
        return self.rule.num_probes

    @property
    def reuses_probes(self) -> bool:
        return self.rule.reused_probes > 0

    @property
    def uniform_group_size(self) -> int:
        """Completions per prompt of the uniform round: the probes it would have trained on, plus the budget."""
        return self.rule.reused_probes + self.rule.budget // self.num_prompts


@dataclass
class BatchRollouts:
    """One generation batch's plan and rollouts: its probes (None: no probe round), its allocated rows (None: none
    were allocated), every round of a multi-round policy (Reinforce-Ada), the seconds of each stage that produced
    them and the generation calls they took."""

    allocation: BatchAllocation
    probes: Rollout | None
    allocated: Rollout | None
    timings: dict[str, float] = field(default_factory=dict)
    allocated_accepted: list[int] = field(default_factory=list)
    rounds: list[Rollout] = field(default_factory=list)
    generation_rounds: int = 0

    def parts(self, reuse_probes: bool) -> list[Rollout]:
        """The rollouts whose rows enter the update: every round of a multi-round policy; else the probes (when
        they are reused) and the allocated rows."""
        if self.rounds:
            return list(self.rounds)
        return [p for p in (self.probes if reuse_probes else None, self.allocated) if p is not None]


def deal(sizes: list[int], num_processes: int) -> list[list[int]]:
    """Each process's prompt slots for the allocated rows: the n_i rows of each prompt dealt round-robin over the
    processes, padding rows (slot -1) keeping every process's count equal."""
    plan = [i for i, size in enumerate(sizes) for _ in range(size)]
    per_process = -(-len(plan) // num_processes)
    dealt = [plan[rank::num_processes] for rank in range(num_processes)]
    return [share + [-1] * (per_process - len(share)) for share in dealt]


class RolloutSchedule:
    """Draws the rollouts of one generation batch; :meth:`rollouts` is the whole of it."""

    def __init__(
        self, port: RolloutPort, settings: ScheduleSettings, timer: StageTimer, history: PromptHistory | None = None
    ) -> None:
        self.port, self.settings, self.timer, self.history = port, settings, timer, history

    def rollouts(self, prompts: list[dict], keys: list[int], all_prompts: list[dict]) -> BatchRollouts:
        """`prompts`: this process's distinct prompts; `keys`/`all_prompts`: every process's, in order."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget anything drawn ahead (a resumed run starts afresh)."""

    # -- the steps of Algorithm 2 --------------------------------------------------------------------------------

    def _probe_and_plan(self, prompts: list[dict], keys: list[int]) -> BatchRollouts:
        """Lines 3-5: a probe round for `prompts` (N′ completions each, scored), then the estimates and the plan."""
        timings: dict[str, float] = {}
        num_probes = self.settings.num_probes
        with self.timer.stage("probe", timings):
            probes = self.port.generate_rollout(
                [row for row in prompts for _ in range(num_probes)], num_probes, self._probe_slots(), "probe"
            )
        self._count(probes)
        return BatchRollouts(self._plan(keys, probes, timings), probes, None, timings, generation_rounds=1)

    def _plan(
        self, keys: list[int], probes: Rollout, timings: dict[str, float], with_old_logps: bool = False
    ) -> BatchAllocation:
        """Lines 4-5: p_i and G_i from the probes (the gradient-norm pass over the accepted ones, where the rule
        reads G_i), combined with the prompts' history, then n_i by the rule's policy (Theorem 3 for GVM)."""
        norms = None
        if self.settings.rule.needs_grad_norms:
            with self.timer.stage("grad_norms", timings):
                norms = self.port.probe_grad_norms(probes, with_old_logps=with_old_logps)
        with self.timer.stage("allocate", timings):
            evidence = probe_evidence(keys, probes.prompts, probes.accepted, norms, self.settings.num_probes)
            allocation = plan_allocation(evidence, self.settings.rule, self.history, probes.step)
        if allocation.fallback and not any(evidence.accepted):
            self.port.warn_no_accepted_probe()
        return allocation

    def _generate_allocated(self, sizes: list[int], all_prompts: list[dict]) -> Rollout | None:
        """Line 6: n_i = `sizes[i]` completions of prompt i, dealt over the processes, in one generation call (None
        when nothing was allocated)."""
        rows, slots = self._allocated_rows(sizes, all_prompts)
        if not len(slots):
            return None
        allocated = self.port.generate_rollout(rows, 1, slots, "allocated")
        self._count(allocated)
        return allocated

    def _record_visit(self, batch: BatchRollouts) -> BatchRollouts:
        """Count each prompt's accepted allocated rows and fold the visit into the per-prompt history (before the
        next batch is planned, which reads it)."""
        allocated, num_prompts = batch.allocated, self.settings.num_prompts
        accepted = (
            per_prompt_sums(allocated.accepted, allocated.prompts, num_prompts)
            if allocated is not None
            else torch.zeros(num_prompts)
        )
        batch.allocated_accepted = [int(a) for a in accepted]
        if self.history is not None and batch.allocation.num_probes:
            self.history.record(visit_evidence(batch.allocation, batch.allocated_accepted))
        return batch

    def _probe_slots(self) -> torch.Tensor:
        """Prompt slot of each probe row: process-major, N′ consecutive rows per prompt."""
        return torch.arange(self.settings.num_prompts).repeat_interleave(self.settings.num_probes)

    def _allocated_rows(self, sizes: list[int], all_prompts: list[dict]) -> tuple[list[dict], torch.Tensor]:
        """This process's allocated rows, and every process's row slots (process-major)."""
        dealt = deal(sizes, self.settings.num_processes)
        rows = [all_prompts[max(slot, 0)] for slot in dealt[self.settings.rank]]
        return rows, torch.tensor([slot for share in dealt for slot in share], dtype=torch.long)

    def _count(self, rollout: Rollout | None) -> None:
        """Completions generated over the run, by phase (padding rows not counted)."""
        if rollout is not None:
            key = "probe_completions" if rollout.phase == "probe" else "budget_completions"
            self.timer.totals[key] += int((rollout.prompts >= 0).sum())


class UniformSchedule(RolloutSchedule):
    """No probes: one round of N′ + N/m completions per prompt, grouped per prompt as TRL groups them."""

    def rollouts(self, prompts, keys, all_prompts):
        group, num_prompts = self.settings.uniform_group_size, self.settings.num_prompts
        timings: dict[str, float] = {}
        with self.timer.stage("phase2", timings):
            rollout = self.port.generate_rollout(
                [row for row in prompts for _ in range(group)],
                group,
                torch.arange(num_prompts).repeat_interleave(group),
                "allocated",
            )
        self._count(rollout)
        accepted = per_prompt_sums(rollout.accepted, rollout.prompts, num_prompts)
        batch = BatchRollouts(uniform_record(keys, group, accepted.tolist()), None, rollout, timings,
                              generation_rounds=1)
        return self._record_visit(batch)


class SequentialSchedule(RolloutSchedule):
    """The paper's protocol, Algorithm 2 of Yao et al. 2025, one generation batch at a time."""

    def rollouts(self, prompts, keys, all_prompts):
        # Lines 3-4: N′ probe completions per prompt, scored by the reward functions. Lines 4-5: accept rates p_i and
        # gradient norms G_i of the accepted probes (with the prompts' history), then n_i by Theorem 3, Σ n_i = N.
        batch = self._probe_and_plan(prompts, keys)
        # Line 6: n_i completions of prompt i.
        with self.timer.stage("phase2", batch.timings):
            batch.allocated = self._generate_allocated(batch.allocation.sizes, all_prompts)
        batch.generation_rounds += batch.allocated is not None
        # Lines 7-8, Lemma 1's weights and the update, are the trainer's (`gvm_trl.weighting`, TRL's loss).
        return self._record_visit(batch)


class ProbeAheadSchedule(RolloutSchedule):
    """This batch's allocated rows and the next batch's probes in one generation call (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pending: BatchRollouts | None = None

    def reset(self) -> None:
        self.pending = None

    def rollouts(self, prompts, keys, all_prompts):
        batch = self.pending
        if batch is None or batch.allocation.prompt_keys != keys:
            batch = self._probe_and_plan(prompts, keys)
        upcoming, upcoming_keys = self.port.upcoming_prompts(keys)
        with self.timer.stage("phase2", batch.timings):
            batch.allocated, next_probes, fold = self._generate_allocated_and_probes(batch, all_prompts, upcoming)
        batch.generation_rounds += batch.allocated is not None or next_probes is not None
        self._record_visit(batch)
        self.pending = None
        if next_probes is not None:
            timings: dict[str, float] = {}
            self.pending = BatchRollouts(self._plan(upcoming_keys, next_probes, timings, fold), next_probes, None,
                                         timings)
        return batch

    def _generate_allocated_and_probes(
        self, batch: BatchRollouts, all_prompts: list[dict], upcoming: list[dict]
    ) -> tuple[Rollout | None, Rollout | None, bool]:
        """The allocated completions of `batch` and the N′ probes of each `upcoming` prompt, in one call; and
        whether the probes' gradient-norm pass is to attach their old log-probabilities (else they have them)."""
        num_processes, num_probes = self.settings.num_processes, self.settings.num_probes
        rows, allocated_slots = self._allocated_rows(batch.allocation.sizes, all_prompts)
        probe_rows = [row for row in upcoming for _ in range(num_probes)]
        if not rows and not probe_rows:
            return None, None, False
        probe_slots = self._probe_slots() if probe_rows else torch.empty(0, dtype=torch.long)
        # Each process generates its allocated rows, then its probe rows; global rows stay process-major.
        slots = torch.cat([allocated_slots.view(num_processes, -1), probe_slots.view(num_processes, -1)], dim=1)
        rollout = self.port.generate_rollout(rows + probe_rows, 1, slots.flatten(), "round")
        allocated = rollout.part(slice(0, len(rows)), "allocated") if rows else None
        probes = rollout.part(slice(len(rows), None), "probe") if probe_rows else None
        self._count(allocated)
        self._count(probes)
        if probes is None or not self.settings.reuses_probes:
            return allocated, probes, False
        fold = self.settings.rule.needs_grad_norms and self.port.folds_old_logps(probes)
        if not fold:
            with self.timer.stage("probe_logps", batch.timings):
                self.port.attach_old_logps(probes)
        return allocated, probes, fold


class ReinforceAdaSchedule(RolloutSchedule):
    """Reinforce-Ada (Xiong et al. 2025, arXiv:2510.04996, Algorithm 1): rounds of `round_size` completions of every
    prompt its exit rule has not yet finished, at most `max_rounds`; each prompt then trains on a fixed-size group of
    its drawn rows (:func:`~gvm_trl.allocation.reinforce_ada_group`), while its advantage baseline reads every row
    drawn (the paper's global statistics: the rows outside the group stay in the batch with `trains` false). No probes
    and no plan: the policy's cost is its rounds (`gvm/generation_rounds`) and their completions."""

    def rollouts(self, prompts, keys, all_prompts):
        rule, num_prompts = self.settings.rule, self.settings.num_prompts
        accepted, drawn, rounds, timings = [0] * num_prompts, [0] * num_prompts, [], {}
        with self.timer.stage("phase2", timings):
            for index in range(rule.ada_max_rounds):
                sizes = reinforce_ada_round(
                    accepted, [d - a for d, a in zip(drawn, accepted)], index, round_size=rule.ada_round_size,
                    max_rounds=rule.ada_max_rounds, group_size=rule.ada_group_size, exit_rule=rule.ada_exit,
                )
                if not any(sizes):
                    break
                rollout = self._generate_allocated(sizes, all_prompts)
                rounds.append(rollout)
                drawn = [d + n for d, n in zip(drawn, sizes)]
                accepted = [a + int(c) for a, c in zip(accepted, per_prompt_sums(rollout.accepted, rollout.prompts,
                                                                                 num_prompts))]
        allocation = BatchAllocation(list(keys), sum(drawn), drawn, [a / d if d else 0.0 for a, d in
                                     zip(accepted, drawn)], None, 0, None)
        return BatchRollouts(allocation, None, None, timings, accepted, self._update_groups(rounds), len(rounds))

    def _update_groups(self, rounds: list[Rollout]) -> list[Rollout]:
        """The rounds with `trains` narrowed to each prompt's update group (its rows in draw order: round by
        round, then by global row)."""
        prompts = torch.cat([r.prompts for r in rounds]) if rounds else torch.zeros(0, dtype=torch.long)
        accepted = torch.cat([r.accepted for r in rounds]) if rounds else torch.zeros(0, dtype=torch.bool)
        selected = torch.zeros(len(prompts), dtype=torch.bool)
        for slot in range(self.settings.num_prompts):
            rows = (prompts == slot).nonzero().flatten()
            chosen = reinforce_ada_group(accepted[rows].tolist(), group_size=self.settings.rule.ada_group_size)
            selected[rows[chosen]] = True
        starts = [0, *itertools.accumulate(len(r.prompts) for r in rounds)]
        return [replace(r, trains=r.trains & selected[start : start + len(r.prompts)])
                for r, start in zip(rounds, starts)]


def build_schedule(
    port: RolloutPort,
    settings: ScheduleSettings,
    timer: StageTimer,
    history: PromptHistory | None,
    probe_ahead: bool,
) -> RolloutSchedule:
    """The schedule of the rule's policy: uniform, Reinforce-Ada's rounds, or a probing one run sequentially or
    probing ahead."""
    if settings.rule.policy == "uniform":
        return UniformSchedule(port, settings, timer, history)
    if settings.rule.policy == "reinforce-ada":
        return ReinforceAdaSchedule(port, settings, timer, history)
    return (ProbeAheadSchedule if probe_ahead else SequentialSchedule)(port, settings, timer, history)
