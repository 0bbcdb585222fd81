"""The passes over the probes on the trainer's accelerator: both run their forward in its autocast (issue 26, B10)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from gvm_trl.measurement import MeasurementContext, grad_norms, grad_norms_and_old_logps
from gvm_trl.testing import make_char_tokenizer, make_tiny_llama

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from measure_two_processes import probes  # noqa: E402


def cpu_accelerator(autocast):
    """What the passes read of an accelerator, on one CPU process with the given autocast."""
    return SimpleNamespace(autocast=autocast, device=torch.device("cpu"), process_index=0, num_processes=1,
                           unwrap_model=lambda model, **kwargs: model,
                           state=SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=None, distributed_type="NO"))


def test_the_separate_and_the_folded_pass_measure_under_the_same_autocast():
    """bf16 autocast over fp32 weights (the usual `bf16=True`): the separate pass and the fused one (which attaches
    old log-probabilities) give the same norms; measured without the autocast, as the separate pass was, they differ
    by bf16's rounding — the two schedules measured different norms."""
    model = make_tiny_llama(make_char_tokenizer())
    rollout = probes(0, 1)

    def context(autocast):
        return MeasurementContext(model, model, cpu_accelerator(autocast), 1.0, "all", None, 8, True, None, None)

    bf16 = context(lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    separate, (folded, _) = grad_norms(bf16, rollout), grad_norms_and_old_logps(bf16, rollout)
    torch.testing.assert_close(separate, folded, rtol=1e-5, atol=0)
    without = grad_norms(context(lambda: torch.autocast("cpu", enabled=False)), rollout)
    assert ((without - folded).abs() / folded).max() > 1e-4
