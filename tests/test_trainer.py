"""End-to-end and unit tests of the GVM trainers on tiny random models (CPU, no Hub, no vLLM)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_llama
from datasets import Dataset
from trl import GRPOConfig

from gvm_trl import GVMGRPOConfig, GVMGRPOTrainer, GVMRAFTConfig, GVMRAFTTrainer
from gvm_trl.allocation import allocate_budget, lemma1_weights
from gvm_trl.metrics import read_allocation_log
from gvm_trl.state import STATE_FILE

NUM_PROMPTS = 8


def prompt_dataset(n=NUM_PROMPTS * 4):
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"Q{i}: {i}+1?"}], "answer": str(i + 1)} for i in range(n)]
    )


def prompt_id(prompt) -> int:
    return int(prompt[-1]["content"].split(":")[0][1:])


def graded_reward(prompts, completions, **kwargs):
    """Accept probability differs by prompt: prompts 0 mod 4 never, 1 mod 4 always, others ~half the time."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        i, text = prompt_id(prompt), completion[0]["content"]
        if i % 4 == 0:
            rewards.append(0.0)
        elif i % 4 == 1:
            rewards.append(1.0)
        else:
            rewards.append(float(sum(map(ord, text)) % 2))
    return rewards


def reject_all(completions, **kwargs):
    return [0.0] * len(completions)


def config(cls, tmp_path, **overrides):
    options = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        save_strategy="no",
        seed=0,
        beta=0.0,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return cls(**options)


def make_trainer(trainer_cls, config_cls, tmp_path, tokenizer, model=None, reward=graded_reward, dataset=None, **kw):
    peft_config = kw.pop("peft_config", None)
    args = config(config_cls, tmp_path, **kw)
    return trainer_cls(
        model=model if model is not None else make_tiny_llama(tokenizer),
        reward_funcs=reward,
        args=args,
        train_dataset=dataset if dataset is not None else prompt_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def read_allocations(trainer):
    return read_allocation_log(trainer.args.output_dir)


def last_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry][-1]


TRAINERS = [(GVMRAFTTrainer, GVMRAFTConfig), (GVMGRPOTrainer, GVMGRPOConfig)]


# -- end to end -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer_cls, config_cls", TRAINERS)
@pytest.mark.parametrize("allocation", ["gvm", "uniform"])
def test_trains_end_to_end_and_logs_gvm_metrics(trainer_cls, config_cls, allocation, tmp_path, char_tokenizer):
    trainer = make_trainer(trainer_cls, config_cls, tmp_path, char_tokenizer, gvm_allocation=allocation)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    logs = last_logs(trainer)
    expected = {
        "gvm/accept_rate",
        "gvm/samples_per_prompt_mean",
        "gvm/samples_per_prompt_min",
        "gvm/samples_per_prompt_max",
        "gvm/prompts_zero_budget",
        "gvm/probe_completions",
        "gvm/budget_completions",
        "gvm/uniform_fallback",
        "gvm/empty_batches",
        "gvm/time_phase2",
    }
    if allocation == "gvm":
        expected |= {"gvm/grad_norm", "gvm/variance_bound_ratio", "gvm/time_grad_norms", "gvm/time_allocate"}
        expected |= {"gvm/probe_age"}
    else:
        assert "gvm/time_grad_norms" not in logs and logs["gvm/probe_completions"] == 0  # no probe round
    assert expected <= set(logs)
    records = read_allocations(trainer)
    assert len(records) == 2
    assert all(sum(p["num_samples"] for p in record["prompts"]) == record["budget"] for record in records)
    if allocation == "uniform":  # one round of N′ + B = 8 completions per prompt
        assert all(record["budget"] == 2 * 8 and record["probe_step"] is None for record in records)
        assert all(p["num_samples"] == 8 for record in records for p in record["prompts"])
    else:
        assert all(record["budget"] == 2 * 4 for record in records)  # gvm_budget_per_prompt (4) × m (2)


def test_allocation_log_matches_allocate_budget(tmp_path, char_tokenizer):
    trainer = make_trainer(
        GVMRAFTTrainer, GVMRAFTConfig, tmp_path, char_tokenizer, per_device_train_batch_size=16, max_steps=3
    )
    trainer.train()
    for record in read_allocations(trainer):
        prompts = record["prompts"]
        assert len(prompts) == 4 and len({p["index"] for p in prompts}) == 4
        for p in prompts:
            if p["index"] % 4 == 0:
                assert p["accept_rate"] == 0.0 and p["num_samples"] == 0
            if p["index"] % 4 == 1:
                assert p["accept_rate"] == 1.0 and p["num_accepted"] == p["num_samples"]
        expected = allocate_budget(
            [p["accept_rate"] for p in prompts], [p["grad_norm"] for p in prompts], record["budget"]
        )
        assert [p["num_samples"] for p in prompts] == expected


def test_raft_with_nothing_accepted_skips_warns_once_and_counts_every_empty_batch(tmp_path, char_tokenizer):
    trainer = make_trainer(
        GVMRAFTTrainer, GVMRAFTConfig, tmp_path, char_tokenizer, reward=reject_all, max_steps=3, logging_steps=3
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.warns(UserWarning, match=r"gvm_accept_threshold=1.0 \(rewards seen so far range over \[0, 0\]\)"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert last_logs(trainer)["gvm/empty_batches"] == 3  # one log for three batches: the count, not an average
    assert last_logs(trainer)["gvm/uniform_fallback"] == 1.0
    # No probe was accepted, so the budget was spread uniformly: still nothing to train on.
    assert all(p["num_samples"] == 4 for record in read_allocations(trainer) for p in record["prompts"])


def test_raft_stops_after_too_many_empty_batches_and_names_the_fix(tmp_path, char_tokenizer):
    trainer = make_trainer(
        GVMRAFTTrainer, GVMRAFTConfig, tmp_path, char_tokenizer, reward=reject_all, max_steps=4,
        gvm_max_empty_batches=2, save_strategy="steps", save_steps=1,
    )
    with pytest.raises(RuntimeError, match=r"2 consecutive generation batches \(gvm_max_empty_batches=2\)"):
        trainer.train()
    assert (tmp_path / "out" / "checkpoint-1" / "trainer_state.json").exists()  # what was saved is kept


def test_grpo_never_skips_when_nothing_passes_the_threshold(tmp_path, char_tokenizer):
    """Continuous rewards below the threshold: GVM has nothing to allocate by, so the batch is split uniformly and
    trains as GRPO does, on the reward differences."""
    def below_threshold(completions, **kwargs):
        return [0.1 * (sum(map(ord, c[0]["content"])) % 5) for c in completions]

    trainer = make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer, reward=below_threshold)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.warns(UserWarning, match="split uniformly"):
        trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    logs = last_logs(trainer)
    assert logs["gvm/uniform_fallback"] == 1.0 and logs["gvm/empty_batches"] == 0
    assert all(p["num_samples"] == 4 for record in read_allocations(trainer) for p in record["prompts"])


def test_gradient_accumulation_and_steps_per_generation(tmp_path, char_tokenizer):
    trainer = make_trainer(
        GVMGRPOTrainer,
        GVMGRPOConfig,
        tmp_path,
        char_tokenizer,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        steps_per_generation=4,
        max_steps=4,
    )
    trainer.train()
    assert trainer.state.global_step == 4
    # Two optimizer steps per generation batch: old log-probs must be real, not detached copies.
    assert len(read_allocations(trainer)) == 2


def test_lora_measures_adapter_gradients(tmp_path, char_tokenizer):
    from peft import LoraConfig

    trainer = make_trainer(
        GVMRAFTTrainer,
        GVMRAFTConfig,
        tmp_path,
        char_tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8),
        beta=0.001,
    )
    trainer.train()
    assert "gvm/grad_norm" in last_logs(trainer)
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


@pytest.mark.parametrize(
    "levers", [{}, {"gvm_grad_norms": "constant", "gvm_rate_floor_quantile": 0.5, "gvm_history_decay": 0.5},
               {"gvm_rate_prior": "batch"}, {"gvm_allocation": "reinforce-ada", "gvm_weighting": "none"}],
    ids=["default", "constant-norms-rate-floor", "batch-prior", "reinforce-ada"],
)
def test_save_and_resume_mid_run(tmp_path, char_tokenizer, levers):
    model_dir = tmp_path / "model"
    make_tiny_llama(char_tokenizer).save_pretrained(model_dir)
    options = dict(save_strategy="steps", save_steps=2, max_steps=4, **levers)
    first = make_trainer(GVMRAFTTrainer, GVMRAFTConfig, tmp_path, char_tokenizer, model=str(model_dir), **options)
    first.train()
    full_run = read_allocations(first)
    assert [r["step"] for r in full_run] == [0, 1, 2, 3]

    (tmp_path / "out" / "checkpoint-4" / "trainer_state.json").unlink()  # as if the run died while saving it
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / STATE_FILE).read_text())
    resumed = make_trainer(GVMRAFTTrainer, GVMRAFTConfig, tmp_path, char_tokenizer, model=str(model_dir), **options)
    resumed.train(resume_from_checkpoint=True)  # the last complete checkpoint: checkpoint-2
    assert resumed.state.global_step == 4
    after_resume = read_allocations(resumed)
    assert [r["step"] for r in after_resume] == [0, 1, 2, 3]  # each step once: the redone steps replace theirs
    assert after_resume[:2] == full_run[:2]
    # The same prompts, in the same order, as the uninterrupted run's last two generation batches.
    assert [[p["index"] for p in r["prompts"]] for r in after_resume] == [
        [p["index"] for p in r["prompts"]] for r in full_run
    ]
    # The run's totals and reward range continue from the checkpoint's rather than restart at zero.
    totals = resumed.rollout_totals
    assert totals["budget_completions"] == first.rollout_totals["budget_completions"]
    if "gvm_allocation" not in levers:  # (Reinforce-Ada's completions per batch vary with what it draws)
        assert totals["budget_completions"] == 4 * first.args.gvm_budget
        assert saved["rollout_totals"]["budget_completions"] == 2 * first.args.gvm_budget
    for key, value in saved["rollout_totals"].items():
        assert totals[key] > value
    low, high = resumed.gvm_state.reward_range
    assert low <= saved["reward_range"][0] <= saved["reward_range"][1] <= high


def test_state_from_a_checkpoint_without_totals_still_loads(tmp_path):
    from gvm_trl.estimates import PromptHistory
    from gvm_trl.state import GVMState

    (tmp_path / STATE_FILE).write_text(json.dumps({  # written before the totals and reward range were saved
        "empty_batches": 2, "consecutive_empty": 1, "prompt_history": {"decay": 0.7, "prompts": {"3": [4, 1, 2, 1]}},
    }))
    (tmp_path / "trainer_state.json").write_text("{}")
    state = GVMState(prompt_history=PromptHistory(0.7))
    totals = state.rollout_totals
    state.load(str(tmp_path))
    assert (state.empty_batches, state.consecutive_empty, dict(state.rollout_totals)) == (2, 1, {})
    assert state.rollout_totals is totals  # the stage timer keeps adding to the same dict
    assert state.reward_range == [math.inf, -math.inf]
    assert state.prompt_history.state_dict()["prompts"] == {"3": [4.0, 1.0, 2.0, 1.0]}


def test_users_see_no_extra_keys(tmp_path, char_tokenizer):
    """The trainer finds each prompt's dataset index from its sampler: no column of its own reaches the rows that
    `training_step`, `_prepare_inputs` and reward functions receive."""
    seen_by_reward, seen_by_step = set(), set()

    def reward(prompts, completions, **kwargs):
        seen_by_reward.update(kwargs)
        return graded_reward(prompts, completions)

    trainer = make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer, reward=reward)
    step = trainer.training_step

    def recording_step(model, inputs, *args, **kwargs):
        seen_by_step.update(key for row in inputs for key in row)
        return step(model, inputs, *args, **kwargs)

    trainer.training_step = recording_step
    trainer.train()
    assert seen_by_step == {"prompt", "answer"}
    assert not any(key.startswith("gvm") for key in seen_by_reward) and "answer" in seen_by_reward
    # ... and the allocation log still names each prompt by its dataset index: the graded reward never accepts
    # prompts 0 mod 4 and always accepts prompts 1 mod 4, which the probes of the logged index show.
    records = read_allocations(trainer)
    assert len(records) == 2
    for p in (p for record in records for p in record["prompts"]):
        if p["index"] % 4 in (0, 1):
            assert p["probes_accepted"] == (4 if p["index"] % 4 == 1 else 0)


def test_resume_true_without_a_complete_checkpoint_names_the_fix(tmp_path, char_tokenizer):
    trainer = make_trainer(GVMRAFTTrainer, GVMRAFTConfig, tmp_path, char_tokenizer)
    (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)


def test_model_card_names_gvm(tmp_path, char_tokenizer):
    trainer = make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer)
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "GVM-GRPO" in card and "2505.02391" in card and "gvm_alpha" in card and "yao2025optimizing" in card


# -- one generation batch, inspected ------------------------------------------------------------------------------


def generation_batch(trainer, start=0):
    """One generation batch of the sequential schedule, built by hand from dataset rows."""
    keys = list(range(start, start + trainer.num_prompts_per_generation))
    rows = [trainer.train_dataset[i] for i in keys]
    trainer.model.train()
    return trainer.build_generation_batch(rows, keys)


def decoded_index(trainer, prompt_ids) -> int:
    return int(trainer.processing_class.decode(prompt_ids, skip_special_tokens=True).split(":")[0].lstrip("Q"))


@pytest.mark.parametrize("weighting", ["lemma1", "mean", "none"])
def test_row_weights_follow_gvm_weighting(weighting, tmp_path, char_tokenizer):
    trainer = make_trainer(
        GVMRAFTTrainer, GVMRAFTConfig, tmp_path, char_tokenizer, per_device_train_batch_size=16, gvm_weighting=weighting
    )
    batch = generation_batch(trainer)
    record = read_allocations(trainer)[-1]["prompts"]
    indices = [decoded_index(trainer, ids) for ids in batch["prompt_ids"]]
    rows_per_prompt = {index: indices.count(index) for index in set(indices)}
    by_index = {p["index"]: p for p in record}
    for index, count in rows_per_prompt.items():
        p = by_index[index]
        assert count == p["probes_accepted"] + p["num_accepted"]  # accepted probes + accepted allocated rows
    expected = {
        "lemma1": lambda p: lemma1_weights([p["num_samples"] + 4], [p["accept_rate"]])[0],
        "mean": lambda p: 1 / rows_per_prompt[p["index"]],
        "none": lambda p: 1.0,
    }[weighting]
    raw = torch.tensor([expected(by_index[index]) for index in indices], dtype=torch.float64)
    # The weights keep Lemma 1's ratios, rescaled so that their token-weighted mean is 1 (TRL's loss scale) ...
    tokens = batch["completion_mask"].sum(1).double()
    scale = tokens.sum() / (raw * tokens).sum()
    assert batch["gvm_weight"].double() == pytest.approx((raw * scale).tolist(), rel=1e-6)
    # ... and enter through the advantage: RAFT++'s advantage is the reward (1) times the row's weight.
    assert torch.allclose(batch["advantages"], batch["gvm_weight"])


def test_grpo_groups_include_probes_and_zero_variance_prompts_get_zero_advantage(tmp_path, char_tokenizer):
    trainer = make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer, per_device_train_batch_size=16)
    batch = generation_batch(trainer)
    record = {p["index"]: p for p in read_allocations(trainer)[-1]["prompts"]}
    indices = [decoded_index(trainer, ids) for ids in batch["prompt_ids"]]
    # Every row trains in GRPO: probes (4 per prompt) plus each prompt's phase-2 rows.
    assert len(indices) == sum(4 + p["num_samples"] for p in record.values())
    for index, advantage in zip(indices, batch["advantages"].tolist()):
        if index % 4 in (0, 1):  # p_i = 0 or p_i = 1: every reward in the group is equal
            assert advantage == 0.0
    assert record[1]["accept_rate"] == 1.0 and record[1]["num_samples"] > 0  # GRPO still samples p = 1 prompts


def test_prompt_with_zero_budget_generates_nothing(tmp_path, char_tokenizer):
    trainer = make_trainer(
        GVMRAFTTrainer, GVMRAFTConfig, tmp_path, char_tokenizer, per_device_train_batch_size=16, gvm_reuse_probes=False
    )
    batch = generation_batch(trainer)
    record = read_allocations(trainer)[-1]["prompts"]
    zero = [p["index"] for p in record if p["num_samples"] == 0]
    assert 0 in zero  # never accepted → weight 0 → no phase-2 rows
    indices = {decoded_index(trainer, ids) for ids in batch["prompt_ids"]}
    assert not indices & set(zero)


def test_no_rows_dropped_across_micro_steps(tmp_path, char_tokenizer):
    trainer = make_trainer(
        GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer, per_device_train_batch_size=4,
        steps_per_generation=3, gradient_accumulation_steps=3,
    )
    batch = generation_batch(trainer, start=0)
    chunks = trainer._build_micro_batches(batch)
    assert len(chunks) == 3
    assert sorted(len(chunk["advantages"]) for chunk in chunks) == sorted(
        len(rows) for rows in torch.tensor_split(torch.arange(len(batch["advantages"])), 3)
    )
    assert sorted(torch.cat([c["advantages"] for c in chunks]).tolist()) == sorted(batch["advantages"].tolist())
    # Every micro-step sees the generation batch's loss-token count, as TRL's token-level losses expect.
    tokens = batch["completion_mask"].sum()
    assert all(chunk["num_items_in_batch"] == tokens for chunk in chunks)


# -- the loss against an independent computation ---------------------------------------------------------------


def hand_built_batch(tokenizer, seed=0, rows=5):
    generator = torch.Generator().manual_seed(seed)
    prompt_len, completion_len = 4, 6
    prompt_ids = torch.randint(5, len(tokenizer), (rows, prompt_len), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0  # left padding
    completion_ids = torch.randint(5, len(tokenizer), (rows, completion_len), generator=generator)
    lengths = torch.tensor([6, 3, 5, 1, 4][:rows])
    completion_mask = (torch.arange(completion_len) < lengths.unsqueeze(1)).long()
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9][:rows]),
        "old_per_token_logps": -3 - torch.rand(rows, completion_len, generator=generator),
        "ref_per_token_logps": -3 - torch.rand(rows, completion_len, generator=generator),
        "num_items_in_batch": completion_mask.sum(),
    }


LOSS_TYPES = ["dapo", "bnpo", "grpo", "dr_grpo", "cispo", "sapo", "luspo", "vespo"]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_positive_weight_on_the_advantage_scales_trls_policy_loss(loss_type, tmp_path, char_tokenizer):
    """Why Lemma 1's weights can ride on the advantage: every TRL loss is positively homogeneous in it, so a row's
    loss with advantage ω·A is ω times its loss with A (TRL's own `_compute_loss`, one row at a time)."""
    trainer = make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer, loss_type=loss_type)
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model.train()
    batch = hand_built_batch(char_tokenizer)
    for row in range(5):
        one = {key: (value[row : row + 1] if value.dim() else value) for key, value in batch.items()}
        one["num_items_in_batch"] = one["completion_mask"].sum()
        loss = trainer._compute_loss(model, one)
        for weight in (0.25, 3.0):
            weighted = trainer._compute_loss(model, dict(one, advantages=one["advantages"] * weight))
            assert weighted.item() == pytest.approx(weight * loss.item(), rel=1e-5, abs=1e-7)


def test_dapo_loss_is_the_lemma1_weighted_token_mean(tmp_path, char_tokenizer):
    """Σ_r ω_r a_r / Σ_r τ_r (+ TRL's unweighted KL), computed by hand in float64, equals TRL's loss on ω·A."""
    model_dir = tmp_path / "model"
    make_tiny_llama(char_tokenizer).save_pretrained(model_dir)
    trainer = make_trainer(
        GVMRAFTTrainer, GVMRAFTConfig, tmp_path, char_tokenizer, model=str(model_dir), beta=0.04, epsilon=0.2,
        epsilon_high=0.28,
    )
    trainer.current_gradient_accumulation_steps = 1
    batch = hand_built_batch(char_tokenizer)
    weight = torch.tensor([0.25, 0.25, 1.0 / 6, 0.5, 2.0], dtype=torch.float64)
    model = trainer.model.train()
    loss = trainer._compute_loss(model, dict(batch, advantages=(batch["advantages"] * weight).float()))

    with torch.no_grad():
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        logits = model.double()(input_ids=ids, attention_mask=attention).logits[:, batch["prompt_ids"].size(1) - 1 : -1]
        logps = torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    model.float()
    mask = batch["completion_mask"].double()
    ratio = torch.exp(logps - batch["old_per_token_logps"].double())
    advantage = batch["advantages"].double().unsqueeze(1)
    policy = -torch.minimum(ratio * advantage, ratio.clamp(1 - 0.2, 1 + 0.28) * advantage)
    ref = batch["ref_per_token_logps"].double()
    kl = (torch.exp(ref - logps) - (ref - logps) - 1) * ratio  # TRL's use_bias_correction_kl (default on)
    expected = ((weight.unsqueeze(1) * policy + 0.04 * kl) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# -- advantages -------------------------------------------------------------------------------------------------


# -- configuration errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"gvm_alpha": 0.0}, "gvm_alpha"),
        ({"gvm_beta": 1.5}, "gvm_beta"),
        ({"gvm_num_probes": 0}, "gvm_num_probes"),
        ({"gvm_budget_per_prompt": -1}, "gvm_budget_per_prompt"),
        ({"gvm_weighting": "median"}, "gvm_weighting"),
        ({"gvm_allocation": "random"}, "gvm_allocation"),
        ({"gvm_max_samples": 0}, "gvm_max_samples"),
        ({"gvm_filter_threshold": 0.0}, "gvm_filter_threshold"),
        ({"gvm_budget_per_prompt": 0, "gvm_reuse_probes": False}, "gvm_budget_per_prompt"),
        ({"gvm_history_decay": -0.1}, "gvm_history_decay"),
        ({"gvm_history_decay": 1.5}, "gvm_history_decay"),
        ({"gvm_explore_samples": -1}, "gvm_explore_samples"),
        ({"gvm_max_empty_batches": 0}, "gvm_max_empty_batches"),
        ({"gvm_allocation": "uniform", "gvm_history_decay": 0.5}, "gvm_history_decay"),
        ({"gvm_allocation": "uniform", "gvm_explore_samples": 2}, "gvm_explore_samples"),
        ({"gvm_allocation": "uniform", "gvm_probe_ahead": True}, "gvm_probe_ahead"),
        ({"gvm_grad_norms": "zero"}, "gvm_grad_norms"),
        ({"gvm_allocation": "dynamic", "gvm_grad_norms": "constant"}, "gvm_grad_norms"),
        ({"gvm_rate_floor_quantile": 1.0}, "gvm_rate_floor_quantile"),
        ({"gvm_allocation": "uniform", "gvm_rate_floor_quantile": 0.5}, "gvm_rate_floor_quantile"),
        ({"gvm_rate_prior": "global"}, "gvm_rate_prior"),
        ({"gvm_allocation": "knapsack", "gvm_rate_prior": "batch"}, "gvm_rate_prior"),
        ({"gvm_rate_prior": "batch", "gvm_rate_floor_quantile": 0.5}, "gvm_rate_prior"),
    ],
)
def test_invalid_config_names_the_field(overrides, field, tmp_path):
    with pytest.raises(ValueError, match=field):
        config(GVMGRPOConfig, tmp_path, **overrides)


def test_defaults_follow_num_generations_and_the_paper(tmp_path):
    args = config(GVMRAFTConfig, tmp_path, num_generations=8, per_device_train_batch_size=8)
    assert args.gvm_num_probes == 8 and args.gvm_budget_per_prompt == 8
    assert args.gvm_alpha == 1e-3 and args.gvm_beta == 2.0
    assert GVMRAFTConfig.__dataclass_fields__["beta"].default == 0.001


def test_trainer_rejects_a_plain_grpo_config(tmp_path, char_tokenizer):
    with pytest.raises(TypeError, match="GVMGRPOConfig"):
        GVMGRPOTrainer(
            model=make_tiny_llama(char_tokenizer),
            reward_funcs=graded_reward,
            args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=False),
            train_dataset=prompt_dataset(),
            processing_class=char_tokenizer,
        )


def test_config_rejects_infeasible_floors(tmp_path):
    with pytest.raises(ValueError, match="gvm_min_samples"):
        config(GVMGRPOConfig, tmp_path, gvm_min_samples=5)


def test_raft_refuses_normalize_then_sum_and_says_why(tmp_path):
    with pytest.raises(ValueError, match="multi_objective_aggregation.*RAFT"):
        config(GVMRAFTConfig, tmp_path, multi_objective_aggregation="normalize_then_sum")
    assert config(GVMGRPOConfig, tmp_path, multi_objective_aggregation="normalize_then_sum")


def test_in_memory_model_with_kl_needs_a_path(tmp_path, char_tokenizer):
    with pytest.raises(ValueError, match="save_pretrained"):
        make_trainer(GVMRAFTTrainer, GVMRAFTConfig, tmp_path, char_tokenizer, beta=0.001)


def test_vllm_missing_gives_a_clear_error(tmp_path, char_tokenizer):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed in this environment")
    with pytest.raises(ImportError, match="(?i)vllm"):
        make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer, use_vllm=True)


def test_variance_bound_ratio_counts_reused_probes_and_stays_finite():
    from gvm_trl.allocation import variance_bound
    from gvm_trl.metrics import variance_bound_ratio

    p, g = [0.5, 0.5, 1.0, 0.0], [40.0, 2.0, 30.0, 0.0]
    sizes = allocate_budget(p, g, 8)
    assert sizes == [5, 0, 3, 0]
    expected = variance_bound(p, g, [7, 2, 5, 2], alpha=1e-3, beta=2.0) / variance_bound(
        p, g, [4, 4, 4, 4], alpha=1e-3, beta=2.0
    )
    assert variance_bound_ratio(p, g, sizes, 2, 1e-3, 2.0) == pytest.approx(expected)  # 2 reused probes each
    assert not math.isfinite(variance_bound_ratio(p, g, sizes, 0, 1e-3, 2.0))  # n_i = 0 with p, G > 0: not logged
