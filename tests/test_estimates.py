"""Tests for gvm_trl.estimates: per-prompt history of accept rates and gradient norms across visits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gvm_trl.estimates import PromptEvidence, PromptHistory, optimistic_rates


def evidence(keys, trials, accepted, norm_sums, norm_counts):
    return PromptEvidence(list(keys), list(trials), list(accepted), list(norm_sums), list(norm_counts))


def test_first_visit_is_the_probe_estimate():
    history = PromptHistory(decay=0.5)
    rates, norms = history.estimates(evidence([3, 7], [4, 4], [1, 0], [6.0, 0.0], [1, 0]))
    assert rates == [0.25, 0.0] and norms == [6.0, 0.0]
    assert len(history) == 0  # estimates never change the history


def test_decayed_counts_by_hand():
    history = PromptHistory(decay=0.5)
    history.record(evidence([3], [12], [3], [10.0], [2]))  # probes + phase 2 of the first visit
    history.record(evidence([3], [4], [0], [0.0], [0]))  # second visit: nothing accepted
    # Now: trials 0.5*12 + 4 = 10, accepted 1.5, norm sum 5, count 1.
    rates, norms = history.estimates(evidence([3], [4], [2], [8.0], [2]))
    assert rates == [pytest.approx((0.5 * 1.5 + 2) / (0.5 * 10 + 4))]
    assert norms == [pytest.approx((0.5 * 5 + 8) / (0.5 * 1 + 2))]


def test_rare_prompt_is_told_apart_from_a_never_solved_one():
    history = PromptHistory(decay=1.0)
    history.record(evidence([1, 2], [8, 8], [1, 0], [4.0, 0.0], [1, 0]))
    rates, norms = history.estimates(evidence([1, 2], [4, 4], [0, 0], [0.0, 0.0], [0, 0]))
    assert rates[0] == pytest.approx(1 / 12) and norms[0] == 4.0  # its past success keeps it in the allocation
    assert rates[1] == 0.0 and norms[1] == 0.0


def test_state_round_trips_through_json_and_checks_the_decay():
    history = PromptHistory(decay=0.8)
    history.record(evidence([5, 11], [4, 6], [2, 1], [3.0, 1.5], [2, 1]))
    state = json.loads(json.dumps(history.state_dict()))
    restored = PromptHistory(decay=0.8)
    restored.load_state_dict(state)
    probe = evidence([5, 11, 2], [4, 4, 4], [1, 1, 1], [1.0, 1.0, 1.0], [1, 1, 1])
    assert restored.estimates(probe) == history.estimates(probe)
    with pytest.raises(ValueError, match="gvm_history_decay"):
        PromptHistory(decay=0.5).load_state_dict(state)


@pytest.mark.parametrize("decay", [0.0, -0.1, 1.5])
def test_decay_must_lie_in_the_unit_interval(decay):
    with pytest.raises(ValueError, match="decay"):
        PromptHistory(decay=decay)


def test_evidence_needs_one_entry_per_prompt():
    with pytest.raises(ValueError, match="one entry per prompt"):
        evidence([1, 2], [4], [1, 1], [0.0, 0.0], [0, 0])


# -- the posterior-uncertainty floor ------------------------------------------------------------------------------------


def beta_cdf_by_integration(x: float, b: float) -> float:
    """P(p ≤ x) for p ~ Beta(1, b), by integrating the density b (1 − p)^(b − 1) numerically (independent of the
    closed form the package uses)."""
    grid = np.linspace(0.0, x, 20001)
    density = b * (1.0 - grid) ** (b - 1.0)
    return float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(grid)))


def test_accepted_prompts_keep_their_estimate_and_the_others_get_the_posterior_median():
    rates = optimistic_rates([2, 0, 0, 0.5], [8, 4, 0, 2.5])
    assert rates[0] == 0.25 and rates[3] == 0.2
    assert rates[1] == pytest.approx(1 - 0.5 ** (1 / 5))  # Beta(1, 5) after 4 failed probes: median 0.129
    assert rates[2] == pytest.approx(0.5)  # no evidence at all: the uniform prior's median


@pytest.mark.parametrize(("trials", "quantile", "prior_failures"), [(4, 0.5, 1.0), (12.5, 0.9, 1.0), (2, 0.2, 3.0)])
def test_quantile_matches_the_posterior_cdf(trials, quantile, prior_failures):
    (rate,) = optimistic_rates([0], [trials], quantile=quantile, prior_failures=prior_failures)
    assert beta_cdf_by_integration(rate, prior_failures + trials) == pytest.approx(quantile, abs=1e-6)


def test_more_failures_lower_the_floor_and_a_higher_quantile_raises_it():
    assert optimistic_rates([0, 0, 0], [2, 8, 32]) == sorted(optimistic_rates([0, 0, 0], [2, 8, 32]), reverse=True)
    assert optimistic_rates([0], [4], quantile=0.9)[0] > optimistic_rates([0], [4], quantile=0.5)[0]


def test_thompson_draws_are_reproducible_and_follow_the_posterior():
    trials = [4.0] * 4000
    draws = optimistic_rates([0] * 4000, trials, rule="thompson", seed=7)
    assert draws == optimistic_rates(np.zeros(4000), torch.tensor(trials), rule="thompson", seed=7)
    assert draws != optimistic_rates([0] * 4000, trials, rule="thompson", seed=8)
    # Beta(1, 5): mean 1/6, P(p ≤ 0.129) = 0.5; 4000 draws: standard errors 0.0022 and 0.008
    assert np.mean(draws) == pytest.approx(1 / 6, abs=0.01)
    assert np.mean(np.array(draws) <= 1 - 0.5 ** (1 / 5)) == pytest.approx(0.5, abs=0.03)
    # one uniform per prompt in index order: a prompt's draw does not depend on the others' counts
    mixed = optimistic_rates([0, 3, 0], [4, 4, 4], rule="thompson", seed=7)
    assert mixed[0] == draws[0] and mixed[2] == draws[2] and mixed[1] == 0.75


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accepted": [1, 5], "trials": [4, 4]}, "exceeds trials"),
        ({"accepted": [1], "trials": [4, 4]}, "lengths differ"),
        ({"accepted": [-1], "trials": [4]}, "accepted"),
        ({"accepted": [0], "trials": [math.nan]}, "trials"),
        ({"accepted": [True], "trials": [4]}, "accepted"),
        ({"accepted": 3, "trials": [4]}, "accepted"),
        ({"rule": "ucb"}, "rule must be"),
        ({"quantile": 1.0}, "quantile"),
        ({"quantile": 0.0}, "quantile"),
        ({"prior_failures": 0.0}, "prior_failures"),
        ({"rule": "thompson"}, "integer seed"),
        ({"rule": "thompson", "seed": 1.5}, "integer seed"),
    ],
)
def test_optimistic_rates_rejects_bad_input(kwargs, message):
    arguments = {"accepted": [0, 1], "trials": [4, 4], **kwargs}
    with pytest.raises(ValueError, match=message):
        optimistic_rates(**arguments)
