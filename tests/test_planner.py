"""The pure steps of a generation batch, without a trainer: plan, deal, weight, report, locate prompts."""

from __future__ import annotations

import math

import pytest
import torch

from gvm_trl.allocation import allocate_budget, uniform_allocation
from gvm_trl.estimates import PromptEvidence, PromptHistory
from gvm_trl.metrics import AllocationLog, allocation_metrics, read_allocation_log
from gvm_trl.planner import AllocationRule, plan_allocation, uniform_record, visit_evidence
from gvm_trl.rollout import GenerationBatchSampler
from gvm_trl.schedules import deal
from gvm_trl.weighting import per_prompt_sums, prompt_weights, weight_scale


def evidence(accepted, norm_sums, probes=4, keys=None):
    keys = keys if keys is not None else list(range(len(accepted)))
    return PromptEvidence(keys, [float(probes)] * len(accepted), [float(a) for a in accepted],
                          [float(s) for s in norm_sums], [float(a) for a in accepted])


def test_plan_is_theorem_3_on_the_probe_estimates():
    rule = AllocationRule(budget=16, num_probes=4)
    plan = plan_allocation(evidence([1, 2, 4, 0], [3.0, 2.0, 4.0, 0.0]), rule, probe_step=7)
    rates, norms = [0.25, 0.5, 1.0, 0.0], [3.0, 1.0, 1.0, 0.0]
    assert plan.accept_rates == rates and plan.grad_norms == norms
    assert plan.sizes == allocate_budget(rates, norms, 16)
    assert (plan.probe_step, plan.fallback, plan.probes_accepted) == (7, False, [1, 2, 4, 0])


def test_plan_falls_back_to_the_uniform_split_when_no_probe_was_accepted():
    plan = plan_allocation(evidence([0, 0, 0], [0.0, 0.0, 0.0]), AllocationRule(budget=8, num_probes=4))
    assert plan.fallback and plan.sizes == uniform_allocation(3, 8) == [3, 3, 2]


def test_plan_reads_the_history_without_changing_it():
    history = PromptHistory(0.5)
    history.record(evidence([4, 0], [8.0, 0.0], probes=4, keys=[10, 11]))
    before = history.state_dict()
    plan = plan_allocation(evidence([0, 2], [0.0, 2.0], keys=[10, 11]), AllocationRule(budget=8, num_probes=4), history)
    assert history.state_dict() == before
    # p̃ = (λ·A + a) / (λ·T + t): (0.5·4 + 0) / (0.5·4 + 4) and (0 + 2) / (2 + 4); G̃ likewise.
    assert plan.accept_rates == pytest.approx([2 / 6, 2 / 6])
    assert plan.grad_norms == pytest.approx([(0.5 * 8.0) / 2.0, 2.0 / 2.0])


def test_visit_evidence_counts_probes_and_allocated_rows():
    plan = plan_allocation(evidence([1, 3], [1.0, 6.0]), AllocationRule(budget=6, num_probes=4))
    visit = visit_evidence(plan, allocated_accepted=[2, 1])
    assert visit.trials == [4.0 + plan.sizes[0], 4.0 + plan.sizes[1]]
    assert visit.accepted == [3.0, 4.0] and visit.norm_counts == [1.0, 3.0] and visit.norm_sums == [1.0, 6.0]


def test_uniform_record():
    record = uniform_record([5, 6], 4, [1.0, 4.0])
    assert (record.sizes, record.accept_rates, record.num_probes, record.budget) == ([4, 4], [0.25, 1.0], 0, 8)
    assert record.log_line(3, [1, 4])["prompts"][1] == {
        "index": 6, "accept_rate": 1.0, "grad_norm": None, "num_samples": 4, "num_accepted": 4, "probes_accepted": None
    }


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_deal_gives_every_row_once_and_equal_counts(processes):
    sizes = [3, 0, 5, 1]
    dealt = deal(sizes, processes)
    assert len({len(share) for share in dealt}) == 1
    slots = [slot for share in dealt for slot in share if slot >= 0]
    assert sorted(slots) == sorted(i for i, n in enumerate(sizes) for _ in range(n))
    assert sum(slot < 0 for share in dealt for slot in share) == len(dealt[0]) * processes - sum(sizes)


def test_prompt_weights_against_their_formulas():
    drawn = torch.tensor([8.0, 8.0, 4.0], dtype=torch.float64)
    accepted = torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64)
    assert prompt_weights("none", [0.5, 0.0, 1.0], drawn, accepted).tolist() == [1.0, 1.0, 1.0]
    assert prompt_weights("mean", [0.5, 0.0, 1.0], drawn, accepted).tolist() == [0.5, 1.0, 0.25]
    # lemma1: 1/(n p̂) with the planned p̂; where it is 0 the pooled max(|D|, 1)/n stands in.
    lemma1 = prompt_weights("lemma1", [0.5, 0.0, 1.0], drawn, accepted).tolist()
    assert lemma1 == pytest.approx([1 / (8 * 0.5), 1 / (8 * (1 / 8)), 1 / (4 * 1.0)])


def test_weight_scale_keeps_the_loss_scale():
    weights = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    tokens = torch.tensor([4.0, 1.0, 3.0], dtype=torch.float64)
    scale = weight_scale(weights, tokens, sequence_level=False)
    assert float((scale * weights * tokens).sum()) == pytest.approx(float(tokens.sum()))
    scale = weight_scale(weights, tokens, sequence_level=True)  # per row
    assert float((scale * weights).sum()) == pytest.approx(3.0)


def test_per_prompt_sums_skip_padding_rows():
    sums = per_prompt_sums(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1, -1, 1, 0]), 3)
    assert sums.tolist() == [4.0, 4.0, 0.0]


def test_allocation_metrics():
    plan = plan_allocation(evidence([1, 2, 0, 0], [2.0, 2.0, 0.0, 0.0]), AllocationRule(budget=8, num_probes=4))
    metrics = allocation_metrics(plan, {"probe": 1.5}, reused_probes=4, alpha=1e-3, beta=2.0)
    assert metrics["gvm/accept_rate"] == pytest.approx((0.25 + 0.5) / 4)
    assert metrics["gvm/budget_completions"] == 8.0 and metrics["gvm/probe_completions"] == 16.0
    assert metrics["gvm/prompts_zero_budget"] == float(plan.sizes.count(0))
    assert metrics["gvm/time_probe"] == 1.5 and math.isfinite(metrics["gvm/variance_bound_ratio"])


def test_allocation_log_drops_the_steps_a_resumed_run_redoes(tmp_path):
    log = AllocationLog(str(tmp_path))
    for step in range(5):
        log.append({"step": step, "prompts": []})
    log.start(resumed_step=3)
    assert [line["step"] for line in read_allocation_log(str(tmp_path))] == [0, 1, 2]
    log.append({"step": 3, "prompts": []})
    assert [line["step"] for line in read_allocation_log(log.path)] == [0, 1, 2, 3]
    assert AllocationLog(str(tmp_path / "none")).start(resumed_step=0) is None  # no log yet: nothing to drop


def test_allocation_log_torn_last_line_is_dropped_on_resume_with_a_warning(tmp_path):
    log = AllocationLog(str(tmp_path))
    for step in range(3):
        log.append({"step": step, "prompts": []})
    with open(log.path, "a") as handle:
        handle.write('{"step": 3, "pro')  # a kill mid-append
    with pytest.warns(UserWarning, match="last line is torn"):
        log.start(resumed_step=3)
    assert [line["step"] for line in read_allocation_log(log.path)] == [0, 1, 2]


def test_allocation_log_torn_line_before_the_last_is_an_error_naming_it(tmp_path):
    log = AllocationLog(str(tmp_path))
    log.append({"step": 0, "prompts": []})
    with open(log.path, "a") as handle:
        handle.write('{"step": 1, "pro\n{"step": 2, "prompts": []}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_allocation_log(log.path)


def test_a_fresh_run_keeps_an_earlier_runs_allocation_log_aside(tmp_path):
    log = AllocationLog(str(tmp_path))
    for run in range(2):
        log.append({"step": 0, "prompts": [], "run": run})
        with pytest.warns(UserWarning, match=r"gvm_allocations\.%d\.jsonl" % (run + 1)):
            archived = log.start(resumed_step=None)
        assert read_allocation_log(archived) == [{"step": 0, "prompts": [], "run": run}]
    assert not (tmp_path / "gvm_allocations.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gvm_allocations.1.jsonl", "gvm_allocations.2.jsonl"]


def test_sampler_locates_a_batch_by_its_rows():
    rows = [{"prompt": f"p{i}"} for i in range(12)]
    sampler = GenerationBatchSampler(rows, mini_repeat_count=2, batch_size=3, repeat_count=1, seed=0)
    order = list(sampler)[::2]
    batches = [order[i : i + 3] for i in range(0, 12, 3)]
    row_at = rows.__getitem__
    for batch in batches:
        assert sampler.locate([rows[i] for i in batch], row_at) == batch
    assert sampler.locate([rows[batches[0][0]], rows[batches[1][0]], rows[batches[2][0]]], row_at) is None
    with pytest.raises(RuntimeError, match="dataset indices"):
        sampler.indices_of([{"prompt": "unknown"}] * 3, row_at)
    rows_ahead, keys_ahead = sampler.upcoming(batches[0], rank=1, num_processes=3, row_at=row_at)
    assert keys_ahead == batches[1] and rows_ahead == [rows[batches[1][1]]]


def test_history_only_peers_plan_without_gradient_norms():
    from gvm_trl.allocation import dynamic_sampling_allocation, knapsack_allocation

    probes = evidence([0, 1, 2, 4], [0.0, 0.0, 0.0, 0.0])  # no norms measured: these policies need none
    dynamic = plan_allocation(probes, AllocationRule(budget=8, num_probes=4, policy="dynamic"))
    assert dynamic.sizes == dynamic_sampling_allocation([0, 0.25, 0.5, 1.0], 8) == [0, 4, 4, 0]
    assert dynamic.grad_norms is None and not dynamic.fallback
    knapsack = plan_allocation(probes, AllocationRule(budget=8, num_probes=4, policy="knapsack", reused_probes=4))
    groups = knapsack_allocation([0, 0.25, 0.5, 1.0], 8 + 16, min_samples=4)
    assert knapsack.sizes == [g - 4 for g in groups] and sum(knapsack.sizes) == 8
    assert knapsack.sizes[0] == knapsack.sizes[3] == 0
    solved = plan_allocation(evidence([4, 0], [0.0, 0.0]), AllocationRule(budget=6, num_probes=4, policy="dynamic"))
    assert solved.fallback and solved.sizes == [3, 3]  # nothing informative: the uniform split
    margin = AllocationRule(budget=6, num_probes=4, policy="dynamic", dynamic_epsilon=0.3)
    assert plan_allocation(evidence([1, 2], [0.0, 0.0]), margin).sizes == [0, 6]  # p = 0.25 ≤ ε
    with pytest.raises(ValueError, match="Unknown allocation policy"):
        plan_allocation(probes, AllocationRule(budget=8, num_probes=4, policy="bandit"))


def test_plan_falls_back_when_every_weight_underflows():
    """p = 5e-324 is positive, but Theorem 3's weight G·sqrt(p/α) underflows to 0: the budget is still spent."""
    plan = plan_allocation(PromptEvidence([0], [4.0], [5e-324 * 4], [1.0], [1.0]), AllocationRule(budget=4, num_probes=4))
    assert plan.fallback and plan.sizes == [4]


def test_constant_gradient_norms_are_theorem_3_on_the_rates_alone():
    rule = AllocationRule(budget=16, num_probes=4, grad_norms="constant")
    assert not rule.needs_grad_norms  # no gradient-norm pass
    plan = plan_allocation(evidence([1, 2, 4, 0], [0.0, 0.0, 0.0, 0.0]), rule)  # nothing measured
    assert plan.grad_norms == [1.0] * 4 and not plan.fallback
    assert plan.sizes == allocate_budget([0.25, 0.5, 1.0, 0.0], [1.0] * 4, 16)
    # n_i ∝ 1/sqrt(p + α/p^(β−1)) by hand (β = 2): the rarer prompt gets more, the unsolved one nothing
    weights = [1 / math.sqrt(p + 1e-3 / p) for p in (0.25, 0.5, 1.0)]
    assert plan.sizes[3] == 0 and plan.sizes[0] > plan.sizes[1] > plan.sizes[2]
    assert [n / 16 for n in plan.sizes[:3]] == pytest.approx([w / sum(weights) for w in weights], abs=1 / 16)


def test_rate_floor_gives_unaccepted_prompts_their_posterior_quantile_and_the_mean_norm():
    rule = AllocationRule(budget=12, num_probes=4, rate_floor_quantile=0.5)
    plan = plan_allocation(evidence([0, 2, 0], [0.0, 6.0, 0.0]), rule)
    median_after_4_failures = 1 - 0.5 ** (1 / 5)  # Beta(1, 1 + 4): F(x) = 1 − (1 − x)^5
    assert plan.accept_rates == pytest.approx([median_after_4_failures, 0.5, median_after_4_failures])
    assert median_after_4_failures == pytest.approx(0.1294, abs=1e-4)
    assert plan.grad_norms == [3.0, 3.0, 3.0]  # the measured prompt's G for the two never measured
    assert plan.sizes == allocate_budget(plan.accept_rates, [3.0] * 3, 12) and plan.sizes[0] > 0
    unfloored = plan_allocation(evidence([0, 2, 0], [0.0, 6.0, 0.0]), AllocationRule(budget=12, num_probes=4))
    assert unfloored.sizes == [0, 12, 0]  # what the floor is against: starvation


def test_rate_floor_counts_the_decayed_history_and_keeps_a_rare_prompts_own_estimate():
    history = PromptHistory(0.5)
    history.record(evidence([0, 1], [0.0, 4.0], probes=4, keys=[10, 11]))  # 11 was solved once before
    rule = AllocationRule(budget=8, num_probes=4, rate_floor_quantile=0.9)
    plan = plan_allocation(evidence([0, 0], [0.0, 0.0], keys=[10, 11]), rule, history)
    failures = 0.5 * 4 + 4  # decayed past tries plus this visit's probes, none accepted
    assert plan.accept_rates[0] == pytest.approx(1 - 0.1 ** (1 / (1 + failures)))
    assert plan.accept_rates[1] == pytest.approx(0.5 / 6)  # accepted before: its own p̃, no floor
    assert plan.grad_norms == pytest.approx([4.0, 4.0])  # its history's G̃, which fills the other's


def test_pooled_rates_by_hand():
    from gvm_trl.estimates import pooled_rates

    # m = 6/12; the plain rates 0, 1/2, 1 spread by 1/6, binomial noise 1/16: κ = (1/4)/(5/48) − 1 = 1.4
    assert pooled_rates([0, 2, 4], [4, 4, 4]) == pytest.approx([0.7 / 5.4, 2.7 / 5.4, 4.7 / 5.4])
    assert pooled_rates([1, 1], [4, 4]) == [0.25, 0.25]  # no spread beyond noise: everyone gets m
    assert pooled_rates([0, 0], [4, 4]) == [0.0, 0.0] and pooled_rates([4, 2], [4, 2]) == [1.0, 1.0]
    assert pooled_rates([0, 3], [0, 4]) == [0.0, 0.75]  # an unprobed prompt stays at 0
    with pytest.raises(ValueError, match="exceeds"):
        pooled_rates([5], [4])


def test_batch_prior_plans_theorem_3_on_the_pooled_rates():
    rule = AllocationRule(budget=12, num_probes=4, rate_prior="batch")
    plan = plan_allocation(evidence([0, 2, 4], [0.0, 6.0, 4.0]), rule)
    assert plan.accept_rates == pytest.approx([0.7 / 5.4, 2.7 / 5.4, 4.7 / 5.4])
    assert plan.grad_norms == [2.0, 3.0, 1.0]  # the unaccepted prompt takes the measured prompts' mean G
    assert plan.sizes == allocate_budget(plan.accept_rates, [2.0, 3.0, 1.0], 12) and plan.sizes[0] > 0
