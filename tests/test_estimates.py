"""Tests for gvm_trl.estimates: per-prompt history of accept rates and gradient norms across visits."""

from __future__ import annotations

import json

import pytest

from gvm_trl.estimates import PromptEvidence, PromptHistory


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
