"""Row-level operations on TRL's generation-batch dictionaries, for batches whose row count varies.

TRL's GRPO batch is a dict of tensors with one row per completion: ``prompt_ids``/``prompt_mask`` left-padded,
``completion_ids``/``completion_mask`` and per-token tensors right-padded. TRL assumes a fixed row count and its
``split_tensor_dict`` drops remainder rows; GVM's row count changes every generation batch, so these helpers
concatenate, select and split without dropping anything.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

LEFT_PADDED = ("prompt_ids", "prompt_mask")


def _pad_width(tensor: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    missing = width - tensor.size(1)
    if missing <= 0:
        return tensor
    filler = tensor.new_full((tensor.size(0), missing, *tensor.shape[2:]), value)
    return torch.cat([filler, tensor] if left else [tensor, filler], dim=1)


def concat_rows(batches: list[dict[str, Any]], pad_values: dict[str, float]) -> dict[str, Any]:
    """Concatenate batches row-wise, re-padding per-token tensors to a common width.

    Keys whose value is a 0-d tensor (batch-level scalars such as ``num_items_in_batch``) are dropped: they do not
    describe the concatenation. ``pad_values`` gives the fill value per key (default 0).
    """
    keys = [key for key in batches[0] if not (torch.is_tensor(batches[0][key]) and batches[0][key].dim() == 0)]
    merged: dict[str, Any] = {}
    for key in keys:
        values = [batch[key] for batch in batches]
        if any(value is None for value in values):
            raise ValueError(f"Cannot concatenate batches: {key!r} is missing from some of them.")
        if not torch.is_tensor(values[0]):
            merged[key] = [item for value in values for item in value]
            continue
        if values[0].dim() >= 2:
            width = max(value.size(1) for value in values)
            values = [_pad_width(v, width, pad_values.get(key, 0), left=key in LEFT_PADDED) for v in values]
        merged[key] = torch.cat(values, dim=0)
    return merged


def select_rows(batch: dict[str, Any], index: torch.Tensor | list[int]) -> dict[str, Any]:
    """The rows ``index`` of every per-row entry (tensors and lists alike)."""
    index = torch.as_tensor(index, dtype=torch.long)
    selected = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            selected[key] = value[index.to(value.device)] if value.dim() > 0 else value
        elif isinstance(value, list):
            selected[key] = [value[i] for i in index.tolist()]
        else:
            selected[key] = value
    return selected


def num_rows(batch: dict[str, Any]) -> int:
    return next(len(value) for value in batch.values() if torch.is_tensor(value) and value.dim() > 0)


def trim_padding_columns(batch: dict[str, Any]) -> dict[str, Any]:
    """Drop prompt columns that are padding in every row and completion columns past the longest completion."""
    prompt_keep = batch["prompt_mask"].any(dim=0)
    first = int(prompt_keep.nonzero()[0]) if prompt_keep.any() else batch["prompt_mask"].size(1) - 1
    completion_keep = batch["completion_mask"].any(dim=0)
    last = int(completion_keep.nonzero()[-1]) + 1 if completion_keep.any() else 1
    completion_width = batch["completion_ids"].size(1)
    trimmed = {}
    for key, value in batch.items():
        if key in LEFT_PADDED:
            trimmed[key] = value[:, first:]
        elif torch.is_tensor(value) and value.dim() >= 2 and value.size(1) == completion_width:
            trimmed[key] = value[:, :last]
        else:
            trimmed[key] = value
    return trimmed


def split_rows(batch: dict[str, Any], num_chunks: int) -> list[dict[str, Any]]:
    """Split into ``num_chunks`` consecutive chunks whose sizes differ by at most one; nothing is dropped.

    A chunk may be empty when there are fewer rows than chunks; the caller decides how to fill it.
    """
    bounds = torch.tensor_split(torch.arange(num_rows(batch)), num_chunks)
    return [select_rows(batch, chunk) for chunk in bounds]


def as_filler(rows: dict[str, Any]) -> dict[str, Any]:
    """Rows that take part in forward and backward but contribute nothing: no loss tokens, zero advantage."""
    for key in ("completion_mask", "advantages", "gvm_weight"):
        rows[key] = torch.zeros_like(rows[key])
    return rows


def build_micro_batches(
    batch: dict[str, Any],
    steps: int,
    pad_values: dict[str, float],
    sequence_level: bool,
    max_over_processes: Callable[[torch.Tensor], torch.Tensor] = lambda sizes: sizes,
) -> list[dict[str, Any]]:
    """Shuffle and split the local rows over `steps` micro-steps as TRL does (a permutation from the global RNG, then
    consecutive chunks: mirrors trl 1.16.0's `shuffle_sequence_dict` and `split_tensor_dict`, registered in
    `gvm_trl.trl_compat`), except that nothing is dropped: chunk sizes may differ by one row, and each micro-step is
    filled up with filler rows to the same row count on every process (`max_over_processes` takes the per-step row
    counts to their maximum over processes: TRL's loss gathers per-row metrics, which needs equal counts, and every
    process then also runs every backward).

    Filler rows carry no loss tokens and no advantage, so token-level losses (dapo, bnpo, cispo, vespo) do not see
    them; sequence-level ones (grpo, sapo, luspo, dr_grpo) average over rows, so a padded micro-batch's real rows get
    their advantages scaled by padded/real rows, which keeps their policy term TRL's per-micro-batch mean (their KL
    term, inside TRL's loss, is diluted by the same factor).
    """
    permutation = torch.randperm(num_rows(batch))
    chunks = split_rows(select_rows(batch, permutation), steps)
    sizes = max_over_processes(torch.tensor([num_rows(chunk) for chunk in chunks]))
    return [
        _pad_rows(chunk, batch, max(int(size), 1), pad_values, sequence_level) for chunk, size in zip(chunks, sizes)
    ]


def _pad_rows(
    chunk: dict[str, Any], batch: dict[str, Any], size: int, pad_values: dict[str, float], sequence_level: bool
) -> dict[str, Any]:
    """`chunk` filled up to `size` rows with filler rows copied from `batch` (see `build_micro_batches`)."""
    real = num_rows(chunk)
    if real == size:
        return chunk
    fillers = as_filler(select_rows(batch, [0] * (size - real)))
    if real == 0:
        return fillers
    if sequence_level:
        chunk = dict(chunk, advantages=chunk["advantages"] * (size / real))
    padded = concat_rows([chunk, fillers], pad_values)
    padded.update({key: value for key, value in chunk.items() if torch.is_tensor(value) and value.dim() == 0})
    return padded
