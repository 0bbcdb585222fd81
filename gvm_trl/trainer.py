"""`GVMGRPOTrainer` and `GVMRAFTTrainer`: TRL's GRPO trainer with GVM's rollout allocation.

Yao et al. 2025, "Optimizing Chain-of-Thought Reasoners via Gradient Variance Minimization in Rejection Sampling
and RL" (arXiv:2505.02391). Each generation batch of m prompts (:meth:`_GVMTrainer.build_generation_batch`):

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
The schedule reaches the trainer through the five methods of its port (`gvm_trl.schedules.RolloutPort`); every
override that mirrors TRL code or writes TRL's private state is tagged in `gvm_trl.trl_compat`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from accelerate.utils import gather, gather_object
from datasets import IterableDataset
from trl import GRPOTrainer

from .advantages import grpo_advantages
from .batching import as_filler, build_micro_batches, select_rows
from .config import GVMArguments, GVMGRPOConfig, GVMRAFTConfig, check_prompts, check_train_dataset, dataset_settings
from .config import trainer_config
from .estimates import PromptHistory
from .grad_norms import plan_per_sample_grad_norms
from .measurement import MeasurementContext, folds_old_logps, grad_norms, grad_norms_and_old_logps, old_logps
from .metrics import ALLOCATIONS_FILE, GVM_PAPER, AllocationLog, StageTimer, allocation_metrics, model_card_section
from .planner import unspent_budget_warning
from .rollout import (
    GenerationBatchSampler,
    Rollout,
    accepted_rows,
    concat_rollout_batches,
    local_row_index,
    nonfinite_reward_warnings,
    total_rewards,
)
from .schedules import BatchRollouts, ScheduleSettings, build_schedule
from .state import STATE_FILE, GVMState, checkpoint_step, is_checkpoint_folder, last_complete_checkpoint
from .state import resume_checkpoint
from .trl_compat import (
    GRPO,
    append_metrics,
    captured_call_logs,
    check_supported,
    generation_group_size,
    generation_batches_done,
    generation_timed_as_step,
    is_last_generation_batch,
    is_sequence_level,
    log_training_rows,
    mirrors,
    refuse_unsupported_arguments,
    resize_completion_logs,
    skip_micro_step,
)
from .weighting import row_weights, weight_scale

__all__ = ["ALLOCATIONS_FILE", "STATE_FILE", "GVMGRPOTrainer", "GVMRAFTTrainer", "last_complete_checkpoint"]


class _GVMTrainer(GRPOTrainer):
    """Shared machinery of the two GVM trainers; subclasses choose training rows and advantages."""

    config_class: type[GVMArguments] = GVMGRPOConfig
    _tag_names = ["trl", "gvm"]
    _paper = GVM_PAPER

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None, *trainer_args, **trainer_kwargs):
        args = trainer_config(self.config_class, args, model, self._name, trainer_kwargs.get("peft_config") is not None)
        refuse_unsupported_arguments(trainer_kwargs)  # before TRL validates them
        check_train_dataset(args, train_dataset)
        probe_ahead, history_decay = dataset_settings(args, isinstance(train_dataset, IterableDataset))
        super().__init__(model, reward_funcs, args, train_dataset, *trainer_args, **trainer_kwargs)
        check_supported(self)
        settings = ScheduleSettings.from_config(args, self.accelerator.process_index, self.accelerator.num_processes)
        if settings.rule.needs_grad_norms:  # a bad selection fails here, not at the first batch; the generic rule warns
            self.grad_norm_plan = plan_per_sample_grad_norms(
                self.accelerator.unwrap_model(self.model), args.gvm_grad_params, setting="gvm_grad_params"
            )
        self.gvm_state = GVMState(prompt_history=PromptHistory(history_decay) if history_decay else None)
        self.stage_timer = StageTimer(self.gvm_state.rollout_totals)
        self.schedule = build_schedule(self, settings, self.stage_timer, self.gvm_state.prompt_history, probe_ahead)
        self.allocation_log = AllocationLog(args.output_dir)
        self._warned: set[str] = set()
        self._user_metric_names: set[str] = set()
        self._unfilled_old_logps: torch.Tensor | None = None
        self._prepared: tuple[int, Any] | None = None
        resize_completion_logs(self, args.gvm_completions_per_batch)

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

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer.train. ``resume_from_checkpoint=True`` picks the newest *complete* checkpoint in `output_dir`, a
        path must hold its GVM state (`gvm_trl.state.resume_checkpoint`), and a fresh run keeps an earlier run's
        allocation log aside instead of appending to it."""
        checkpoint = resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if self.accelerator.is_main_process:
            self.allocation_log.start(None if checkpoint is None else checkpoint_step(checkpoint))
        self.schedule.reset()  # a resumed run probes its first batch again
        self._prepared = None
        return super().train(checkpoint, *args, **kwargs)

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
            first = generation_batches_done(self) * len(all_prompts)
            return list(range(first, first + len(all_prompts)))
        return self._prompt_sampler.indices_of(all_prompts, self._dataset_row)

    # -- one generation batch: Algorithm 2 -------------------------------------------------------------------------

    def build_generation_batch(self, prompts: list[dict], keys: list[int] | None = None) -> dict[str, Any]:
        """This process's training rows of one generation batch: probe, estimate, allocate and generate (the
        schedule), then advantages and Lemma 1's weights. `prompts`: this process's distinct prompts; `keys`: every
        process's prompts' dataset indices (default: found in the sampler's order, as training finds them)."""
        check_prompts(prompts)
        all_prompts = gather_object(prompts) if self.accelerator.num_processes > 1 else prompts
        keys = self._prompt_keys(all_prompts) if keys is None else keys
        return self._assemble(self.schedule.rollouts(prompts, keys, all_prompts))

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
            self._buffered_inputs = self._build_micro_batches(self.build_generation_batch(prompts))
        self._prepared = (self._step, self._buffered_inputs[self._step % self.args.steps_per_generation])
        return self._prepared[1]

    def training_step(self, model, inputs, num_items_in_batch=None):
        with generation_timed_as_step(self):  # TRL's step time includes generation
            model.train()  # as Trainer.training_step does first: `_prepare_inputs` reads the mode
            skip = self._prepare_inputs(inputs).get("gvm_skip")  # generates here when a generation batch starts
        if skip:  # nothing accepted in this generation batch: no backward on any process, the weights stay
            return skip_micro_step(self)
        return super().training_step(model, inputs, num_items_in_batch)  # TRL times the rest

    def _build_micro_batches(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        steps = self.args.steps_per_generation
        if batch.get("gvm_skip"):
            return [{"gvm_skip": True}] * steps

        def max_over_processes(sizes: torch.Tensor) -> torch.Tensor:
            if self.accelerator.num_processes == 1:
                return sizes
            return gather(sizes.to(self.accelerator.device)).view(-1, steps).max(dim=0).values

        return build_micro_batches(batch, steps, self._pad_values(), is_sequence_level(self.loss_type),
                                   max_over_processes)

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

    def _log_metric(self, name: str, value: float):
        self._user_metric_names.add(name)
        super()._log_metric(name, value)

    # -- the schedule's port (`gvm_trl.schedules.RolloutPort`) ----------------------------------------------------

    def generate_rollout(self, rows: list[dict], group_size: int, prompts: torch.Tensor, phase: str) -> Rollout:
        """TRL's generate-and-score for `rows` (`group_size` consecutive rows per prompt), with every process's
        per-row facts; `prompts` holds each global row's prompt slot (-1: padding)."""
        with generation_group_size(self, group_size), captured_call_logs(self, self._user_metric_names) as logged:
            batch = super()._generate_and_score_completions(rows)
            lengths, truncated = self._completion_stats
        rewards_per_func, rewards = total_rewards(logged["rewards"], self.reward_func_names, self.reward_weights,
                                                  prompts)
        for name, message in nonfinite_reward_warnings(rewards_per_func, self.reward_func_names).items():
            self._warn_once(f"nonfinite:{name}", message)
        if self.accelerator.num_processes > 1:
            lengths = gather(lengths.to(self.accelerator.device)).cpu()
            truncated = gather(truncated.to(self.accelerator.device)).cpu()
        scored = rewards[torch.isfinite(rewards)]
        if scored.numel():
            self.gvm_state.note_rewards(scored.min().item(), scored.max().item())
        accepted = accepted_rows(rewards, prompts, self.args.gvm_accept_threshold)
        logged = {key: value for key, value in logged.items() if key != "images"}
        return Rollout(batch, prompts, rewards_per_func, rewards, accepted, self._trains(prompts, accepted), lengths,
                       truncated, logged, self.state.global_step, phase, self.accelerator.num_processes)

    def probe_grad_norms(self, probes: Rollout, *, with_old_logps: bool = False) -> torch.Tensor:
        if not with_old_logps:
            return grad_norms(self._measurement_context(), probes)
        norms, probes.batch["old_per_token_logps"] = grad_norms_and_old_logps(self._measurement_context(), probes)
        return norms

    def folds_old_logps(self, probes: Rollout) -> bool:
        return folds_old_logps(self._measurement_context(), probes)

    def attach_old_logps(self, probes: Rollout) -> None:
        logps = old_logps(self._measurement_context(), probes)
        if logps is not None:  # (None: TRL computed them itself)
            probes.batch["old_per_token_logps"] = logps

    def upcoming_prompts(self, keys: list[int]) -> tuple[list[dict], list[int]]:
        rows, following = [], []
        if not is_last_generation_batch(self):
            rank, processes = self.accelerator.process_index, self.accelerator.num_processes
            rows, following = self._prompt_sampler.upcoming(keys, rank, processes, self._dataset_row)
        if self.accelerator.num_processes > 1 and not all(gather_object([bool(rows)])):
            rows, following = [], []  # every process probes ahead, or none does
        return (self.data_collator(rows) if rows else []), following

    def warn_no_accepted_probe(self) -> None:
        self._warn_once("fallback", self.gvm_state.fallback_message(type(self).__name__, self.args))

    def _measurement_context(self) -> MeasurementContext:
        return MeasurementContext.from_config(self.args, self.model, self.model_wrapped, self.accelerator,
                                              self.temperature, self._get_per_token_logps_and_entropies)

    # -- weight: the training rows, advantages and Lemma 1 weights ---------------------------------------------------

    def _assemble(self, rollouts: BatchRollouts) -> dict[str, Any]:
        """Training rows, advantages and weights of one generation batch (this process's share)."""
        parts = rollouts.parts(self.args.gvm_reuse_probes)
        prompts, trains = torch.cat([p.prompts for p in parts]), torch.cat([p.trains for p in parts])
        accepted = torch.cat([p.accepted for p in parts])
        weights = row_weights(self.args.gvm_weighting, rollouts.allocation.accept_rates, prompts, accepted, trains,
                              self.num_prompts_per_generation)
        empty = not trains.any()
        self._log_allocation(rollouts, empty)
        if empty:  # RAFT++ with nothing accepted: warn once, stop after gvm_max_empty_batches in a row
            self._warn_once("empty", self.gvm_state.note_empty_batch(type(self).__name__, self.args))
            return {"gvm_skip": True}
        self.gvm_state.consecutive_empty = 0

        local = local_row_index(parts, self.accelerator.process_index)
        batch = concat_rollout_batches([p.batch for p in parts], self._pad_values())
        keep = trains[local].nonzero().flatten()
        tokens = batch["completion_mask"].sum(dim=1).cpu()
        if self.args.gvm_weighting != "none":  # every ω_r = 1 otherwise: exactly TRL's loss
            weights = weights * weight_scale(weights[local][keep], tokens[keep].double(),
                                             is_sequence_level(self.loss_type), self._global_sum)
        effective = (self._advantages(parts, prompts).double() * weights).float()
        batch["advantages"] = effective[local].to(self.accelerator.device)
        batch["gvm_weight"] = weights[local].float().to(self.accelerator.device)  # for inspection; TRL ignores it
        log_training_rows(self, parts, trains, effective, batch, keep)
        # A process with nothing to train on keeps one row as a filler to copy.
        batch = as_filler(select_rows(batch, [0])) if keep.numel() == 0 else select_rows(batch, keep)
        batch["num_items_in_batch"] = self._global_sum(tokens[keep].sum()).to(self.accelerator.device)
        return batch

    def _advantages(self, parts: list[Rollout], prompts: torch.Tensor) -> torch.Tensor:
        """Per-row advantages over the whole generation batch (all processes)."""
        raise NotImplementedError

    def _trains(self, prompts: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
        """Which rows (all processes) will be trained on."""
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
        allocation, args = rollouts.allocation, self.args
        nonfinite = sum(int(torch.isinf(r.rewards_per_func).sum()) for r in rollouts.parts(reuse_probes=True))
        values = allocation_metrics(allocation, rollouts.timings, args.gvm_reused_probes, args.gvm_alpha, args.gvm_beta,
                                    step=self.state.global_step, nonfinite=nonfinite,
                                    rounds=rollouts.generation_rounds)
        append_metrics(self, values, running={"gvm/empty_batches": float(self.gvm_state.empty_batches + empty)})
        if allocation.unspent:
            self._warn_once("unspent", unspent_budget_warning(allocation, args.gvm_max_samples))
        if self.accelerator.is_main_process:
            self.allocation_log.append(allocation.log_line(self.state.global_step, rollouts.allocated_accepted))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # -- checkpoints and the model card ----------------------------------------------------------------------------

    def save_model(self, output_dir=None, _internal_call=False):
        """Trainer's; into a checkpoint folder it also writes the GVM state, atomically, right after the model: before
        the optimizer, Trainer's completeness marker (trainer_state.json), the Hub upload and checkpoint rotation."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save and is_checkpoint_folder(output_dir):
            self.gvm_state.save(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.gvm_state.load(checkpoint)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card, plus the GVM settings this model was trained with."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            with open(os.path.join(self.args.output_dir, "README.md"), "a", encoding="utf-8") as handle:
                handle.write(model_card_section(type(self).__name__, self.args, self.prompt_history))


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

    def _trains(self, prompts, accepted):
        return prompts >= 0

    def _advantages(self, parts, prompts):
        if len(parts) == 1 and self.args.gvm_allocation == "uniform":
            # One round grouped exactly as TRL groups it: TRL's own advantages (all processes, as it logged them).
            return torch.tensor(parts[0].logged["advantages"], dtype=torch.float32)
        rewards_per_func = torch.cat([p.rewards_per_func for p in parts])
        rewards_per_func[prompts < 0] = torch.nan
        return grpo_advantages(
            rewards_per_func,
            self.reward_weights.cpu(),
            prompts.clamp(min=0),
            self.num_prompts_per_generation,
            scale=self.scale_rewards,
            aggregation=self.multi_objective_aggregation,
        )


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

    def _trains(self, prompts, accepted):
        return accepted

    def _advantages(self, parts, prompts):
        rewards, accepted = torch.cat([p.rewards for p in parts]), torch.cat([p.accepted for p in parts])
        return torch.where(accepted, rewards, torch.zeros_like(rewards)).clamp(min=0.0)
