"""Every place this package reads or writes TRL's private state, or mirrors TRL code, in one table.

The GVM trainers override a handful of `trl.GRPOTrainer` hooks. Where an override mirrors TRL code or swaps TRL's
private attributes for a call, it is tagged with :func:`mirrors`, which records the TRL function it follows, the
TRL version and lines it was written against, and a hash of that function's source. `tests/test_trl_compat.py`
hashes the installed TRL's source of every entry, so a TRL upgrade that changes a mirrored function fails there,
naming the override to re-read, instead of silently diverging for a user.

TRL's private state is written only here and in the trainer's overrides of the TRL methods that own it (tagged too):
the functions below swap `num_generations`, `_logs`, `_metrics` and `state.num_input_tokens_seen` for the length of
one generation call, write TRL's completion, reward and sampling metrics and completions table for the rows a
generation batch trains on, append the `gvm/` metrics, and count a skipped micro-step as TRL counts a step; the
trainer's `_prepare_inputs` fills TRL's generation buffer as TRL's does.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import time
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from trl.trainer.utils import nanmax, nanmin, nanstd

from .batching import build_micro_batches, select_rows
from .metrics import group_reward_std
from .rollout import GenerationBatchSampler

__all__ = [
    "MIRRORS",
    "Mirror",
    "append_metrics",
    "captured_call_logs",
    "check_supported",
    "generation_batches_done",
    "generation_group_size",
    "generation_timed_as_step",
    "is_last_generation_batch",
    "is_sequence_level",
    "log_sampling_metrics",
    "log_training_rows",
    "mirrors",
    "refuse",
    "refuse_unsupported_arguments",
    "resize_completion_logs",
    "skip_micro_step",
    "source_hash",
]

@dataclass(frozen=True)
class Mirror:
    """One override that follows TRL code: which TRL function, where in TRL 1.16.0, and its source's hash."""

    override: str
    target: str
    lines: str
    sha256: str
    why: str

    def resolve(self) -> Any:
        """The installed TRL object named by `target` ("module:Qualified.name")."""
        module_name, _, qualname = self.target.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj


MIRRORS: dict[str, Mirror] = {}


def source_hash(obj: Any) -> str:
    """First 16 hex digits of the SHA-256 of `obj`'s source, as `inspect.getsource` gives it."""
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def mirrors(target: str, lines: str, sha256: str, why: str) -> Callable:
    """Tag a function or class as mirroring TRL's `target` (trl 1.16.0, `lines`); see the module docstring."""

    def register(obj):
        name = f"{obj.__module__}.{obj.__qualname__}"
        MIRRORS[f"{name} <- {target}"] = Mirror(name, target, lines, sha256, why)
        return obj

    return register


GRPO = "trl.trainer.grpo_trainer:GRPOTrainer"
UTILS = "trl.trainer.utils"

# Mirrors defined in modules this one imports (registered here, so that the imports stay one-way).
mirrors(f"{UTILS}:RepeatSampler", "930-951 of 859-952", "ba139f4a43eeecd4",
        "the same prompt order and layout as TRL's sampler: both trainers read the same prompts")(GenerationBatchSampler)
mirrors(f"{UTILS}:shuffle_sequence_dict", "1092-1121", "bab038755e57ed2b",
        "one permutation of the rows from the global RNG, as TRL shuffles a generation batch")(build_micro_batches)
mirrors(f"{UTILS}:split_tensor_dict", "1057-1089", "b61a5760a03e95db",
        "consecutive chunks, one per micro-step, as TRL splits a generation batch")(build_micro_batches)


@contextmanager
@mirrors(f"{GRPO}._generate_and_score_completions", "2324-2936", "1fa48922792dcd5c",
         "it groups rows by `self.num_generations` (advantages, group statistics)")
def generation_group_size(trainer, size: int):
    """Run TRL's generate-and-score with `size` consecutive rows per prompt."""
    saved = trainer.num_generations
    trainer.num_generations = size
    try:
        yield
    finally:
        trainer.num_generations = saved


@contextmanager
@mirrors(f"{GRPO}.log", "3302-3381", "1e7772819cc8cf09",
         "log() averages `_metrics[mode]` and prints the `_logs` completions table; one call's entries are set aside")
def captured_call_logs(trainer, user_metric_names: set[str]):
    """Collect one generation call's metrics and completions-table entries aside (the yielded dict holds TRL's
    gathered prompts, completions, rewards, advantages and extra columns), and restore TRL's own afterwards.

    TRL logs per generation call; a GVM generation batch spans several calls, some rows of which it does not train
    on, so the trainer logs the batch once, for the rows it trains on. What reward functions log themselves (their
    `log_metric` names) is kept.
    """
    saved_logs, saved_metrics = trainer._logs, trainer._metrics["train"]
    saved_tokens = trainer.state.num_input_tokens_seen
    trainer._logs = {
        "images": [],
        "prompt": [],
        "completion": [],
        "rewards": defaultdict(list),
        "advantages": [],
        "extra": defaultdict(list),
    }
    trainer._metrics["train"] = defaultdict(list)
    captured = trainer._logs
    try:
        yield captured
    finally:
        call_metrics = trainer._metrics["train"]
        trainer._logs, trainer._metrics["train"] = saved_logs, saved_metrics
        trainer.state.num_input_tokens_seen = saved_tokens
        for name in user_metric_names:
            saved_metrics[name].extend(call_metrics.get(name, []))


@mirrors(f"{GRPO}.__init__", "1088-1095 of 302-1241", "18f01b7a46c9544b",
         "TRL sizes its completions table (`_logs`) for one generation batch")
def resize_completion_logs(trainer, capacity: int) -> None:
    """Give TRL's completions table (`trainer._logs`) room for `capacity` rows: a GVM generation batch can train on
    more rows than TRL's (probes plus allocated completions)."""

    def resized(container):
        if isinstance(container, deque):
            return deque(container, maxlen=capacity)
        grown = defaultdict(lambda: deque(maxlen=capacity))
        grown.update({name: deque(values, maxlen=capacity) for name, values in container.items()})
        return grown

    trainer._logs = {key: resized(value) for key, value in trainer._logs.items()}


@mirrors(f"{GRPO}._compute_loss", "3153-3185 of 3020-3290", "80295546bbdbf6f7",
         "which loss types average per sequence (grpo, sapo, dr_grpo, luspo) rather than over the batch's tokens")
def is_sequence_level(loss_type: str) -> bool:
    """Whether TRL's `loss_type` aggregates per sequence (each row counts alike) rather than per token."""
    return loss_type in ("grpo", "sapo", "luspo", "dr_grpo")


@mirrors(f"{GRPO}.log", "3302-3381", "1e7772819cc8cf09",
         "log() averages each `_metrics[mode]` list over the logging steps")
def append_metrics(trainer, values: dict[str, float], running: dict[str, float] | None = None) -> None:
    """Add one generation batch's values to TRL's train metrics (averaged per logging step); a `running` metric
    (a count over the run) keeps only its latest value."""
    metrics = trainer._metrics["train"]
    for name, value in values.items():
        metrics[name].append(value)
    for name, value in (running or {}).items():
        metrics[name] = [value]


@mirrors(f"{GRPO}._prepare_inputs", "1521-1551", "f824e7fb07147956",
         "TRL generates a batch every steps_per_generation × num_iterations micro-steps, counted by `_step`")
def generation_batches_done(trainer) -> int:
    """Generation batches the run has drawn so far (a resumed run counts those before its checkpoint)."""
    return _micro_steps_done(trainer) // (trainer.args.steps_per_generation * trainer.num_iterations)


def is_last_generation_batch(trainer) -> bool:
    """Whether the generation batch starting now is the run's last (`max_steps` ends within it)."""
    remaining = trainer.state.max_steps * trainer.args.gradient_accumulation_steps - _micro_steps_done(trainer)
    return remaining <= trainer.args.steps_per_generation * trainer.num_iterations


def _micro_steps_done(trainer) -> int:
    accumulation = trainer.args.gradient_accumulation_steps
    return trainer.state.global_step * accumulation + trainer._step % accumulation


@contextmanager
@mirrors(f"{GRPO}.training_step", "1510-1519", "9e18632f7dd8e8d8",
         "TRL's step_time counts what runs inside training_step, generation included")
def generation_timed_as_step(trainer):
    """Count the block's seconds into TRL's step time, as TRL's `training_step` counts its generation."""
    start = time.perf_counter()
    try:
        yield
    finally:
        trainer._current_train_step_time += time.perf_counter() - start


@mirrors(f"{GRPO}.training_step", "1510-1519", "9e18632f7dd8e8d8",
         "a skipped micro-step still counts `_step` and logs TRL's step_time, with no backward")
def skip_micro_step(trainer) -> torch.Tensor:
    """A micro-step with nothing to train on: counted as TRL counts a step (its `_step`, its `step_time` at the end
    of an accumulation window), with no backward, so the optimizer sees no gradient; returns a zero loss."""
    trainer._step += 1
    if trainer._step % trainer.current_gradient_accumulation_steps == 0:
        trainer._metrics["train"]["step_time"].append(trainer._current_train_step_time)
        trainer._current_train_step_time = 0.0
    return torch.zeros((), device=trainer.accelerator.device)


@mirrors(f"{GRPO}._generate_and_score_completions", "2290-2310, 2820-2858 of 2324-2936", "1fa48922792dcd5c",
         "TRL's completion and reward metrics and completions table, for the rows trained on")
def log_training_rows(trainer, parts, trains, advantages, batch, keep) -> None:
    """TRL's completion and reward metrics and its completions table, for the rows trained on."""
    metrics = trainer._metrics["train"]
    rows = trains.nonzero().flatten()
    lengths = torch.cat([p.lengths for p in parts])[rows]
    truncated = torch.cat([p.truncated for p in parts])[rows]
    terminated = lengths[~truncated] if (~truncated).any() else torch.zeros(1)
    for name, values in (("", lengths), ("terminated_", terminated)):
        for stat in ("mean", "min", "max"):
            metrics[f"completions/{stat}_{name}length"].append(getattr(values, stat)().item())
    metrics["completions/clipped_ratio"].append(truncated.float().mean().item())
    prompt_tokens = trainer._global_sum(batch["prompt_mask"][keep].sum().double()).item()
    trainer.state.num_input_tokens_seen += int(prompt_tokens + lengths.sum().item())
    metrics["num_tokens"] = [trainer.state.num_input_tokens_seen]

    rewards_per_func = torch.cat([p.rewards_per_func for p in parts])
    totals = torch.cat([p.rewards for p in parts])
    for i, name in enumerate(trainer.reward_func_names):
        metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[rows, i]).item())
        metrics[f"rewards/{name}/std"].append(nanstd(rewards_per_func[rows, i]).item())
    metrics["reward"].append(torch.nanmean(totals[rows]).item())
    metrics["reward_std"].append(nanstd(totals[rows]).item())
    prompts = torch.cat([p.prompts for p in parts])
    group_std = group_reward_std(prompts, totals, trainer.num_prompts_per_generation)
    metrics["frac_reward_zero_std"].append((group_std[prompts[rows]] == 0).float().mean().item())
    log_sampling_metrics(trainer, select_rows(batch, keep) if keep.numel() else None)

    picked = rows.tolist()
    for key in ("prompt", "completion"):
        values = [v for p in parts for v in p.logged[key]]
        trainer._logs[key].extend(values[i] for i in picked)
    for i, name in enumerate(trainer.reward_func_names):
        trainer._logs["rewards"][name].extend(rewards_per_func[rows, i].tolist())
    trainer._logs["advantages"].extend(advantages[rows].tolist())
    for column in sorted({column for p in parts for column in p.logged["extra"]}):
        values = [v for p in parts for v in p.logged["extra"].get(column, [None] * len(p.prompts))]
        trainer._logs["extra"][column].extend(values[i] for i in picked)
    phases = [p.phase for p in parts for _ in range(len(p.prompts))]
    trainer._logs["extra"]["gvm_phase"].extend(phases[i] for i in picked)


@mirrors(f"{GRPO}._generate_and_score_completions", "2860-2896 of 2324-2936", "1fa48922792dcd5c",
         "vLLM's sampling metrics; TRL logs them per generation call, these cover the training rows")
def log_sampling_metrics(trainer, batch: dict | None) -> None:
    """vLLM's sampling metrics over the training rows."""
    if not (trainer.use_vllm and trainer.vllm_importance_sampling_correction):
        return
    device, metrics = trainer.accelerator.device, trainer._metrics["train"]
    delta = ratio = torch.zeros(0, device=device)
    if batch is not None:
        mask = batch["completion_mask"].bool()
        delta = torch.abs(batch["old_per_token_logps"] - batch["sampling_per_token_logps"])
        delta = delta[mask & ~torch.isnan(delta)]
        is_ratio = batch["importance_sampling_ratio"]
        ratio = is_ratio.flatten() if is_ratio.size(1) == 1 else is_ratio[mask]
    zero, nan = torch.tensor(0.0, device=device), torch.tensor(float("nan"), device=device)
    mean_delta, max_delta = (delta.mean(), delta.max()) if delta.numel() else (zero, zero)
    metrics["sampling/sampling_logp_difference/mean"].append(trainer.accelerator.gather(mean_delta).mean().item())
    metrics["sampling/sampling_logp_difference/max"].append(trainer.accelerator.gather(max_delta).max().item())
    low, mean, high = (ratio.min(), ratio.mean(), ratio.max()) if ratio.numel() else (nan, nan, nan)
    metrics["sampling/importance_sampling_ratio/min"].append(nanmin(trainer.accelerator.gather(low)).item())
    metrics["sampling/importance_sampling_ratio/mean"].append(trainer.accelerator.gather(mean).nanmean().item())
    metrics["sampling/importance_sampling_ratio/max"].append(nanmax(trainer.accelerator.gather(high)).item())


UNSUPPORTED_ARGUMENTS = ("tools", "environment_factory", "rollout_func")


def refuse_unsupported_arguments(trainer_kwargs: dict) -> None:
    """Refuse, by name, the `trl.GRPOTrainer` arguments the GVM trainers do not support (before TRL reads them)."""
    for name in UNSUPPORTED_ARGUMENTS:
        if trainer_kwargs.get(name):
            refuse(name)


def check_supported(trainer) -> None:
    """Refuse, by name, what the GVM trainers do not support (read from the built `trl.GRPOTrainer`)."""
    unsupported = {
        "tools": bool(trainer.tools),
        "environment_factory": trainer.environment_factories is not None,
        "rollout_func": trainer.rollout_func is not None,
        "a vision-language model": trainer._is_vlm,
    }
    for name, present in unsupported.items():
        if present:
            refuse(name)
    if trainer._dist.is_zero3 and not trainer.args.ds3_gather_for_generation and trainer.args.gvm_allocation == "gvm":
        # The norm hooks read the measured parameters whole; ZeRO-3's layer-by-layer gathering frees them first.
        raise NotImplementedError(
            "GVM's gradient-norm pass needs ZeRO-3 parameters gathered as for generation: set "
            "ds3_gather_for_generation=True (TRL's default), or gvm_allocation='uniform'."
        )


def refuse(feature: str) -> None:
    raise NotImplementedError(
        f"The GVM trainers do not support {feature} (see the README's 'Not supported'); use trl.GRPOTrainer for it."
    )
