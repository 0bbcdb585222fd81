"""TRL's GRPO features, each through the GVM trainers (TRL's own tests, rewritten for local tiny models).

For each feature: with GVM switched off (uniform allocation, no weights, N′ + B = `num_generations`) the run equals
`trl.GRPOTrainer`'s — losses and trained weights — and with GVM on, both trainers train with it. Features that
cannot work with GVM are refused by name (the README's "Not supported" list).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import LlamaConfig, LlamaForSequenceClassification, Qwen3MoeConfig, Qwen3MoeForCausalLM
from trl import GRPOConfig, GRPOTrainer

from gvm_trl import GVMGRPOConfig, GVMGRPOTrainer, GVMRAFTConfig, GVMRAFTTrainer

from conftest import make_tiny_llama
from test_trainer import config, prompt_dataset

GROUP = 4
GVM_OFF = {"gvm_allocation": "uniform", "gvm_weighting": "none", "gvm_num_probes": 2, "gvm_budget_per_prompt": 2}


def text(completion) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


def length_reward(completions, **kwargs):
    return [len(text(c)) / 10 for c in completions]


def parity_of_codes(completions, **kwargs):
    return [float(sum(map(ord, text(c))) % 2) for c in completions]


def sometimes_none(completions, **kwargs):
    return [None if i % 3 == 0 else float(len(text(c)) % 3) for i, c in enumerate(completions)]


async def async_reward(completions, **kwargs):
    await asyncio.sleep(0)
    return [float("a" in text(c)) for c in completions]


def answer_column_reward(completions, answer, **kwargs):
    """Reads an extra dataset column, as math rewards do."""
    return [float(a[-1] in text(c)) for c, a in zip(completions, answer)]


def state_reward(completions, trainer_state, **kwargs):
    return [float(trainer_state.global_step % 2) + len(text(c)) / 10 for c in completions]


def logging_reward(completions, log_extra, log_metric, **kwargs):
    log_extra("length", [len(text(c)) for c in completions])
    log_metric("custom/mean_length", sum(len(text(c)) for c in completions) / len(completions))
    return [len(text(c)) / 10 for c in completions]


def reward_model(tokenizer):
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForSequenceClassification(config)


# Each case: GRPOConfig fields, reward functions (names resolved below), and what else it needs.
CASES = {
    "conversational": {},
    "standard-prompt": {"dataset": "standard"},
    "multiple-rewards-weighted": {"rewards": [length_reward, parity_of_codes], "reward_weights": [0.5, 2.0]},
    "normalize-then-sum": {
        "rewards": [length_reward, parity_of_codes], "multi_objective_aggregation": "normalize_then_sum",
    },
    "reward-returns-none": {"rewards": [sometimes_none, length_reward]},
    "async-reward": {"rewards": [async_reward, length_reward]},
    "reward-model": {"rewards": ["reward_model"]},
    "extra-column": {"rewards": [answer_column_reward, length_reward]},
    "trainer-state": {"rewards": [state_reward]},
    "log-extra-and-metric": {"rewards": [logging_reward]},
    "scale-rewards-batch": {"scale_rewards": "batch"},
    "scale-rewards-none": {"scale_rewards": "none"},
    "multiple-iterations": {"num_iterations": 2},
    "beta-and-ref-model": {"beta": 0.1},
    "sync-ref-model": {"beta": 0.1, "sync_ref_model": True, "ref_model_sync_steps": 1},
    "no-bias-correction-kl": {"beta": 0.1, "use_bias_correction_kl": False},
    "off-policy-mask": {"off_policy_mask_threshold": 0.01, "steps_per_generation": 2, "per_device_train_batch_size": 4},
    "entropy-filter": {"top_entropy_quantile": 0.5},
    "static-entropy-bonus": {"entropy_coef": 0.05},
    "adaptive-entropy-bonus": {
        "use_adaptive_entropy": True, "entropy_coef": 0.02, "entropy_target": 10.0, "gradient_accumulation_steps": 2,
    },
    "delta-clipping": {"delta": 1.5},
    "sequence-importance-sampling": {"importance_sampling_level": "sequence", "steps_per_generation": 2,
                                     "per_device_train_batch_size": 4},
    "mask-truncated": {"mask_truncated_completions": True, "max_completion_length": 12},
    "pad-to-multiple-of": {"pad_to_multiple_of": 8},
    "cast-lm-head-to-fp32": {"cast_lm_head_to_fp32": True},
    "generation-kwargs": {"generation_kwargs": {"top_k": 5}},
    "chat-template-kwargs": {"chat_template_kwargs": {"unused": True}},
    "more-generations-than-batch": {"num_generations": 8, "per_device_train_batch_size": 4,
                                    "gradient_accumulation_steps": 2},
    "non-dividing-steps": {"per_device_train_batch_size": 4, "steps_per_generation": 3,
                           "gradient_accumulation_steps": 2},
}


def dataset_for(kind: str) -> Dataset:
    if kind == "standard":
        return Dataset.from_list([{"prompt": f"Q{i}: {i}+1?", "answer": str(i + 1)} for i in range(32)])
    return prompt_dataset()


def build(trainer_cls, config_cls, tmp_path, tokenizer, case: dict, model_dir, **gvm):
    case = dict(case)
    dataset = dataset_for(case.pop("dataset", "conversational"))
    rewards = [reward_model(tokenizer) if r == "reward_model" else r for r in case.pop("rewards", [length_reward])]
    options = {"per_device_train_batch_size": 8, "num_generations": GROUP, "max_steps": 2, **case, **gvm}
    args = config(config_cls, tmp_path, **options)
    models = [isinstance(r, torch.nn.Module) for r in rewards]
    return trainer_cls(
        model=str(model_dir) if options.get("beta") else make_tiny_llama(tokenizer),  # a reference model needs a path
        reward_funcs=rewards if len(rewards) > 1 else rewards[0],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_processing_classes=[tokenizer if is_model else None for is_model in models] if any(models) else None,
    )


def trained(trainer):
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(initial[n], p)]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return changed, losses


def run(trainer_cls, config_cls, path, tokenizer, *, model=None, dataset=None, max_steps=2, peft_config=None,
        **options):
    """Build a trainer on a tiny model and train it: (trainer, (changed parameter names, losses))."""
    args = config(config_cls, path, per_device_train_batch_size=8, num_generations=GROUP, max_steps=max_steps,
                  **options)
    trainer = trainer_cls(model=model() if model else make_tiny_llama(tokenizer), reward_funcs=length_reward,
                          args=args, train_dataset=dataset() if dataset else prompt_dataset(),
                          processing_class=tokenizer, peft_config=peft_config)
    return trainer, trained(trainer)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, char_tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(char_tokenizer).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_feature_matches_trl_with_gvm_off_and_trains_with_gvm_on(name, tmp_path, char_tokenizer, model_dir):
    case = CASES[name]
    group = case.get("num_generations", GROUP)
    # Build and train one after the other: construction seeds the RNG that generation then draws from.
    plain = build(GRPOTrainer, GRPOConfig, tmp_path / "trl", char_tokenizer, case, model_dir)
    plain_changed, plain_losses = trained(plain)
    off = build(
        GVMGRPOTrainer, GVMGRPOConfig, tmp_path / "off", char_tokenizer, case, model_dir,
        gvm_allocation="uniform", gvm_weighting="none", gvm_num_probes=group // 2, gvm_budget_per_prompt=group // 2,
    )
    off_changed, off_losses = trained(off)
    assert off_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-7)
    for (name_, ours), theirs in zip(off.model.named_parameters(), plain.model.parameters()):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), name_
    if name == "mask-truncated":
        return  # every completion of the tiny model is truncated: nothing trains, in TRL as here
    assert plain_changed and off_changed == plain_changed

    for trainer_cls, config_cls in ((GVMGRPOTrainer, GVMGRPOConfig), (GVMRAFTTrainer, GVMRAFTConfig)):
        if trainer_cls is GVMRAFTTrainer and case.get("multi_objective_aggregation") == "normalize_then_sum":
            continue  # refused for RAFT++ (tests/test_trainer.py)
        if trainer_cls is GVMRAFTTrainer and name == "reward-model":
            continue  # a random reward model's scores need not reach any threshold; RAFT++ then skips, as it should
        on = build(
            trainer_cls, config_cls, tmp_path / f"on-{trainer_cls.__name__}", char_tokenizer, case, model_dir,
            gvm_accept_threshold=0.5,
        )
        changed, losses = trained(on)
        assert changed and all(loss == loss for loss in losses), trainer_cls.__name__


def test_iterable_dataset_matches_trl_and_trains_with_gvm(tmp_path, char_tokenizer):
    rows = [{"prompt": [{"role": "user", "content": f"Q{i}: {i}+1?"}]} for i in range(32)]

    def stream():
        return IterableDataset.from_generator(lambda: iter(rows))

    options = dict(dataset=stream, max_steps=3)
    _, (_, plain_losses) = run(GRPOTrainer, GRPOConfig, tmp_path / "trl", char_tokenizer, **options)
    _, (_, off_losses) = run(GVMGRPOTrainer, GVMGRPOConfig, tmp_path / "off", char_tokenizer, **options, **GVM_OFF)
    assert off_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-7)
    trainer, (changed, _) = run(GVMGRPOTrainer, GVMGRPOConfig, tmp_path / "on", char_tokenizer, **options,
                                gvm_accept_threshold=0.5)
    assert changed and type(trainer.schedule).__name__ == "SequentialSchedule"  # an iterable dataset runs the sequential schedule
    assert trainer.prompt_history is None  # ... and keeps no history (it has no prompt index to key one by)
    with pytest.raises(NotImplementedError, match="gvm_history_decay keys each prompt"):
        run(GVMGRPOTrainer, GVMGRPOConfig, tmp_path / "refused-history", char_tokenizer, **options,
            gvm_history_decay=0.7)
    with pytest.raises(NotImplementedError, match="gvm_probe_ahead=True needs a map-style"):
        run(GVMGRPOTrainer, GVMGRPOConfig, tmp_path / "refused", char_tokenizer, **options, gvm_probe_ahead=True)


def tiny_moe(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
        num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.01,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen3MoeForCausalLM(config)


def test_moe_router_auxiliary_loss_matches_trl(tmp_path, char_tokenizer):
    moe = lambda: tiny_moe(char_tokenizer)  # noqa: E731
    plain, (_, plain_losses) = run(GRPOTrainer, GRPOConfig, tmp_path / "trl", char_tokenizer, model=moe)
    off, (_, off_losses) = run(GVMGRPOTrainer, GVMGRPOConfig, tmp_path / "off", char_tokenizer, model=moe, **GVM_OFF)
    assert plain.aux_loss_enabled and off.aux_loss_enabled
    assert off_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-7)
    assert "aux_loss" in [key for entry in off.state.log_history for key in entry]
    for ours, theirs in zip(off.model.parameters(), plain.model.parameters()):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # With GVM on, the fused experts and routers are measured by the exact generic rule, which the trainer says
    # at construction.
    with pytest.warns(UserWarning, match=r"gvm_grad_params='trainable': \d+ parameters .* generic rule"):
        on, (changed, _) = run(GVMGRPOTrainer, GVMGRPOConfig, tmp_path / "on", char_tokenizer, model=moe,
                               gvm_accept_threshold=0.5)
    assert any("experts" in name for name in changed)
    assert set(on.grad_norm_plan.parameters("generic")) >= {"model.layers.0.mlp.experts.gate_up_proj"}


def test_peft_adapters_train_as_in_trl(tmp_path, char_tokenizer):
    from peft import LoraConfig

    def lora():
        return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8)

    _, (_, plain_losses) = run(GRPOTrainer, GRPOConfig, tmp_path / "trl", char_tokenizer, peft_config=lora())
    _, (_, off_losses) = run(GVMGRPOTrainer, GVMGRPOConfig, tmp_path / "off", char_tokenizer, peft_config=lora(),
                             **GVM_OFF)
    assert off_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-7)
    _, (changed, _) = run(GVMGRPOTrainer, GVMGRPOConfig, tmp_path / "on", char_tokenizer, peft_config=lora(),
                          gvm_accept_threshold=0.5)
    assert changed and all("lora_" in name for name in changed)


def test_evaluation_runs_trls_own_loop(tmp_path, char_tokenizer):
    args = config(GVMGRPOConfig, tmp_path, per_device_train_batch_size=8, per_device_eval_batch_size=8,
                  num_generations=GROUP, max_steps=2, eval_strategy="steps", eval_steps=1, eval_on_start=True,
                  loss_type="grpo", gvm_accept_threshold=0.5)
    trainer = GVMGRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=length_reward, args=args,
                             train_dataset=prompt_dataset(), eval_dataset=prompt_dataset(8),
                             processing_class=char_tokenizer)
    trainer.train()
    assert sum("eval_loss" in entry for entry in trainer.state.log_history) == 3


def test_a_bad_gradient_selection_fails_at_construction_naming_the_setting(tmp_path, char_tokenizer):
    args = config(GVMGRPOConfig, tmp_path, per_device_train_batch_size=8, num_generations=GROUP,
                  gvm_grad_params="no_such_parameter")
    with pytest.raises(ValueError, match="gvm_grad_params='no_such_parameter' selects no parameter"):
        GVMGRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=length_reward, args=args,
                       train_dataset=prompt_dataset(), processing_class=char_tokenizer)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tools": [length_reward]}, "tools"),
        ({"rollout_func": lambda prompts, trainer: {}}, "rollout_func"),
    ],
)
def test_refused_features_name_themselves(kwargs, match, tmp_path, char_tokenizer):
    args = config(GVMGRPOConfig, tmp_path, per_device_train_batch_size=8, num_generations=GROUP)
    with pytest.raises(NotImplementedError, match=match):
        GVMGRPOTrainer(model=make_tiny_llama(char_tokenizer), reward_funcs=length_reward, args=args,
                       train_dataset=prompt_dataset(), processing_class=char_tokenizer, **kwargs)


@pytest.mark.parametrize("trainer_cls, config_cls", [(GVMGRPOTrainer, GVMGRPOConfig), (GVMRAFTTrainer, GVMRAFTConfig)])
def test_training_step_receives_trls_generation_batches(trainer_cls, config_cls, tmp_path, char_tokenizer):
    """TRL's layout reaches `training_step` unchanged: each prompt `num_generations` times, each generation batch
    `steps_per_generation * num_iterations` times (TRL's own test, on 17 prompts over 3 epochs)."""
    from unittest.mock import patch

    args = config(config_cls, tmp_path, per_device_train_batch_size=6, num_generations=4, steps_per_generation=4,
                  gradient_accumulation_steps=3, num_iterations=2, shuffle_dataset=False, num_train_epochs=3,
                  max_steps=-1, gvm_accept_threshold=0.5)
    trainer = trainer_cls(model=make_tiny_llama(char_tokenizer), reward_funcs=length_reward, args=args,
                          train_dataset=prompt_dataset(17), processing_class=char_tokenizer)
    with patch.object(trainer_cls, "training_step", wraps=trainer.training_step) as step:
        trainer.train()
    assert step.call_count == 3 * 2 * 2 * 4  # epochs × iterations × generation batches × steps_per_generation
    first = [row["prompt"][-1]["content"] for row in step.call_args_list[0].args[1]]
    assert first == [f"Q{i}: {i}+1?" for i in range(6) for _ in range(4)]
    for call in step.call_args_list[:8]:
        assert [row["prompt"][-1]["content"] for row in call.args[1]] == first
    second = [row["prompt"][-1]["content"] for row in step.call_args_list[8].args[1]]
    assert second == [f"Q{i}: {i}+1?" for i in range(6, 12) for _ in range(4)]
