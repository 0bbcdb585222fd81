"""GRPO advantages for groups of any size, as TRL computes them for groups of equal size.

GVM gives each prompt its own number of rows, so TRL's ``rewards.view(-1, num_generations)`` does not apply. These
functions compute the same quantities per group with ``index_add_`` (float64 sums): for equal groups they equal
TRL 1.16's ``_generate_and_score_completions`` (both ``multi_objective_aggregation`` modes, every ``scale_rewards``),
which ``tests/test_advantages.py`` checks against TRL's own code.
"""

from __future__ import annotations

import torch

__all__ = ["grpo_advantages", "group_normalized_advantages"]

_EPS = 1e-4  # TRL's denominator guard


def _group_stats(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: its group's NaN-aware mean and unbiased std (0 for a group with fewer than two values)."""
    valid = ~torch.isnan(values)
    filled = torch.where(valid, values, torch.zeros_like(values)).double()
    counts = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, groups, valid.double())
    means = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, groups, filled) / counts.clamp(min=1)
    centred = torch.where(valid, filled - means[groups], torch.zeros_like(filled))
    squares = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, groups, centred**2)
    stds = torch.where(counts > 1, (squares / (counts - 1).clamp(min=1)).sqrt(), torch.zeros_like(counts))
    return means[groups], stds[groups]


def _batch_std(values: torch.Tensor) -> torch.Tensor:
    scored = values[~torch.isnan(values)].double()
    return scored.std() if scored.numel() > 1 else torch.zeros((), dtype=torch.float64)


def group_normalized_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, num_groups: int, scale: str
) -> torch.Tensor:
    """(r − mean_group) / (std + 1e-4), TRL's ``sum_then_normalize`` path; ``scale`` is TRL's ``scale_rewards``.

    ``"group"`` divides by each group's std, ``"batch"`` by the std of every scored row, ``"none"`` not at all.
    NaN rewards (unscorable rows) stay out of the statistics and get advantage 0. A NaN advantage (an infinite reward
    makes its group's mean and std, and so every advantage of the group, NaN) becomes 0, as TRL 1.16 does with
    ``torch.nan_to_num(advantages, nan=0.0)`` (grpo_trainer.py line 2810): infinities left by ``"none"`` become the
    largest finite floats, also as in TRL.
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale!r}.")
    means, group_stds = _group_stats(rewards, groups, num_groups)
    valid = ~torch.isnan(rewards)
    centred = torch.where(valid, rewards.double() - means, torch.zeros_like(means))
    if scale == "group":
        centred = centred / (group_stds + _EPS)
    elif scale == "batch":
        centred = centred / (_batch_std(rewards) + _EPS)
    return torch.nan_to_num(centred.float(), nan=0.0)


def grpo_advantages(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    *,
    scale: str,
    aggregation: str,
) -> torch.Tensor:
    """GRPO advantages from per-function rewards [rows, K], honouring TRL's ``multi_objective_aggregation``.

    ``"sum_then_normalize"``: the weighted total is group-normalised (:func:`group_normalized_advantages`).
    ``"normalize_then_sum"``: each function's rewards are normalised within their group, the weighted sum of those
    is then normalised over the whole batch (``scale_rewards`` does not apply, as in TRL).
    A row that every function left unscored (NaN) gets advantage 0.
    """
    weights = reward_weights.to(rewards_per_func.dtype)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    if aggregation == "sum_then_normalize":
        totals = (rewards_per_func * weights).nansum(dim=1)
        totals[unscorable] = torch.nan
        return group_normalized_advantages(totals, groups, num_groups, scale)
    if aggregation != "normalize_then_sum":
        raise ValueError(
            f"multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum', got {aggregation!r}."
        )
    normalised = []
    for k in range(rewards_per_func.shape[1]):
        column = rewards_per_func[:, k]
        means, stds = _group_stats(column, groups, num_groups)
        normalised.append((column.double() - means) / (stds + _EPS))
    totals = (torch.stack(normalised, dim=1) * weights.double()).nansum(dim=1)
    totals[unscorable] = torch.nan
    valid = ~unscorable
    mean = totals[valid].mean() if valid.any() else torch.zeros((), dtype=torch.float64)
    advantages = (totals - mean) / (_batch_std(totals) + _EPS)
    return torch.nan_to_num(advantages, nan=0.0).float()
