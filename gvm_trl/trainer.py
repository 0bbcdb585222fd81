"""`GVMGRPOTrainer` and `GVMRAFTTrainer`: TRL's GRPO trainer with GVM's rollout allocation.

Yao et al. 2025, "Optimizing Chain-of-Thought Reasoners via Gradient Variance Minimization in Rejection Sampling
and RL" (arXiv:2505.02391). Each generation batch of m prompts (:meth:`_GVMTrainer._generate_training_batch`):

1. Probe (Algorithm 2, lines 3-4): N′ completions per prompt through TRL's own generation path, scored by the reward
   functions (`gvm_trl.schedules`).
2. Estimate: accept rate p_i; G_i = mean per-sample gradient norm ‖∇ ln P(y|x)‖ of the accepted probes
   (:func:`gvm_trl.grad_norms.per_sample_grad_norms`), optionally combined with the prompt's history
   (:class:`gvm_trl.estimates.PromptHistory`).
3. Allocate (Theorem 3): n_i from :func:`gvm_trl.planner.plan_allocation`, Σ n_i = N.
4. Generate: n_i completions for prompt i. With ``gvm_probe_ahead`` the next batch's probes are drawn in the same
   generation call, under the same weights, so each batch costs one generation round; its estimates are then one
   update old and its reused probes are corrected by TRL's importance ratio.
5. Weight (Lemma 1 / Algorithm 1, `gvm_trl.weighting`): the per-row weight ω_r (1/(n_i p_i), 1/|D_i| or 1) enters
   through the advantage. Every loss TRL offers is positively homogeneous in the advantage — PPO's clipped
   objective min(ρ·ωA, clip(ρ)·ωA) = ω·min(ρA, clip(ρ)A) for ω > 0, and CISPO, SAPO, VESPO and the off-policy mask
   depend on A through its sign or linearly — so ω·A weights each row's policy term by ω.
6. Update: TRL's `_compute_loss`, unchanged (every loss type, the KL term, the entropy bonus, the MoE auxiliary
   loss). The weights are rescaled to mean 1 over the generation batch's loss tokens (rows, for sequence-level
   losses), so the loss keeps TRL's scale; the KL and entropy terms are TRL's, unweighted.

With ``gvm_allocation="uniform"`` there is no probe round: one generation round of N′ + N/m completions per prompt,
and with ``gvm_weighting="none"`` the trainers compute exactly what `trl.GRPOTrainer` computes (GRPO) or RAFT++.
Every override that mirrors TRL code or swaps TRL's private state is tagged in `gvm_trl.trl_compat`.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import torch
from accelerate.utils import gather, gather_object
from datasets import IterableDataset
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer

from .advantages import grpo_advantages
from .batching import as_filler, build_micro_batches, select_rows
from .config import GVMArguments, GVMGRPOConfig, GVMRAFTConfig
from .estimates import PromptHistory
from .grad_norms import plan_per_sample_grad_norms
from .measurement import (
    attach_sampling_logps,
    folds_sampling_logps,
    probe_grad_norms,
    probe_grad_norms_and_sampling_logps,
)
from .metrics import ALLOCATIONS_FILE, GVM_PAPER, AllocationLog, StageTimer, allocation_metrics, model_card_section
from .rollout import GenerationBatchSampler, Rollout, concat_rollout_batches
from .schedules import BatchRollouts, ProbeAheadSchedule, resolve_probe_ahead, schedule_for
from .state import STATE_FILE, GVMState, checkpoint_step, last_complete_checkpoint
from .trl_compat import (
    GRPO,
    UNSUPPORTED_ARGUMENTS,
    captured_call_logs,
    check_supported,
    generation_group_size,
    log_training_rows,
    mirrors,
    refuse,
    resized_completion_logs,
)
from .weighting import SEQUENCE_LEVEL_LOSSES, per_prompt_sums, prompt_weights, weight_scale

__all__ = ["ALLOCATIONS_FILE", "STATE_FILE", "GVMGRPOTrainer", "GVMRAFTTrainer", "last_complete_checkpoint"]

class _GVMTrainer(GRPOTrainer):
    """Shared machinery of the two GVM trainers; subclasses choose training rows and advantages."""

    config_class: type[GVMArguments] = GVMGRPOConfig
    _tag_names = ["trl", "gvm"]
    _paper = GVM_PAPER

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None, *trainer_args, **trainer_kwargs):
        args = self._checked_args(model, args, trainer_kwargs)
        iterable = isinstance(train_dataset, IterableDataset)
        probe_ahead = resolve_probe_ahead(args, iterable)
        super().__init__(model, reward_funcs, args, train_dataset, *trainer_args, **trainer_kwargs)
        check_supported(self)
        if args.gvm_allocation == "gvm" and args.gvm_grad_norms == "measured":  # a bad selection fails here, not at the first batch; the generic rule warns
            self.grad_norm_plan = plan_per_sample_grad_norms(
                self.accelerator.unwrap_model(self.model), args.gvm_grad_params, setting="gvm_grad_params"
            )
        decay = 0.0 if iterable else args.gvm_history_decay_in_use
        self.gvm_state = GVMState(prompt_history=PromptHistory(decay) if decay else None)
        self.stage_timer = StageTimer(self.gvm_state.rollout_totals)
        self.schedule = schedule_for(self, probe_ahead)
        self.allocation_log = AllocationLog(args.output_dir)
        self._warned: set[str] = set()
        self._user_metric_names: set[str] = set()
        self._unfilled_old_logps: torch.Tensor | None = None
        self._prepared: tuple[int, Any] | None = None
        capacity = args.num_prompts_per_generation * args.gvm_num_probes + args.gvm_budget
        self._logs = resized_completion_logs(self._logs, capacity)

    def _checked_args(self, model, args, trainer_kwargs) -> GVMArguments:
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = self.config_class(output_dir=f"{str(model_name).split('/')[-1]}-{self._name}")
        if not isinstance(args, GVMArguments):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(args).__name__}: "
                f"build the config with {self.config_class.__name__}(...) to get the gvm_* fields."
            )
        if args.beta != 0.0 and not isinstance(model, str) and not model.config._name_or_path:
            if trainer_kwargs.get("peft_config") is None and not hasattr(model, "peft_config"):
                raise ValueError(
                    f"beta={args.beta} needs a reference model, which TRL loads from the policy's name or path, but "
                    "this in-memory model has none: save it (model.save_pretrained(path)) and pass the path, or set "
                    "beta=0.0."
                )
        for name in UNSUPPORTED_ARGUMENTS:  # refused before TRL validates them
            if trainer_kwargs.get(name):
                refuse(name)
        return args

    @property
    def num_prompts_per_generation(self) -> int:
        return self.args.num_prompts_per_generation

    @property
    def rollout_totals(self) -> dict[str, float]:
        """Completions generated (``probe_completions``, ``budget_completions``) and seconds per stage, this run."""
        return self.gvm_state.rollout_totals

    @property
    def prompt_history(self) -> PromptHistory | None:
        return self.gvm_state.prompt_history

    @property
    def _probe_ahead(self) -> bool:
        return isinstance(self.schedule, ProbeAheadSchedule)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer.train; ``resume_from_checkpoint=True`` picks the last *complete* checkpoint in `output_dir`.

        Trainer picks the highest-numbered one, which after a crash during saving may lack its state files.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        self.schedule.reset()  # a resumed run probes its first batch again
        self._prepared = None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # -- the prompts: TRL's order, each prompt's dataset index known ---------------------------------------------

    def _get_train_sampler(self, dataset=None):
        """TRL's sampler order and layout (each prompt `num_generations` times), remembered for looking ahead."""
        self._prompt_sampler = GenerationBatchSampler(
            dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
        )
        return self._prompt_sampler

    def _dataset_row(self, index: int) -> dict:
        """Training row `index` as the dataloader delivers it."""
        if getattr(self, "_rows", None) is None:
            self._rows = self._remove_unused_columns(self.train_dataset, description="Training")
        return self._rows[index]

    def _prompt_keys(self, all_prompts: list[dict]) -> list[int]:
        """Each prompt's dataset index (for an iterable dataset: its position in the stream the trainer consumed),
        found from the sampler's order, so no extra column reaches TRL, reward functions or callbacks."""
        if getattr(self, "_prompt_sampler", None) is None:
            first = self._generation_batches_done() * len(all_prompts)
            return list(range(first, first + len(all_prompts)))
        return self._prompt_sampler.indices_of(all_prompts, self._dataset_row)

    def _upcoming_prompts(self, keys: list[int]) -> tuple[list[dict], list[int]]:
        """This process's share of the next generation batch's prompts and every process's keys (none: empty)."""
        rank, processes = self.accelerator.process_index, self.accelerator.num_processes
        rows, following = self._prompt_sampler.upcoming(keys, rank, processes, self._dataset_row)
        return (self.data_collator(rows) if rows else []), following

    def _micro_steps_done(self) -> int:
        accumulation = self.args.gradient_accumulation_steps
        return self.state.global_step * accumulation + self._step % accumulation

    def _generation_batches_done(self) -> int:
        return self._micro_steps_done() // (self.args.steps_per_generation * self.num_iterations)

    def _is_last_generation_batch(self) -> bool:
        remaining = self.state.max_steps * self.args.gradient_accumulation_steps - self._micro_steps_done()
        return remaining <= self.args.steps_per_generation * self.num_iterations

    # -- one generation batch: Algorithm 2 -------------------------------------------------------------------------

    def _generate_training_batch(self, prompts: list[dict]) -> dict[str, Any]:
        """This process's training rows of one generation batch: probe, estimate, allocate and generate (the
        schedule), then weight."""
        all_prompts = gather_object(prompts) if self.accelerator.num_processes > 1 else prompts
        rollouts = self.schedule.rollouts(prompts, self._prompt_keys(all_prompts), all_prompts)
        return self._assemble(rollouts)

    @mirrors(f"{GRPO}._prepare_inputs", "1521-1551", "f824e7fb07147956",
             "generate every steps_per_generation × num_iterations micro-steps, buffer, hand out one slice per step")
    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        if self._prepared is not None and self._prepared[0] == self._step:  # asked twice by `training_step`
            return self._prepared[1]
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            prompts = generation_batch[:: self.num_generations]  # TRL's layout repeats each prompt
            self._buffered_inputs = self._build_micro_batches(self._generate_training_batch(prompts))
        self._prepared = (self._step, self._buffered_inputs[self._step % self.args.steps_per_generation])
        return self._prepared[1]

    @mirrors(f"{GRPO}.training_step", "1510-1519", "9e18632f7dd8e8d8",
             "a skipped micro-step still counts `_step` and logs TRL's step_time, with no backward")
    def training_step(self, model, inputs, num_items_in_batch=None):
        start = time.perf_counter()
        model.train()  # as Trainer.training_step does first: `_prepare_inputs` reads the mode
        skip = self._prepare_inputs(inputs).get("gvm_skip")  # generates here when a generation batch starts
        self._current_train_step_time += time.perf_counter() - start  # TRL's step time includes generation
        if not skip:
            return super().training_step(model, inputs, num_items_in_batch)  # TRL times the rest
        # Nothing was accepted in this generation batch: no backward, so the optimizer sees no gradient and leaves
        # the weights (and its moments) unchanged. Every process skips together.
        self._step += 1
        if self._step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["step_time"].append(self._current_train_step_time)
            self._current_train_step_time = 0.0
        return torch.zeros((), device=self.accelerator.device)

    def _build_micro_batches(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        steps = self.args.steps_per_generation
        if batch.get("gvm_skip"):
            return [{"gvm_skip": True}] * steps

        def max_over_processes(sizes: torch.Tensor) -> torch.Tensor:
            if self.accelerator.num_processes == 1:
                return sizes
            return gather(sizes.to(self.accelerator.device)).view(-1, steps).max(dim=0).values

        sequence_level = self.loss_type in SEQUENCE_LEVEL_LOSSES
        return build_micro_batches(batch, steps, self._pad_values(), sequence_level, max_over_processes)

    # -- TRL's generation, one call ----------------------------------------------------------------------------------

    @mirrors(f"{GRPO}._generate", "2193-2322", "2a27fdf8f5e6f356",
             "completion lengths and truncation as TRL's `completions/*` metrics define them (lines 2295-2310)")
    def _generate(self, prompts: list):
        """TRL's generation; keeps each completion's length and truncation for the training-row metrics."""
        output = super()._generate(prompts)
        completion_ids = output[1]
        eos_and_pad = [*self.eos_token_ids, self._tokenizer.pad_token_id]
        truncated = [bool(ids) and ids[-1] not in eos_and_pad for ids in completion_ids]
        lengths = torch.tensor([len(ids) for ids in completion_ids], dtype=torch.float)
        self._completion_stats = (lengths, torch.tensor(truncated))
        return output

    def _generate_rollout(self, rows: list[dict], group_size: int, prompts: torch.Tensor, phase: str) -> Rollout:
        """TRL's generate-and-score for `rows` (`group_size` consecutive rows per prompt), with every process's
        per-row facts; `prompts` holds each global row's prompt slot (-1: padding)."""
        step = self.state.global_step
        with generation_group_size(self, group_size), captured_call_logs(self, self._user_metric_names) as logged:
            batch = super()._generate_and_score_completions(rows)
            lengths, truncated = self._completion_stats
        names = self.reward_func_names
        rewards_per_func = torch.tensor([logged["rewards"][name] for name in names], dtype=torch.float32)
        rewards_per_func = rewards_per_func.T.reshape(len(prompts), len(names))
        rewards = (rewards_per_func * self.reward_weights.cpu()).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1) | (prompts < 0)] = torch.nan
        if self.accelerator.num_processes > 1:
            lengths = gather(lengths.to(self.accelerator.device)).cpu()
            truncated = gather(truncated.to(self.accelerator.device)).cpu()
        scored = rewards[~torch.isnan(rewards)]
        if scored.numel():
            self.gvm_state.note_rewards(scored.min().item(), scored.max().item())
        logged = {key: value for key, value in logged.items() if key != "images"}
        return Rollout(batch, prompts, rewards_per_func, rewards, lengths, truncated, logged, step, phase,
                       self.accelerator.num_processes)

    def _log_metric(self, name: str, value: float):
        self._user_metric_names.add(name)
        super()._log_metric(name, value)

    # -- estimates: acceptance and the gradient-norm pass ----------------------------------------------------------

    def _accepted(self, rollout: Rollout) -> torch.Tensor:
        return (rollout.rewards >= self.args.gvm_accept_threshold) & (rollout.prompts >= 0)

    def _probe_grad_norms(self, probes: Rollout, accepted: torch.Tensor, sampling_logps: bool = False) -> torch.Tensor:
        """The accepted probes' norms; with `sampling_logps`, the same forward attaches the old log-probabilities
        of the probes that train (only where `_folds_sampling_logps` holds)."""
        if sampling_logps:
            return probe_grad_norms_and_sampling_logps(self, probes, accepted)
        return probe_grad_norms(self, probes, accepted)

    def _folds_sampling_logps(self, probes: Rollout) -> bool:
        return folds_sampling_logps(self, probes, self._accepted(probes))

    def _attach_sampling_logps(self, probes: Rollout) -> None:
        attach_sampling_logps(self, probes)

    # -- weight: the training rows, advantages and Lemma 1 weights ---------------------------------------------------

    def _assemble(self, rollouts: BatchRollouts) -> dict[str, Any]:
        """Training rows, advantages and weights of one generation batch (this process's share)."""
        reused = rollouts.probes if self.args.gvm_reuse_probes else None
        parts = [p for p in (reused, rollouts.allocated) if p is not None]
        prompts = torch.cat([p.prompts for p in parts])
        accepted = torch.cat([self._accepted(p) for p in parts])
        advantages, trains = self._advantages(parts, prompts, accepted)
        weights = self._row_weights(rollouts, prompts, accepted, trains)
        empty = not trains.any()
        self._log_allocation(rollouts, empty)
        if empty:
            self._note_empty_batch()
            return {"gvm_skip": True}
        self.gvm_state.consecutive_empty = 0

        local = self._local_rows(parts)
        batch = concat_rollout_batches([p.batch for p in parts], self._pad_values())
        keep = trains[local].nonzero().flatten()
        tokens = batch["completion_mask"].sum(dim=1).cpu()
        if self.args.gvm_weighting != "none":  # every ω_r = 1 otherwise: exactly TRL's loss
            sequence_level = self.loss_type in SEQUENCE_LEVEL_LOSSES
            weights = weights * weight_scale(weights[local][keep], tokens[keep].double(), sequence_level,
                                             self._global_sum)
        effective = (advantages.double() * weights).float()
        batch["advantages"] = effective[local].to(self.accelerator.device)
        batch["gvm_weight"] = weights[local].float().to(self.accelerator.device)  # for inspection; TRL ignores it
        log_training_rows(self, parts, trains, effective, batch, keep)
        # A process with nothing to train on keeps one row as a filler to copy.
        batch = as_filler(select_rows(batch, [0])) if keep.numel() == 0 else select_rows(batch, keep)
        batch["num_items_in_batch"] = self._global_sum(tokens[keep].sum()).to(self.accelerator.device)
        return batch

    def _row_weights(self, rollouts, prompts, accepted, trains) -> torch.Tensor:
        """Each training row's per-prompt weight (0 for rows that do not train)."""
        num_prompts = self.num_prompts_per_generation
        drawn = per_prompt_sums(torch.ones(len(prompts)), prompts, num_prompts)
        accepted_count = per_prompt_sums(accepted.double(), prompts, num_prompts)
        planned_rates = rollouts.allocation.accept_rates
        weights = prompt_weights(self.args.gvm_weighting, planned_rates, drawn, accepted_count)[prompts.clamp(min=0)]
        return torch.where(trains, weights, torch.zeros_like(weights))

    def _local_rows(self, parts: list[Rollout]) -> torch.Tensor:
        """Global row indices (into the parts' concatenation) of this process's rows, in local order."""
        rank, offset, rows = self.accelerator.process_index, 0, []
        for part in parts:
            rows.append(offset + torch.arange(len(part.prompts))[part.local_rows(rank)])
            offset += len(part.prompts)
        return torch.cat(rows)

    def _advantages(self, parts, prompts, accepted) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row advantages and which rows train, over the whole generation batch (all processes)."""
        raise NotImplementedError

    def _trains(self, rollout: Rollout) -> torch.Tensor:
        """Which rows of `rollout` (all processes) will be trained on."""
        raise NotImplementedError

    def _global_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return value.cpu()
        return self.accelerator.reduce(value.to(self.accelerator.device), reduction="sum").cpu()

    def _pad_values(self) -> dict[str, float]:
        return {"prompt_ids": self._tokenizer.pad_token_id, "completion_ids": self._tokenizer.pad_token_id}

    # -- the loss: TRL's, with on-policy rows' old log-probabilities filled in -------------------------------------

    @mirrors(f"{GRPO}._compute_loss", "3020-3290", "80295546bbdbf6f7",
             "it computes the current log-probabilities before it reads `old_per_token_logps` (lines 3065-3066)")
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss. Rows whose old log-probabilities are NaN were drawn by the current weights, next to reused
        probes drawn by earlier ones: they get the current log-probabilities (detached), as TRL treats every row
        when it skips computing old log-probabilities."""
        old = inputs.get("old_per_token_logps") if self.model.training else None
        self._unfilled_old_logps = old if old is not None and torch.isnan(old).any() else None
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._unfilled_old_logps = None

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        old, self._unfilled_old_logps = self._unfilled_old_logps, None
        if old is not None:
            rows = torch.isnan(old).any(dim=1)
            old[rows] = logps[rows].detach().to(old.dtype)
        return logps, entropies, aux_loss

    # -- what the user sees ----------------------------------------------------------------------------------------

    def _log_allocation(self, rollouts: BatchRollouts, empty: bool) -> None:
        """The batch's `gvm/` metrics and its line of the allocation log."""
        allocation, metrics = rollouts.allocation, self._metrics["train"]
        reused = self.args.gvm_num_probes if self.args.gvm_reuse_probes else 0
        values = allocation_metrics(allocation, rollouts.timings, reused, self.args.gvm_alpha, self.args.gvm_beta)
        for name, value in values.items():
            metrics[name].append(value)
        metrics["gvm/empty_batches"] = [float(self.gvm_state.empty_batches + empty)]  # running count: its last value
        if allocation.probe_step is not None:
            metrics["gvm/probe_age"].append(float(self.state.global_step - allocation.probe_step))
        if self.accelerator.is_main_process:
            self.allocation_log.append(allocation.log_line(self.state.global_step, rollouts.allocated_accepted))

    def _note_empty_batch(self) -> None:
        """A generation batch with nothing to train on (RAFT++: nothing accepted): warn once, stop after K in a row."""
        message = self.gvm_state.note_empty_batch(type(self).__name__, self.args)
        self._warn_once("empty", message)

    def _warn_no_accepted_probe(self) -> None:
        self._warn_once("fallback", self.gvm_state.fallback_message(type(self).__name__, self.args))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # -- checkpoints and the model card ----------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            step_folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            self.gvm_state.save(os.path.join(self._get_output_dir(trial=trial), step_folder))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        self.gvm_state.load(checkpoint)
        if self.accelerator.is_main_process:  # the resumed run logs the steps after the checkpoint again
            self.allocation_log.truncate_from(checkpoint_step(checkpoint))

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card, plus the GVM settings this model was trained with."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        fields = {name: getattr(self.args, name) for name in vars(self.args) if name.startswith("gvm_")}
        fields["gvm_history_decay"] = self.prompt_history.decay if self.prompt_history is not None else 0.0
        with open(os.path.join(self.args.output_dir, "README.md"), "a", encoding="utf-8") as handle:
            handle.write(model_card_section(type(self).__name__, fields, GVM_PAPER["id"]))


class GVMGRPOTrainer(_GVMTrainer):
    r"""
    GRPO with GVM's rollout allocation (Yao et al. 2025, arXiv:2505.02391, Algorithm 2 and Theorem 3).

    A drop-in replacement for [`~trl.GRPOTrainer`] taking a [`GVMGRPOConfig`]. Each generation batch draws N′ probes
    per prompt, measures accept rates p_i and per-sample gradient norms G_i, allocates N = `gvm_budget_per_prompt`·m
    completions by Theorem 3 (n_i ∝ G_i / sqrt(p_i + α/p_i^(β-1))), generates them, and trains on the group-normalised
    advantages of each prompt's own group (its allocated completions plus, with `gvm_reuse_probes`, its probes),
    each row weighted per `gvm_weighting` (Lemma 1's 1/(n_i p_i), by default with the pooled p_i = |D_i|/n_i)
    through TRL's own loss (any `loss_type`). It never skips an update: when no probe is accepted the budget is split
    uniformly and the batch trains as GRPO does.
    """

    config_class = GVMGRPOConfig
    _name = "GVM-GRPO"

    def _trains(self, rollout):
        return rollout.prompts >= 0

    def _advantages(self, parts, prompts, accepted):
        if len(parts) == 1 and self.args.gvm_allocation == "uniform":
            # One round grouped exactly as TRL groups it: TRL's own advantages (all processes, as it logged them).
            return torch.tensor(parts[0].logged["advantages"], dtype=torch.float32), prompts >= 0
        rewards_per_func = torch.cat([p.rewards_per_func for p in parts])
        rewards_per_func[prompts < 0] = torch.nan
        advantages = grpo_advantages(
            rewards_per_func,
            self.reward_weights.cpu(),
            prompts.clamp(min=0),
            self.num_prompts_per_generation,
            scale=self.scale_rewards,
            aggregation=self.multi_objective_aggregation,
        )
        return advantages, prompts >= 0


class GVMRAFTTrainer(_GVMTrainer):
    r"""
    RAFT++ with GVM's rollout allocation (Yao et al. 2025, arXiv:2505.02391, Algorithms 1-2, Theorem 3, Lemma 1).

    Rejection sampling: only accepted completions (reward ≥ `gvm_accept_threshold`) are trained on, with advantage
    = reward clipped at 0, the clipped importance ratio π_θ/π_old (`epsilon`, `epsilon_high`), the k3 KL penalty to
    the reference model (`beta`, 0.001 by default) and token-mean aggregation, each sample weighted by 1/(n_i p_i)
    (Lemma 1, eq. (4)) or 1/|D_i| (Algorithm 1). When nothing is accepted in a generation batch its update is
    skipped (`gvm/empty_batches`), with a warning the first time and an error after `gvm_max_empty_batches` in a row.
    """

    config_class = GVMRAFTConfig
    _name = "GVM-RAFT++"

    def _trains(self, rollout):
        return self._accepted(rollout)

    def _advantages(self, parts, prompts, accepted):
        rewards = torch.cat([p.rewards for p in parts])
        return torch.nan_to_num(rewards, nan=0.0).clamp(min=0.0), accepted
