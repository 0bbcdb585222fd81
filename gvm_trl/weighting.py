"""The update's per-row weights (Lemma 1, eq. (4), and Algorithm 1), as pure functions of per-prompt counts.

Each training row r of prompt i gets a factor ω_r: Lemma 1's 1/(n_i p_i), Algorithm 1's 1/|D_i| (``"mean"``), or 1
(``"none"``). The weights then get one common scale s so that Σ s·ω_r·τ_r = Σ τ_r over the generation batch's
training rows (τ_r: the row's loss tokens, 1 for sequence-level losses): the weights keep their ratios and the loss
keeps TRL's scale. The weighted advantage ω_r·A_r enters TRL's own loss (see the trainer's docstring for why that is
exact for every loss type).
"""

from __future__ import annotations

from typing import Callable

import torch

from .allocation import lemma1_weights, mean_weights
from .planner import per_prompt_sums

__all__ = ["prompt_weights", "row_weights", "weight_scale"]

def prompt_weights(
    mode: str, planned_rates: list[float], drawn: torch.Tensor, accepted: torch.Tensor
) -> torch.Tensor:
    """Per-prompt factor: Lemma 1's 1/(n_i p_i) (``"lemma1"``), Algorithm 1's 1/|D_i| (``"mean"``) or 1 (``"none"``).

    ``drawn`` counts every training sample drawn for the prompt (reused probes included); ``planned_rates`` are the
    estimates the allocation used. Where that estimate is 0 (an explored or fallback prompt) the pooled rate
    |D_i|/n_i stands in, and a prompt with no accepted row counts as one accepted (weight 1/n_i·n_i = 1), so its rows
    keep the reward-difference signal GRPO trains on.
    """
    if mode == "none":
        return torch.ones(len(drawn), dtype=torch.float64)
    floor = torch.ones_like(accepted)
    if mode == "mean":
        weights = torch.tensor(mean_weights(accepted.tolist()), dtype=torch.float64)
        return torch.where(accepted > 0, weights, floor)
    rates = torch.tensor(planned_rates, dtype=torch.float64)
    pooled = torch.maximum(accepted, floor) / drawn.clamp(min=1)
    rates = torch.where(rates > 0, rates, pooled)
    return torch.tensor(lemma1_weights(drawn.tolist(), rates.tolist()), dtype=torch.float64)


def row_weights(
    mode: str,
    planned_rates: list[float],
    prompts: torch.Tensor,
    accepted: torch.Tensor,
    trains: torch.Tensor,
    num_prompts: int,
) -> torch.Tensor:
    """Each row's factor ω_r of a generation batch (0 for rows that do not train): its prompt's
    :func:`prompt_weights`, counting every row drawn for the prompt (reused probes included) and its accepted rows.
    `prompts`: each row's prompt slot (-1: padding); `planned_rates`: the estimates the allocation used."""
    drawn = per_prompt_sums(torch.ones(len(prompts)), prompts, num_prompts)
    accepted_count = per_prompt_sums(accepted.double(), prompts, num_prompts)
    weights = prompt_weights(mode, planned_rates, drawn, accepted_count)[prompts.clamp(min=0)]
    return torch.where(trains, weights, torch.zeros_like(weights))


def weight_scale(
    weights: torch.Tensor,
    tokens: torch.Tensor,
    sequence_level: bool,
    global_sum: Callable[[torch.Tensor], torch.Tensor] = lambda value: value,
) -> torch.Tensor:
    """s with Σ s·ω_r·τ_r = Σ τ_r over the training rows of every process (`global_sum` adds over processes)."""
    if sequence_level:
        tokens = torch.ones_like(tokens)
    totals = global_sum(torch.stack([tokens.sum(), (weights * tokens).sum()]))
    return (totals[0] / totals[1]) if totals[1] > 0 else torch.ones((), dtype=torch.float64)
