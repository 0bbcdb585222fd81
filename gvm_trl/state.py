"""What a GVM run carries from one generation batch to the next, checkpointed as one unit (`gvm_state.json`)."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field

from transformers.utils import logging

from .estimates import PromptHistory

logger = logging.get_logger(__name__)

__all__ = ["STATE_FILE", "GVMState", "checkpoint_step", "last_complete_checkpoint"]

STATE_FILE = "gvm_state.json"


@dataclass
class GVMState:
    """The per-prompt history, the empty-batch counters, the rollout totals and the reward range seen so far.

    ``rollout_totals`` sums, over the run, the completions generated per phase (``probe_completions``,
    ``budget_completions``) and the seconds spent per stage (``time_<stage>``); ``reward_range`` is the lowest and
    highest total reward scored, which the acceptance-threshold messages quote.
    """

    prompt_history: PromptHistory | None = None
    empty_batches: int = 0
    consecutive_empty: int = 0
    rollout_totals: defaultdict = field(default_factory=lambda: defaultdict(float))
    reward_range: list = field(default_factory=lambda: [math.inf, -math.inf])

    def note_rewards(self, low: float, high: float) -> None:
        self.reward_range = [min(self.reward_range[0], low), max(self.reward_range[1], high)]

    def note_empty_batch(self, trainer_name: str, args) -> str:
        """Count a generation batch with nothing to train on; the warning to give, or an error after
        `gvm_max_empty_batches` in a row."""
        self.empty_batches += 1
        self.consecutive_empty += 1
        message = (
            f"{trainer_name}: no completion of this generation batch reached gvm_accept_threshold="
            f"{args.gvm_accept_threshold} ({self._rewards_seen()}), so its update was skipped. RAFT++ trains only on "
            "accepted completions: set gvm_accept_threshold to the reward of a correct answer, or train with "
            "GVMGRPOTrainer, which learns from reward differences."
        )
        limit = args.gvm_max_empty_batches
        if limit is not None and self.consecutive_empty >= limit:
            raise RuntimeError(
                f"{message} This happened in {self.consecutive_empty} consecutive generation batches "
                f"(gvm_max_empty_batches={limit}); the run stops rather than train nothing. Checkpoints already saved "
                f"in {args.output_dir} are kept."
            )
        return message

    def fallback_message(self, trainer_name: str, args) -> str:
        return (
            f"{trainer_name}: no probe of this generation batch reached gvm_accept_threshold="
            f"{args.gvm_accept_threshold} ({self._rewards_seen()}), so its budget was split uniformly "
            "(gvm/uniform_fallback). GVM's allocation needs accepted probes: set gvm_accept_threshold to the reward "
            "of a correct answer."
        )

    def _rewards_seen(self) -> str:
        low, high = self.reward_range
        return f"rewards seen so far range over [{low:.4g}, {high:.4g}]"

    def save(self, folder: str) -> None:
        state = {
            "empty_batches": self.empty_batches,
            "consecutive_empty": self.consecutive_empty,
            "prompt_history": None if self.prompt_history is None else self.prompt_history.state_dict(),
            "rollout_totals": dict(self.rollout_totals),
            "reward_range": [_finite_or_none(value) for value in self.reward_range],
        }
        with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump(state, handle)

    def load(self, folder: str) -> bool:
        """Restore from `folder`'s state file (False: there is none). Checkpoints written before the rollout totals
        and reward range were saved load with those starting afresh."""
        path = os.path.join(folder, STATE_FILE)
        if not os.path.exists(path):
            return False
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        self.empty_batches = state["empty_batches"]
        self.consecutive_empty = state["consecutive_empty"]
        self.rollout_totals.clear()  # in place: the stage timer adds to this dict
        self.rollout_totals.update(state.get("rollout_totals", {}))
        low, high = state.get("reward_range", [None, None])
        self.reward_range = [math.inf if low is None else low, -math.inf if high is None else high]
        if self.prompt_history is not None:
            if state["prompt_history"] is None:
                raise ValueError(
                    f"{folder} was trained without a prompt history (gvm_history_decay), so there is none to resume; "
                    "resume with gvm_history_decay=0, or start a new run."
                )
            self.prompt_history.load_state_dict(state["prompt_history"])
        return True


def checkpoint_step(checkpoint: str) -> int:
    """The global step a `checkpoint-N` folder was saved at."""
    return int(os.path.basename(os.path.normpath(checkpoint)).rpartition("-")[2])


def last_complete_checkpoint(output_dir: str) -> str:
    """The highest-numbered `checkpoint-N` in `output_dir` whose `trainer_state.json` (written last) exists.

    Trainer picks the highest-numbered one, which after a crash during saving may lack its state files.
    """
    checkpoints = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        prefix, _, number = name.partition("-")
        if prefix == "checkpoint" and number.isdigit():
            checkpoints.append((int(number), os.path.join(output_dir, name)))
    for _, path in sorted(checkpoints, reverse=True):
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            return path
        logger.warning(f"Skipping {path}: it has no trainer_state.json (its saving was interrupted).")
    raise ValueError(
        f"resume_from_checkpoint=True found no complete checkpoint in {output_dir!r}; pass a checkpoint path, or "
        "drop resume_from_checkpoint to start from scratch."
    )


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
