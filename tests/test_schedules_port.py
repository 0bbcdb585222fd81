"""The schedules on their own, against the model-free port of `gvm_trl.testing`: which rounds they generate, what
they plan from, what they ask the port for (no trainer, no model)."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
import torch

from gvm_trl.estimates import PromptEvidence, PromptHistory
from gvm_trl.metrics import StageTimer
from gvm_trl.planner import AllocationRule, plan_allocation
from gvm_trl.allocation import reinforce_ada_finished, reinforce_ada_group
from gvm_trl.schedules import ProbeAheadSchedule, ReinforceAdaSchedule, ScheduleSettings, SequentialSchedule, UniformSchedule
from gvm_trl.schedules import build_schedule
from gvm_trl.testing import FakeRolloutPort

RATES = [0.0, 0.3, 0.7, 1.0]
NORMS = [1.0, 2.0, 0.5, 3.0]


def batches(count: int, rates=RATES) -> list[list[dict]]:
    m = len(rates)
    return [[{"key": b * m + i, "rate": rate, "norm": NORMS[i % len(NORMS)]} for i, rate in enumerate(rates)]
            for b in range(count)]


def schedule(cls, port, policy="gvm", reused=4, history=None, budget=16):
    rule = AllocationRule(budget=budget, num_probes=4, policy=policy, reused_probes=reused)
    timer = StageTimer(defaultdict(float))
    return cls(port, ScheduleSettings(rule, num_prompts=4), timer, history)


def run(sched, runs: list[list[dict]]):
    out = []
    for batch in runs:
        out.append(sched.rollouts(batch, [row["key"] for row in batch], batch))
    return out


def hand_evidence(batch, probes) -> PromptEvidence:
    """Per prompt, counted by hand from the probe rows: 4 trials, accepted rows, their norms."""
    accepted, norm_sums = Counter(), Counter()
    for slot, reward in zip(probes.prompts.tolist(), probes.rewards.tolist()):
        if reward == 1.0:
            accepted[slot] += 1
            norm_sums[slot] += NORMS[slot]
    m = len(batch)
    return PromptEvidence([row["key"] for row in batch], [4.0] * m, [float(accepted[i]) for i in range(m)],
                          [norm_sums[i] for i in range(m)], [float(accepted[i]) for i in range(m)])


def test_sequential_probes_plans_from_the_probes_then_generates_the_plan():
    port = FakeRolloutPort()
    sched = schedule(SequentialSchedule, port)
    (batch,) = run(sched, batches(1))
    assert port.rounds == [("probe", 16), ("allocated", 16)]
    expected = plan_allocation(hand_evidence(batches(1)[0], batch.probes), sched.settings.rule, None, 0)
    assert batch.allocation.sizes == expected.sizes and sum(expected.sizes) == 16
    assert batch.allocation.sizes[0] == 0  # never accepted: Theorem 3 gives it nothing
    assert Counter(batch.allocated.prompts.tolist()) == {i: n for i, n in enumerate(expected.sizes) if n}
    assert batch.allocated_accepted == [int(batch.allocated.accepted[batch.allocated.prompts == i].sum())
                                        for i in range(4)]
    assert sched.timer.totals["probe_completions"] == sched.timer.totals["budget_completions"] == 16
    assert port.norm_passes == [False] and port.logps_passes == 0


def test_sequential_folds_each_visit_into_the_history_before_the_next_plan():
    history, port = PromptHistory(0.5), FakeRolloutPort()
    sched = schedule(SequentialSchedule, port, history=history)
    first, second = run(sched, [batches(1)[0], batches(1)[0]])  # the same prompts twice
    visit = hand_evidence(batches(1)[0], first.probes)
    for i in range(4):
        trials = 4 + first.allocation.sizes[i]
        accepted = visit.accepted[i] + first.allocated_accepted[i]
        now = hand_evidence(batches(1)[0], second.probes)
        rate = (0.5 * accepted + now.accepted[i]) / (0.5 * trials + 4)
        assert second.allocation.accept_rates[i] == pytest.approx(rate)


@pytest.mark.parametrize("folds", [True, False])
def test_probe_ahead_draws_the_next_probes_with_this_batchs_rows(folds):
    """One probe round for the first batch, then one round per batch; the riding probes get their old
    log-probabilities from the gradient-norm pass where the port says it folds, else from a pass of their own."""
    port = FakeRolloutPort(batches(3), folds=folds)
    sched = schedule(ProbeAheadSchedule, port)
    out = run(sched, batches(3))
    assert port.rounds == [("probe", 16), ("round", 32), ("round", 32), ("round", 16)]
    assert [sum(b.allocation.sizes) for b in out] == [16, 16, 16]
    assert port.norm_passes == [False, folds, folds]
    assert port.logps_passes == (0 if folds else 2)
    assert all("old_per_token_logps" in b.probes.batch for b in out[1:])
    assert sched.pending is None  # the last batch probed nothing ahead
    assert sched.timer.totals["probe_completions"] == 48 and sched.timer.totals["budget_completions"] == 48


def test_probe_ahead_reprobes_a_batch_it_did_not_probe():
    port = FakeRolloutPort(batches(3))
    sched = schedule(ProbeAheadSchedule, port)
    run(sched, batches(3)[:1])
    sched.reset()  # as a resumed run does
    run(sched, batches(3)[1:2])
    assert [phase for phase, _ in port.rounds] == ["probe", "round", "probe", "round"]


def test_history_only_policies_run_no_gradient_norm_pass_but_still_attach_old_log_probs():
    port = FakeRolloutPort(batches(3))
    run(schedule(ProbeAheadSchedule, port, policy="dynamic"), batches(3))
    assert port.norm_passes == [] and port.logps_passes == 2


def test_probes_not_reused_need_no_old_log_probs():
    port = FakeRolloutPort(batches(3))
    run(schedule(ProbeAheadSchedule, port, reused=0), batches(3))
    assert port.norm_passes == [False, False, False] and port.logps_passes == 0


def test_uniform_draws_one_round_and_records_its_acceptance():
    port = FakeRolloutPort()
    sched = schedule(UniformSchedule, port, policy="uniform")
    (batch,) = run(sched, batches(1))
    assert port.rounds == [("allocated", 32)] and batch.probes is None
    assert batch.allocation.sizes == [8] * 4
    rewards = batch.allocated.rewards.view(4, 8)
    assert batch.allocation.accept_rates == (rewards.sum(1) / 8).tolist()
    assert sched.timer.totals["budget_completions"] == 32 and sched.timer.totals["probe_completions"] == 0


def test_no_accepted_probe_falls_back_to_the_uniform_split_and_warns():
    port = FakeRolloutPort()
    (batch,) = run(schedule(SequentialSchedule, port), batches(1, rates=[0.0] * 4))
    assert batch.allocation.fallback and batch.allocation.sizes == [4] * 4
    assert port.warnings == 1


def test_settings_and_schedule_from_a_config(tmp_path):
    from gvm_trl import GVMGRPOConfig

    args = GVMGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, bf16=False,
                         use_cpu=True, report_to="none", gvm_budget_per_prompt=6)
    settings = ScheduleSettings.from_config(args)
    assert (settings.num_prompts, settings.num_probes, settings.rule.budget) == (2, 4, 12)
    assert settings.uniform_group_size == args.gvm_reused_probes + 6 == 10
    port, timer = FakeRolloutPort(), StageTimer(defaultdict(float))
    assert isinstance(build_schedule(port, settings, timer, None, probe_ahead=True), ProbeAheadSchedule)
    assert isinstance(build_schedule(port, settings, timer, None, probe_ahead=False), SequentialSchedule)
    uniform = ScheduleSettings(AllocationRule(budget=12, num_probes=4, policy="uniform"), 2)
    assert isinstance(build_schedule(port, uniform, timer, None, probe_ahead=True), UniformSchedule)


def test_the_fake_port_accepts_at_its_rates():
    port = FakeRolloutPort()
    rows = [{"key": 0, "rate": 0.25}] * 4000
    rollout = port.generate_rollout(rows, 1, torch.zeros(4000, dtype=torch.long), "probe")
    assert rollout.accepted.float().mean().item() == pytest.approx(0.25, abs=0.03)


def ada_schedule(port, exit_rule="balanced"):
    rule = AllocationRule(budget=16, num_probes=4, policy="reinforce-ada", ada_exit=exit_rule)
    return ReinforceAdaSchedule(port, ScheduleSettings(rule, num_prompts=4), StageTimer(defaultdict(float)))


@pytest.mark.parametrize("exit_rule", ["balanced", "positive"])
def test_reinforce_ada_samples_in_rounds_until_each_prompt_exits_then_trains_a_fixed_group(exit_rule):
    """Rates 0, 0.3, 0.7, 1: each round draws 8 of every prompt its exit rule has not finished (replayed by hand from
    the rows), at most 4 rounds; each prompt trains on the group `reinforce_ada_group` picks from its drawn rows."""
    port = FakeRolloutPort()
    (batch,) = run(ada_schedule(port, exit_rule), batches(1))
    accepted, rejected = [0] * 4, [0] * 4
    for index, rollout in enumerate(batch.rounds):
        expected = [0 if reinforce_ada_finished(a, r, group_size=4, exit_rule=exit_rule) else 8
                    for a, r in zip(accepted, rejected)]
        assert Counter(rollout.prompts.tolist()) == {i: n for i, n in enumerate(expected) if n}
        for slot, ok in zip(rollout.prompts.tolist(), rollout.accepted.tolist()):
            accepted[slot], rejected[slot] = accepted[slot] + ok, rejected[slot] + (not ok)
    assert port.rounds == [("allocated", len(r.prompts)) for r in batch.rounds] and len(batch.rounds) <= 4
    assert batch.generation_rounds == len(batch.rounds)
    assert batch.allocation.sizes == [a + r for a, r in zip(accepted, rejected)]
    assert batch.allocated_accepted == accepted
    assert batch.allocation.sizes[0] == 32  # never accepted: drawn in every round
    prompts = torch.cat([r.prompts for r in batch.rounds])
    outcomes = torch.cat([r.accepted for r in batch.rounds])
    trains = torch.cat([r.trains for r in batch.rounds])
    for slot in range(4):
        rows = (prompts == slot).nonzero().flatten()
        chosen = reinforce_ada_group(outcomes[rows].tolist(), group_size=4)
        assert trains[rows].nonzero().flatten().tolist() == chosen and len(chosen) == 4
    assert port.norm_passes == [] and port.logps_passes == 0 and port.warnings == 0


def test_reinforce_ada_stops_drawing_once_every_prompt_exits():
    port = FakeRolloutPort()
    (batch,) = run(ada_schedule(port, "positive"), batches(1, rates=[1.0] * 4))
    assert len(batch.rounds) == 1 and batch.allocation.sizes == [8] * 4
