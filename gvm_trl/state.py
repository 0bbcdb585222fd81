"""What a GVM run carries from one generation batch to the next, checkpointed as one unit (`gvm_state.json`).

A checkpoint is complete or it is not a checkpoint: the trainer writes the state atomically right after the model,
so before the optimizer, before Trainer's completeness marker (`trainer_state.json`, written last), before the Hub
upload and before older checkpoints are rotated away; resuming reads it back or refuses by name
(:func:`resume_checkpoint`), and `resume_from_checkpoint=True` skips, with a warning, checkpoints a kill left
incomplete.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

from transformers.trainer import TRAINER_STATE_NAME as TRAINER_STATE_FILE

from .estimates import PromptHistory

__all__ = [
    "STATE_FILE",
    "GVMState",
    "checkpoint_step",
    "is_checkpoint_folder",
    "last_complete_checkpoint",
    "read_state",
    "resume_checkpoint",
    "state_problem",
    "write_atomically",
]

STATE_FILE = "gvm_state.json"
_STATE_KEYS = {"empty_batches", "consecutive_empty", "prompt_history"}


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
        """Write the state to `folder` atomically (a temporary file, flushed to disk, then renamed): a kill leaves
        the previous file or the new one, never a torn one."""
        state = {
            "empty_batches": self.empty_batches,
            "consecutive_empty": self.consecutive_empty,
            "prompt_history": None if self.prompt_history is None else self.prompt_history.state_dict(),
            "rollout_totals": dict(self.rollout_totals),
            "reward_range": [_finite_or_none(value) for value in self.reward_range],
        }
        write_atomically(os.path.join(folder, STATE_FILE), json.dumps(state))

    def load(self, folder: str) -> None:
        """Restore from `folder`'s state file (:func:`read_state`: refused by name when missing or torn)."""
        state = read_state(folder)
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


def write_atomically(path: str, text: str) -> None:
    """`text` into `path` through a temporary file in the same folder, fsynced, then renamed over it (and the
    folder fsynced, so the rename itself survives a power loss)."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_state(folder: str) -> dict:
    """The GVM state saved in checkpoint `folder`, or a ValueError naming the file, what is wrong and the fix."""
    problem = state_problem(folder)
    if problem is not None:
        raise ValueError(
            f"Cannot resume from {folder}: {problem}, so the GVM state (prompt history, counters, totals) would "
            "silently restart. Resume with resume_from_checkpoint=True (the newest complete checkpoint in "
            "output_dir), or pass an earlier checkpoint."
        )
    with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as handle:
        return json.load(handle)


def state_problem(folder: str) -> str | None:
    """Why checkpoint `folder` cannot be resumed with its GVM state (None: it can): Trainer's completeness marker
    (trainer_state.json, written last) or the GVM state file (written before it) missing or torn."""
    for name in (TRAINER_STATE_FILE, STATE_FILE):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"it has no {name} (its saving was interrupted, or another trainer wrote it)"
        try:
            with open(path, encoding="utf-8") as handle:
                content = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"its {name} is torn (not valid JSON)"
        if name == STATE_FILE and not _STATE_KEYS <= set(content):
            return f"its {name} lacks {sorted(_STATE_KEYS - set(content))}"
    return None


def is_checkpoint_folder(path: str | None) -> bool:
    """Whether `path` is a `checkpoint-N` folder (what Trainer saves a checkpoint into)."""
    prefix, _, number = os.path.basename(os.path.normpath(path or "")).partition("-")
    return prefix == "checkpoint" and number.isdigit()


def checkpoint_step(checkpoint: str) -> int:
    """The global step a `checkpoint-N` folder was saved at."""
    return int(os.path.basename(os.path.normpath(checkpoint)).rpartition("-")[2])


def last_complete_checkpoint(output_dir: str) -> str:
    """The highest-numbered `checkpoint-N` in `output_dir` that can be resumed with its GVM state
    (:func:`state_problem`); each newer one skipped is named in a warning with the reason.

    Trainer picks the highest-numbered one, which after a kill during saving may lack its state files.
    """
    checkpoints = sorted(
        (checkpoint_step(name), os.path.join(output_dir, name))
        for name in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
        if is_checkpoint_folder(name)
    )
    skipped = []
    for _, path in reversed(checkpoints):
        problem = state_problem(path)
        if problem is None:
            if skipped:
                warnings.warn(f"Resuming from {path}, the newest complete checkpoint, instead of {'; '.join(skipped)}.",
                              stacklevel=3)
            return path
        skipped.append(f"{path} ({problem})")
    raise ValueError(
        f"resume_from_checkpoint=True found no complete checkpoint in {output_dir!r}"
        + (f" (skipped {'; '.join(skipped)})" if skipped else "")
        + "; pass a checkpoint path, or drop resume_from_checkpoint to start from scratch."
    )


def resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint `Trainer.train(resume_from_checkpoint=...)` resumes from: True picks the newest complete one in
    `output_dir`; a path must be complete (:func:`read_state` says why not); None or False starts afresh."""
    if resume_from_checkpoint is True:
        return last_complete_checkpoint(output_dir)
    if not resume_from_checkpoint:
        return None
    read_state(resume_from_checkpoint)
    return resume_from_checkpoint


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
