"""With GVM switched off the trainers are `trl.GRPOTrainer`, to the number.

`gvm_allocation="uniform"` has no probe round: one generation round of N′ + B completions per prompt, grouped as TRL
groups them. With `gvm_weighting="none"` and N′ + B = `num_generations`, the same seed must give the same prompts,
the same completions, the same losses and the same trained weights as `trl.GRPOTrainer` itself.
"""

from __future__ import annotations

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from gvm_trl import GVMGRPOConfig, GVMGRPOTrainer

from conftest import make_tiny_llama
from test_trainer import config, prompt_dataset

GROUP = 4


def graded(prompts, completions, **kwargs):
    """Continuous rewards that differ within each group (what most GRPO reward functions return)."""
    return [(sum(map(ord, c[0]["content"])) % 7) / 6 + 0.1 * len(c[0]["content"]) for c in completions]


def recording(trainer_cls):
    """`trainer_cls` recording the prompts and completions of every generation call (TRL's `_generate`) in
    `self.calls`."""

    class Recording(trainer_cls):
        def _generate(self, prompts):
            output = super()._generate(prompts)
            self.calls.append(([p[-1]["content"] for p in prompts], output[1]))
            return output

    return Recording


def train(trainer_cls, config_cls, tmp_path, tokenizer, **options):
    args = config(config_cls, tmp_path, max_steps=3, **options)
    trainer = recording(trainer_cls)(
        model=make_tiny_llama(tokenizer),
        reward_funcs=graded,
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.calls = []
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert any(not torch.equal(a, b) for a, b in zip(initial, trainer.model.parameters())), "nothing was trained"
    return trainer, trainer.calls, losses


CASES = {
    "one-step-per-generation": dict(per_device_train_batch_size=8),
    "steps-per-generation-2": dict(per_device_train_batch_size=4, steps_per_generation=2),
    "accumulation-spans-generation": dict(per_device_train_batch_size=4, steps_per_generation=2, gradient_accumulation_steps=2),
    "misaligned": dict(per_device_train_batch_size=4, steps_per_generation=4, gradient_accumulation_steps=2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_uniform_unweighted_gvm_grpo_is_trl_grpo(case, loss_type, tmp_path, char_tokenizer):
    options = dict(CASES[case], num_generations=GROUP, loss_type=loss_type)
    plain, plain_calls, plain_losses = train(GRPOTrainer, GRPOConfig, tmp_path / "trl", char_tokenizer, **options)
    gvm, gvm_calls, gvm_losses = train(
        GVMGRPOTrainer, GVMGRPOConfig, tmp_path / "gvm", char_tokenizer,
        gvm_allocation="uniform", gvm_weighting="none", gvm_num_probes=1, gvm_budget_per_prompt=GROUP - 1, **options,
    )
    assert gvm_calls == plain_calls  # the same prompts, in the same order, and the same completions
    assert gvm_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-7)
    for (name, ours), theirs in zip(gvm.model.named_parameters(), plain.model.parameters()):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), name
    assert gvm.state.global_step == plain.state.global_step == 3


@pytest.mark.parametrize("loss_type", ["bnpo", "dr_grpo", "cispo", "sapo", "luspo", "vespo"])
def test_every_trl_loss_type_matches(loss_type, tmp_path, char_tokenizer):
    options = dict(per_device_train_batch_size=8, num_generations=GROUP, loss_type=loss_type)
    if loss_type == "luspo":
        options["importance_sampling_level"] = "sequence"
    plain, _, plain_losses = train(GRPOTrainer, GRPOConfig, tmp_path / "trl", char_tokenizer, **options)
    gvm, _, gvm_losses = train(
        GVMGRPOTrainer, GVMGRPOConfig, tmp_path / "gvm", char_tokenizer,
        gvm_allocation="uniform", gvm_weighting="none", gvm_num_probes=GROUP, gvm_budget_per_prompt=0, **options,
    )
    assert gvm_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-7)
    for ours, theirs in zip(gvm.model.parameters(), plain.model.parameters()):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_entropy_bonus_matches(tmp_path, char_tokenizer):
    options = dict(per_device_train_batch_size=8, num_generations=GROUP, entropy_coef=0.05)
    plain, _, plain_losses = train(GRPOTrainer, GRPOConfig, tmp_path / "trl", char_tokenizer, **options)
    gvm, _, gvm_losses = train(
        GVMGRPOTrainer, GVMGRPOConfig, tmp_path / "gvm", char_tokenizer,
        gvm_allocation="uniform", gvm_weighting="none", gvm_num_probes=2, gvm_budget_per_prompt=2, **options,
    )
    assert gvm_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-7)
    for ours, theirs in zip(gvm.model.parameters(), plain.model.parameters()):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
