"""The TRL code this package mirrors has not changed since the mirror was written (see `gvm_trl.trl_compat`)."""

from __future__ import annotations

import pytest

import gvm_trl.trainer  # noqa: F401  (registers the trainer's mirrors)
from gvm_trl.trl_compat import MIRRORS, source_hash


def test_every_mirror_is_registered():
    overrides = {mirror.override for mirror in MIRRORS.values()}
    assert {
        "gvm_trl.rollout.GenerationBatchSampler",
        "gvm_trl.batching.build_micro_batches",
        "gvm_trl.trainer._GVMTrainer._prepare_inputs",
        "gvm_trl.trainer._GVMTrainer._generate",
        "gvm_trl.trainer._GVMTrainer.compute_loss",
        "gvm_trl.measurement.old_logps",
        "gvm_trl.measurement.grad_norms_and_old_logps",
        "gvm_trl.trl_compat.generation_timed_as_step",
        "gvm_trl.trl_compat.skip_micro_step",
        "gvm_trl.trl_compat.is_sequence_level",
        "gvm_trl.trl_compat.append_metrics",
        "gvm_trl.trl_compat.resize_completion_logs",
        "gvm_trl.trl_compat.log_training_rows",
        "gvm_trl.trl_compat.log_sampling_metrics",
        "gvm_trl.trl_compat.captured_call_logs",
    } <= overrides


@pytest.mark.parametrize("name", sorted(MIRRORS))
def test_mirrored_trl_source_is_unchanged(name):
    mirror = MIRRORS[name]
    assert source_hash(mirror.resolve()) == mirror.sha256, (
        f"TRL's {mirror.target} changed since trl 1.16.0 (lines {mirror.lines}); {mirror.override} mirrors it "
        f"({mirror.why}): re-read both, update the override, then its hash."
    )


def test_a_changed_source_is_caught(monkeypatch):
    """The hash reads the installed source: an edited function no longer matches."""
    import inspect

    mirror = next(iter(MIRRORS.values()))
    original = inspect.getsource(mirror.resolve())
    monkeypatch.setattr(inspect, "getsource", lambda obj: original + "\n# changed\n")
    assert source_hash(mirror.resolve()) != mirror.sha256
