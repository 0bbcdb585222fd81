"""`gvm_trl.advantages` against TRL's own advantage computation, on equal groups where TRL's applies."""

from __future__ import annotations

import math

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from gvm_trl.advantages import grpo_advantages, group_normalized_advantages

from conftest import make_tiny_llama
from test_trainer import config, prompt_dataset

GROUP, PROMPTS = 4, 2


def trl_advantages(tmp_path, tokenizer, rewards_per_func, weights, **options) -> torch.Tensor:
    """TRL's `_generate_and_score_completions` on one generation batch whose rewards are `rewards_per_func`: each
    reward function returns its column, in row order (None where NaN: what TRL reads as unscored)."""

    def column(k):
        def reward(completions, **kw):
            return [None if math.isnan(v) else v for v in rewards_per_func[:, k].tolist()]

        reward.__name__ = f"reward_{k}"
        return reward

    args = config(GRPOConfig, tmp_path, per_device_train_batch_size=GROUP * PROMPTS, num_generations=GROUP,
                  reward_weights=weights, **options)
    trainer = GRPOTrainer(model=make_tiny_llama(tokenizer), reward_funcs=[column(k) for k in range(rewards_per_func.shape[1])],
                          args=args, train_dataset=prompt_dataset(), processing_class=tokenizer)
    rows = [trainer.train_dataset[i] for i in range(PROMPTS) for _ in range(GROUP)]
    trainer.model.train()
    return trainer._generate_and_score_completions(rows)["advantages"]


REWARDS = torch.tensor(
    [[1.0, 0.2], [0.0, 0.9], [0.5, math.nan], [1.0, 0.1], [0.3, 0.3], [0.3, 0.7], [math.nan, math.nan], [0.8, 0.0]]
)


@pytest.mark.parametrize(
    "aggregation, scale",
    [("sum_then_normalize", "group"), ("sum_then_normalize", "batch"), ("sum_then_normalize", "none"),
     ("normalize_then_sum", "group")],
)
def test_equal_groups_match_trl(aggregation, scale, tmp_path, char_tokenizer):
    weights = [0.7, 1.5]
    expected = trl_advantages(tmp_path, char_tokenizer, REWARDS, weights, scale_rewards=scale,
                              multi_objective_aggregation=aggregation)
    groups = torch.arange(PROMPTS).repeat_interleave(GROUP)
    ours = grpo_advantages(REWARDS, torch.tensor(weights), groups, PROMPTS, scale=scale, aggregation=aggregation)
    assert torch.allclose(ours, expected.cpu(), rtol=1e-5, atol=1e-6)
    assert ours[6] == 0  # every function left this row unscored


def test_ragged_groups_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, math.nan, 1.0, 0.5, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    advantages = group_normalized_advantages(rewards, groups, 3, "group")
    std0 = torch.tensor([1.0, 0.0, 1.0]).std()
    assert advantages[0].item() == pytest.approx((1 - 2 / 3) / (std0.item() + 1e-4), rel=1e-5)
    assert advantages[3] == 0 and advantages[4] == 0  # unscorable row; a group of one
    assert advantages[5].item() == pytest.approx(0.25 / (torch.tensor([0.5, 0.0]).std().item() + 1e-4), rel=1e-5)
    assert torch.allclose(group_normalized_advantages(rewards, groups, 3, "none")[:3], torch.tensor([1 / 3, -2 / 3, 1 / 3]))


def test_normalize_then_sum_on_ragged_groups_by_hand():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.5, 4.0], [0.5, 0.0]])
    groups = torch.tensor([0, 0, 0, 1, 1])
    ours = grpo_advantages(rewards, torch.tensor([1.0, 1.0]), groups, 2, scale="group",
                           aggregation="normalize_then_sum")
    expected = torch.zeros(5, dtype=torch.float64)
    for k in range(2):
        column = rewards[:, k].double()
        for g in range(2):
            members = groups == g
            values = column[members]
            expected[members] += (values - values.mean()) / (values.std() + 1e-4)
    expected = (expected - expected.mean()) / (expected.std() + 1e-4)
    assert torch.allclose(ours.double(), expected, atol=1e-5)


def test_unknown_aggregation_is_refused():
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        grpo_advantages(REWARDS, torch.ones(2), torch.zeros(8, dtype=torch.long), 1, scale="group", aggregation="max")
