"""The pieces a GVM generation batch is built from: its prompt sampler, the rows of a generation call, its record.

- :class:`GenerationBatchSampler` yields the prompts in the order and layout of TRL's ``RepeatSampler`` and remembers
  them, so that the probe-ahead schedule can find the next generation batch's prompts.
- :class:`Rollout` holds the rows of one generation call: TRL's local batch plus per-row facts gathered over every
  process (prompt slot, rewards, completion length), so a generation batch can be assembled from several calls.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import Sampler

from .batching import concat_rows, select_rows

__all__ = [
    "GenerationBatchSampler",
    "Rollout",
    "accepted_rows",
    "concat_rollout_batches",
    "local_row_index",
    "nonfinite_reward_warnings",
    "total_rewards",
]


class GenerationBatchSampler(Sampler[int]):
    """TRL's ``RepeatSampler`` order, remembered, so the trainer can look one generation batch ahead.

    Yields exactly what ``trl.trainer.utils.RepeatSampler`` yields with the same arguments (trl 1.16.0, utils.py lines
    930-951, registered in `gvm_trl.trl_compat`: a seeded permutation per epoch, cut into generation batches of
    ``batch_size`` distinct prompts, the incomplete last one dropped, each index repeated ``mini_repeat_count`` times
    and each batch ``repeat_count`` times), so a GVM trainer reads the same prompts, in the same order and layout, as
    `trl.GRPOTrainer`. It also keeps each epoch's generation batches: :meth:`following` gives the batch after a given
    one — across the epoch boundary too, by drawing the next epoch's permutation early and using it when that epoch
    starts — and :meth:`locate` finds a batch from its rows. Unlike TRL's, it takes :meth:`set_epoch` (which Trainer
    calls at each epoch's start), so a run resumed in a later epoch gets that epoch's permutation rather than the
    first one's.
    """

    def __init__(
        self,
        data_source: Sized,
        mini_repeat_count: int,
        batch_size: int,
        repeat_count: int,
        *,
        shuffle: bool = True,
        seed: int | None = None,
    ) -> None:
        self.num_samples = len(data_source)
        self.mini_repeat_count, self.batch_size, self.repeat_count = mini_repeat_count, batch_size, repeat_count
        self.shuffle, self.seed = shuffle, seed
        self._reset()

    def _reset(self) -> None:
        self.generator = torch.Generator()
        if self.seed is not None:
            self.generator.manual_seed(self.seed)
        self._drawn = 0  # permutations drawn so far
        self._epoch: list[list[int]] = []
        self._cursor = 0
        self._next_epoch: list[list[int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Make the next epoch drawn epoch `epoch`'s permutation (a no-op when iterating epochs in order)."""
        pending = self._drawn - (self._next_epoch is not None)
        if not self.shuffle or pending == epoch:
            return
        self._reset()
        for _ in range(epoch):
            self._draw_epoch()

    def _draw_epoch(self) -> list[list[int]]:
        self._drawn += 1
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=self.generator).tolist()
        else:
            order = list(range(self.num_samples))
        size = self.batch_size
        return [order[i : i + size] for i in range(0, len(order) - size + 1, size)]

    def __iter__(self) -> Iterator[int]:
        self._epoch, self._next_epoch = (self._next_epoch or self._draw_epoch()), None
        self._cursor = 0
        for batch in self._epoch:
            for _ in range(self.repeat_count):
                for index in batch:
                    yield from [index] * self.mini_repeat_count

    def locate(self, rows: list[Any], row_at: Callable[[int], Any]) -> list[int] | None:
        """The dataset indices of this epoch's generation batch whose rows (``row_at(index)``) equal `rows`, looked
        for from the last one found onwards (None: no batch of this epoch matches).

        This is how the trainer knows each prompt's dataset index without adding a column to the rows that TRL,
        reward functions and callbacks see.
        """
        count = len(self._epoch)
        for offset in range(count):
            position = (self._cursor + offset) % count
            batch = self._epoch[position]
            if len(batch) == len(rows) and all(row_at(index) == row for index, row in zip(batch, rows)):
                self._cursor = position
                return batch
        return None

    def indices_of(self, rows: list[Any], row_at: Callable[[int], Any]) -> list[int]:
        """:meth:`locate`, or an error naming the fix."""
        indices = self.locate(rows, row_at)
        if indices is None:
            raise RuntimeError(
                "The GVM trainer could not find this generation batch's prompts in its sampler's order, so it cannot "
                "tell their dataset indices; train with the trainer's own dataloader (do not override "
                "get_train_dataloader or _get_train_sampler)."
            )
        return indices

    def upcoming(
        self, batch: list[int], rank: int, num_processes: int, row_at: Callable[[int], Any]
    ) -> tuple[list[Any], list[int]]:
        """Process `rank`'s rows of the generation batch after `batch`, and all its indices (none: two empty lists)."""
        following = self.following(batch)
        if following is None:
            return [], []
        share = len(following) // num_processes
        return [row_at(i) for i in following[rank * share : (rank + 1) * share]], following

    def following(self, batch: list[int]) -> list[int] | None:
        """The dataset indices of the generation batch after `batch` (None if `batch` is not one of this epoch's)."""
        position = next((i for i, b in enumerate(self._epoch) if b == batch), None)
        if position is None:
            return None
        if position + 1 < len(self._epoch):
            return self._epoch[position + 1]
        if self._next_epoch is None:
            self._next_epoch = self._draw_epoch()
        return self._next_epoch[0] if self._next_epoch else None

    def __len__(self) -> int:
        return (self.num_samples // self.batch_size) * self.batch_size * self.mini_repeat_count * self.repeat_count


@dataclass
class Rollout:
    """The rows of one generation call (or a part of one).

    ``batch`` is this process's rows as TRL's ``_generate_and_score_completions`` returns them; every one of the
    ``num_processes`` processes holds the same number of them, and the per-row tensors below cover all processes,
    process-major (row g lives on process g // rows_per_process). ``prompts`` is each row's prompt slot in its
    generation batch (-1: a padding row that only keeps the processes in step). ``accepted``: the rows whose total
    reward reaches the acceptance threshold (:func:`accepted_rows`); ``trains``: the rows the trainer trains on (GRPO:
    every real row; RAFT++: the accepted ones). ``logged`` holds TRL's gathered completions-table entries for the rows
    (prompt, completion, rewards, advantages, extra columns).
    """

    batch: dict[str, Any]
    prompts: torch.Tensor
    rewards_per_func: torch.Tensor
    rewards: torch.Tensor
    accepted: torch.Tensor
    trains: torch.Tensor
    lengths: torch.Tensor
    truncated: torch.Tensor
    logged: dict[str, Any]
    step: int
    phase: str
    num_processes: int = 1

    @property
    def rows_per_process(self) -> int:
        return len(self.prompts) // self.num_processes

    def local_rows(self, rank: int) -> slice:
        """Where process `rank`'s rows sit among the global rows."""
        return slice(rank * self.rows_per_process, (rank + 1) * self.rows_per_process)

    def part(self, local: slice, phase: str) -> Rollout:
        """The rows ``local`` of every process's share, as a rollout of its own."""
        per_process = self.rows_per_process
        offsets = torch.arange(per_process)[local]
        rows = torch.cat([rank * per_process + offsets for rank in range(self.num_processes)]).tolist()
        logged = {
            key: {name: [values[i] for i in rows] for name, values in value.items()}
            if isinstance(value, dict)
            else [value[i] for i in rows]
            for key, value in self.logged.items()
        }
        return Rollout(
            batch=select_rows(self.batch, offsets),
            prompts=self.prompts[rows],
            rewards_per_func=self.rewards_per_func[rows],
            rewards=self.rewards[rows],
            accepted=self.accepted[rows],
            trains=self.trains[rows],
            lengths=self.lengths[rows],
            truncated=self.truncated[rows],
            logged=logged,
            step=self.step,
            phase=phase,
            num_processes=self.num_processes,
        )


def local_row_index(parts: list[Rollout], rank: int) -> torch.Tensor:
    """Global row indices (into the parts' concatenation) of process `rank`'s rows, in its local order."""
    offset, rows = 0, []
    for part in parts:
        rows.append(offset + torch.arange(len(part.prompts))[part.local_rows(rank)])
        offset += len(part.prompts)
    return torch.cat(rows)


def total_rewards(
    rewards: dict[str, list[float]], names: list[str], weights: torch.Tensor, prompts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-function rewards [rows, K] (TRL's logged values, NaN where a function left a row unscored) and each row's
    total, the `reward_weights`-weighted sum whatever TRL's `multi_objective_aggregation` (NaN for a row no function
    scored, and for padding rows)."""
    rewards_per_func = torch.tensor([rewards[name] for name in names], dtype=torch.float32).T
    rewards_per_func = rewards_per_func.reshape(len(prompts), len(names))
    totals = (rewards_per_func * weights.cpu()).nansum(dim=1)
    totals[torch.isnan(rewards_per_func).all(dim=1) | (prompts < 0)] = torch.nan
    return rewards_per_func, totals


def accepted_rows(rewards: torch.Tensor, prompts: torch.Tensor, threshold: float) -> torch.Tensor:
    """The acceptance rule (``gvm_accept_threshold``): a completion is accepted iff its total reward is finite and at
    least `threshold`; padding rows (slot -1), unscored rows (NaN) and infinite rewards never are (an infinite reward
    says nothing a finite one would not, and would make every estimate and weight it touches infinite)."""
    return torch.isfinite(rewards) & (rewards >= threshold) & (prompts >= 0)


def nonfinite_reward_warnings(rewards_per_func: torch.Tensor, names: list[str]) -> dict[str, str]:
    """For each reward function that returned ±inf on some rows: a warning naming it, the count and what happens."""
    counts = torch.isinf(rewards_per_func).sum(dim=0).tolist()
    return {
        name: (
            f"The reward function {name!r} returned {count} infinite reward(s) in one generation call. They are "
            "treated as TRL treats them: a GRPO group holding one gets advantage 0 for every row (TRL's "
            "nan_to_num), and the row is never accepted (GVM's estimates, RAFT++'s training rows); "
            "gvm/nonfinite_rewards counts them. Return finite rewards (clip them), or None for a row that cannot "
            "be scored."
        )
        for name, count in zip(names, counts)
        if count
    }


def concat_rollout_batches(batches: list[dict[str, Any]], pad_values: dict[str, float]) -> dict[str, Any]:
    """Local batches concatenated row-wise; a per-row tensor that some lack (``old_per_token_logps`` of rows drawn by
    the current weights, next to reused probes drawn by earlier ones) is filled with NaN for their rows, which the
    trainer replaces by the current log-probabilities when it computes the loss."""
    keys = {key for batch in batches for key, value in batch.items() if torch.is_tensor(value) and value.dim() > 0}
    completed = []
    for batch in batches:
        batch = dict(batch)
        rows, width = batch["completion_ids"].shape
        for key in sorted(keys - set(batch)):
            owner = next(b for b in batches if key in b)
            template = owner[key]
            shape = list(template.shape)
            shape[0] = rows
            if template.dim() >= 2 and template.shape[1] == owner["completion_ids"].shape[1]:
                shape[1] = width  # a per-token tensor: as wide as this batch's completions
            batch[key] = template.new_full(shape, float("nan"))
        completed.append(batch)
    return concat_rows(completed, pad_values)
