"""`GVMGRPOTrainer` and `GVMRAFTTrainer`: TRL's GRPO trainer with GVM's two-phase rollout.

Yao et al. 2025, "Optimizing Chain-of-Thought Reasoners via Gradient Variance Minimization in Rejection Sampling
and RL" (arXiv:2505.02391). Each generation batch of m prompts:

1. Phase 1 (Algorithm 2, lines 3-4): N′ probe completions per prompt through TRL's own generation path, scored by
   the reward functions; accept rate p_i; G_i = mean per-sample gradient norm ‖∇ ln P(y|x)‖ of the accepted
   probes (:func:`gvm_trl.grad_norms.per_sample_grad_norms`).
2. Allocation (Theorem 3): n_i from :func:`gvm_trl.allocation.allocate_budget`, Σ n_i = N.
3. Phase 2: n_i completions for prompt i, generated and scored the same way.
4. Update (Lemma 1 / Algorithm 1): every training row r of prompt i carries a weight ω_r (1/(n_i p_i), 1/|D_i| or 1),
   and the loss of the generation batch is Σ_r ω_r a_r / Σ_r ω_r τ_r, where a_r is the row's clipped-objective
   loss summed over its tokens (or averaged, for ``loss_type="grpo"``) and τ_r its token count (or 1). With all
   ω_r = 1 this is exactly TRL's aggregation for the same ``loss_type``.

The two trainers differ only in which rows they train on and their advantages (RAFT++: accepted rows, advantage =
reward clipped at 0; GRPO: all rows, advantages normalised within each prompt's own, variably sized group).
"""

from __future__ import annotations

import json
import math
import os
import textwrap
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.utils import gather, gather_object
from datasets import Dataset, IterableDataset
from transformers.utils import logging
from trl import GRPOTrainer
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import RepeatSampler

from .allocation import (
    allocate_budget,
    lemma1_weights,
    mean_weights,
    uniform_allocation,
    variance_bound,
)
from .batching import concat_rows, num_rows, select_rows, split_rows, trim_padding_columns
from .config import GVMArguments, GVMGRPOConfig, GVMRAFTConfig
from .grad_norms import per_sample_grad_norms

logger = logging.get_logger(__name__)

PROMPT_INDEX_COLUMN = "gvm_prompt_index"
ALLOCATIONS_FILE = "gvm_allocations.jsonl"

GVM_PAPER = {
    "title": "Optimizing Chain-of-Thought Reasoners via Gradient Variance Minimization in Rejection Sampling and RL",
    "id": "2505.02391",
    "citation": textwrap.dedent("""\
        @article{yao2025optimizing,
            title        = {{Optimizing Chain-of-Thought Reasoners via Gradient Variance Minimization in Rejection Sampling and RL}},
            author       = {Jiarui Yao and Yifan Hao and Hanning Zhang and Hanze Dong and Wei Xiong and Nan Jiang and Tong Zhang},
            year         = 2025,
            eprint       = {arXiv:2505.02391},
        }"""),
}


def group_normalized_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, num_groups: int, scale: str
) -> torch.Tensor:
    """GRPO advantages (r - mean_group) / (std_group + 1e-4) for groups of any size, as TRL computes them.

    ``scale`` is TRL's ``scale_rewards``: ``"group"``, ``"batch"`` or ``"none"``. NaN rewards (unscorable rows)
    are left out of the statistics and get advantage 0; a group with fewer than two scored rows has std 0.
    """
    valid = ~torch.isnan(rewards)
    values = torch.where(valid, rewards, torch.zeros_like(rewards)).double()
    counts = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, groups, valid.double())
    means = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, groups, values) / counts.clamp(min=1)
    centred = torch.where(valid, values - means[groups], torch.zeros_like(values))
    advantages = centred
    if scale == "group":
        squares = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, groups, centred**2)
        stds = torch.where(counts > 1, (squares / (counts - 1).clamp(min=1)).sqrt(), torch.zeros_like(counts))
        advantages = centred / (stds[groups] + 1e-4)
    elif scale == "batch":
        scored = values[valid]
        std = scored.std() if scored.numel() > 1 else torch.zeros((), dtype=torch.float64)
        advantages = centred / (std + 1e-4)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale!r}.")
    return advantages.float()


class _GVMTrainer(GRPOTrainer):
    """Shared machinery of the two GVM trainers; subclasses choose training rows and advantages."""

    config_class: type[GVMArguments] = GVMGRPOConfig
    _tag_names = ["trl", "gvm"]
    _paper = GVM_PAPER

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None, *trainer_args, **trainer_kwargs):
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
        train_dataset = self._with_prompt_index(train_dataset)
        super().__init__(model, reward_funcs, args, train_dataset, *trainer_args, **trainer_kwargs)
        self._check_supported()
        self.num_prompts_per_generation = args.num_prompts_per_generation
        self._empty_batches = 0
        self.rollout_totals: dict[str, float] = defaultdict(float)  # completions and seconds, summed over the run

    @staticmethod
    def _with_prompt_index(dataset):
        """Tag each training prompt with its dataset index, which the allocation log records."""
        if isinstance(dataset, IterableDataset):
            raise NotImplementedError(
                "The GVM trainers need a map-style training dataset (datasets.Dataset); convert the iterable one, "
                "e.g. Dataset.from_generator(...)."
            )
        if isinstance(dataset, Dataset) and PROMPT_INDEX_COLUMN not in dataset.column_names:
            return dataset.add_column(PROMPT_INDEX_COLUMN, list(range(len(dataset))))
        return dataset

    def _check_supported(self) -> None:
        unsupported = {
            "tools": bool(self.tools),
            "environment_factory": self.environment_factories is not None,
            "rollout_func": self.rollout_func is not None,
            "a vision-language model": self._is_vlm,
            "an MoE router auxiliary loss": self.aux_loss_enabled,
        }
        for name, present in unsupported.items():
            if present:
                raise NotImplementedError(f"The GVM trainers do not support {name} yet; use trl.GRPOTrainer for it.")
        if self._dist.is_zero3 and not self.args.ds3_gather_for_generation and self.args.gvm_allocation == "gvm":
            # The norm hooks read the measured parameters whole; ZeRO-3's layer-by-layer gathering frees them first.
            raise NotImplementedError(
                "GVM's gradient-norm pass needs ZeRO-3 parameters gathered as for generation: set "
                "ds3_gather_for_generation=True (TRL's default), or gvm_allocation='uniform'."
            )

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer.train; ``resume_from_checkpoint=True`` picks the last *complete* checkpoint in `output_dir`.

        Trainer picks the highest-numbered one, which after a crash during saving may lack its state files.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # -- data: m distinct prompts per generation batch -------------------------------------------------------------

    def _get_train_sampler(self, dataset=None):
        """Each generation batch draws m distinct prompts (TRL's sampler repeats each num_generations times)."""
        return RepeatSampler(
            data_source=dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=1,
            batch_size=self.num_prompts_per_generation,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
        )

    def get_train_dataloader(self):
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self.num_prompts_per_generation // self.accelerator.num_processes,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    # -- the two-phase rollout -------------------------------------------------------------------------------------

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        if isinstance(generation_batch, dict) and "gvm_weight" in generation_batch:
            return generation_batch  # a micro-batch this trainer already built (see `training_step`)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            self._buffered_inputs = self._build_micro_batches(self._generate_gvm_batch(generation_batch))
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()  # as Trainer.training_step does first: `_prepare_inputs` reads the mode
        inputs = self._prepare_inputs(inputs)
        if inputs.get("gvm_skip"):
            # Nothing was accepted in this generation batch: no backward, so the optimizer sees no gradient and
            # leaves the weights (and its moments) unchanged. Every process skips together.
            self._step += 1
            return torch.zeros((), device=self.accelerator.device)
        return super().training_step(model, inputs, num_items_in_batch)

    @contextmanager
    def _group_size(self, size: int):
        """Run TRL's generate-and-score with `size` consecutive rows per prompt (it reads `num_generations`)."""
        saved = self.num_generations
        self.num_generations = size
        try:
            yield
        finally:
            self.num_generations = saved

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func  # gathered over processes, in process order
        return rewards_per_func

    def _generate_and_score(self, rows: list[dict], group_size: int) -> tuple[dict, torch.Tensor]:
        """TRL's generation + scoring for `rows`; returns the local batch and the global total rewards."""
        with self._group_size(group_size):
            batch = super()._generate_and_score_completions(rows)
        rewards = (self._last_rewards_per_func * self.reward_weights.to(self._last_rewards_per_func.device)).nansum(1)
        rewards[torch.isnan(self._last_rewards_per_func).all(dim=1)] = torch.nan
        return batch, rewards.cpu()

    def _generate_gvm_batch(self, prompts: list[dict]) -> dict[str, Any]:
        args = self.args
        num_processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        num_prompts, num_probes = self.num_prompts_per_generation, args.gvm_num_probes
        all_prompts = gather_object(prompts) if num_processes > 1 else prompts

        start = time.perf_counter()
        probe_rows = [row for row in prompts for _ in range(num_probes)]
        probes, probe_rewards = self._generate_and_score(probe_rows, num_probes)
        probe_accepted = probe_rewards >= args.gvm_accept_threshold
        accept_rates = probe_accepted.view(num_prompts, num_probes).float().mean(dim=1)
        time_probe = time.perf_counter() - start

        start = time.perf_counter()
        grad_norms = None
        if args.gvm_allocation == "gvm":
            local = slice(rank * len(probe_rows), (rank + 1) * len(probe_rows))
            norms = self._probe_grad_norms(probes, probe_accepted[local])
            norms = gather(norms.to(self.accelerator.device)).cpu().view(num_prompts, num_probes)
            accepted = probe_accepted.view(num_prompts, num_probes)
            grad_norms = (norms * accepted).sum(dim=1) / accepted.sum(dim=1).clamp(min=1)
        time_grad_norms = time.perf_counter() - start

        start = time.perf_counter()
        budget = args.gvm_budget_per_prompt * num_prompts
        if args.gvm_allocation == "gvm":
            sizes = allocate_budget(
                accept_rates,
                grad_norms,
                budget,
                alpha=args.gvm_alpha,
                beta=args.gvm_beta,
                min_samples=args.gvm_min_samples,
                max_samples=args.gvm_max_samples,
                filter_threshold=args.gvm_filter_threshold,
                filter_insufficient=args.gvm_filter_insufficient,
            )
        else:
            sizes = uniform_allocation(num_prompts, budget)
        time_allocate = time.perf_counter() - start

        # Phase 2: the global list of (prompt) rows, dealt round-robin so that no process gets all of a hot
        # prompt's rows; short processes get padding rows so every process generates the same number of rows.
        start = time.perf_counter()
        plan = [i for i, size in enumerate(sizes) for _ in range(size)]
        rows_per_process = -(-len(plan) // num_processes)
        phase2, phase2_rewards, phase2_prompt = None, torch.empty(0), torch.empty(0, dtype=torch.long)
        if plan:
            dealt = [plan[r::num_processes] for r in range(num_processes)]
            dealt = [share + [-1] * (rows_per_process - len(share)) for share in dealt]
            phase2_rows = [all_prompts[max(i, 0)] for i in dealt[rank]]
            phase2, phase2_rewards = self._generate_and_score(phase2_rows, 1)
            phase2_prompt = torch.tensor([i for share in dealt for i in share])
        time_phase2 = time.perf_counter() - start

        probe_prompt = torch.arange(num_prompts).repeat_interleave(num_probes)
        record = {
            "sizes": sizes,
            "accept_rates": accept_rates,
            "grad_norms": grad_norms,
            "prompt_index": [row.get(PROMPT_INDEX_COLUMN) for row in all_prompts],
            "phase2_prompt": phase2_prompt,
            "phase2_accepted": phase2_rewards >= args.gvm_accept_threshold,
            "timings": (time_probe, time_grad_norms, time_allocate, time_phase2),
        }
        self._log_allocation(record)

        # Every row of the generation batch, globally: which prompt (-1: padding row), its reward, accepted or not.
        parts = [(probes, probe_prompt, probe_rewards)] if args.gvm_reuse_probes else []
        if phase2 is not None:
            parts.append((phase2, phase2_prompt, phase2_rewards))
        row_prompt = torch.cat([prompt for _, prompt, _ in parts]) if parts else torch.empty(0, dtype=torch.long)
        row_reward = torch.cat([reward for _, _, reward in parts]) if parts else torch.empty(0)
        row_reward[row_prompt < 0] = torch.nan  # padding rows: out of every group statistic
        row_accepted = (row_reward >= args.gvm_accept_threshold) & (row_prompt >= 0)
        empty = not row_accepted.any()
        self._empty_batches += int(empty)
        self._metrics["train"]["gvm/empty_batches"].append(float(self._empty_batches))
        if empty:
            return {"gvm_skip": True}

        advantages, trains = self._advantages(row_reward, row_prompt, row_accepted)
        accepted_count = torch.zeros(num_prompts, dtype=torch.float64)
        accepted_count.index_add_(0, row_prompt.clamp(min=0), row_accepted.double())
        prompt_weight = self._prompt_weights(sizes, accept_rates, accepted_count)
        row_weight = torch.where(trains, prompt_weight[row_prompt.clamp(min=0)], torch.zeros((), dtype=torch.float64))
        local_rows, offset = [], 0
        for _, prompt, _ in parts:  # each part's rows are process-major: this process holds one contiguous block
            local_rows.append(torch.arange(len(prompt)).view(num_processes, -1)[rank] + offset)
            offset += len(prompt)
        local_rows = torch.cat(local_rows)
        batch = concat_rows([part for part, _, _ in parts], self._pad_values())
        batch["advantages"] = advantages[local_rows].to(self.accelerator.device)
        batch["gvm_weight"] = row_weight[local_rows].float().to(self.accelerator.device)
        keep = trains[local_rows].nonzero().flatten()
        if keep.numel() == 0:  # this process has nothing to train on: keep one row as a zero-weight filler
            return _as_filler(select_rows(batch, [0]))
        return select_rows(batch, keep)

    def _samples_drawn(self, sizes: list[int]) -> list[int]:
        """Training samples per prompt: its phase-2 completions, plus its probes when they are reused."""
        reused = self.args.gvm_num_probes if self.args.gvm_reuse_probes else 0
        return [size + reused for size in sizes]

    def _prompt_weights(self, sizes: list[int], accept_rates: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
        """Per-prompt loss factor: Lemma 1's 1/(n_i p_i), Algorithm 1's 1/|D_i|, or 1.

        n_i counts every training sample drawn for the prompt (reused probes included); p_i is the probe estimate
        that the allocation used.
        """
        if self.args.gvm_weighting == "lemma1":
            return torch.tensor(lemma1_weights(self._samples_drawn(sizes), accept_rates), dtype=torch.float64)
        if self.args.gvm_weighting == "mean":
            return torch.tensor(mean_weights(accepted), dtype=torch.float64)
        return torch.ones(len(sizes), dtype=torch.float64)

    def _probe_grad_norms(self, probes: dict, accepted: torch.Tensor) -> torch.Tensor:
        """Per-sample ‖∇ ln P(y|x)‖ of the accepted local probes (0 for the others).

        Every process measures the same number of rows, so sharded models run the same forwards and backwards
        everywhere (ZeRO-3's forward hook and FSDP's unshard are collectives). Short processes fill up with copies
        of a real probe, loss mask included, and discard their norms: a fully masked micro-batch would skip its
        forward and leave the other processes waiting. Parameters are gathered as for TRL's generation and
        released on exit.
        """
        norms = torch.zeros(len(accepted))
        index = accepted.nonzero().flatten()
        count = len(index)
        rows = count
        if self.accelerator.num_processes > 1:
            rows = int(gather(torch.tensor([count], device=self.accelerator.device)).max())
        if rows == 0:
            return norms
        padded = torch.cat([index, index.new_full((rows - count,), int(index[0]) if count else 0)])
        batch = trim_padding_columns(select_rows(probes, padded))
        loss_mask = batch["completion_mask"] * batch.get("tool_mask", 1)
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation
            ) as model,
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            measured = per_sample_grad_norms(
                model,
                torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
                torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
                torch.cat([torch.zeros_like(batch["prompt_mask"]), loss_mask], dim=1),
                params=self.args.gvm_grad_params,
                micro_batch_size=self.args.gvm_grad_batch_size or self.args.per_device_train_batch_size,
            )
        norms[index] = measured[:count].cpu()
        return norms

    def _pad_values(self) -> dict[str, float]:
        return {"prompt_ids": self._tokenizer.pad_token_id, "completion_ids": self._tokenizer.pad_token_id}

    def _advantages(self, rewards, prompts, accepted) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row advantages and which rows train, over the whole generation batch (all processes)."""
        raise NotImplementedError

    # -- micro-batches and the weighted loss ----------------------------------------------------------------------

    def _build_micro_batches(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Split the local rows over `steps_per_generation` micro-steps and attach each optimizer window's
        normaliser Σ ω_r τ_r, summed over all processes, so the loss is exact whatever the split."""
        steps = self.args.steps_per_generation
        if batch.get("gvm_skip"):
            return [{"gvm_skip": True, "gvm_weight": None}] * steps
        permutation = torch.randperm(num_rows(batch))
        chunks = [self._fill_empty(chunk, batch) for chunk in split_rows(select_rows(batch, permutation), steps)]
        per_window = max(steps // self.args.gradient_accumulation_steps, 1)
        window_size = steps // per_window
        totals = torch.stack([self._row_normalizers(chunk).sum() for chunk in chunks]).view(per_window, window_size)
        totals = self.accelerator.reduce(totals.sum(dim=1).to(self.accelerator.device), reduction="sum").cpu()
        # When an optimizer step spans several generation batches, each contributes its own share equally.
        spanned = max(self.args.gradient_accumulation_steps // steps, 1)
        for step, chunk in enumerate(chunks):
            chunk["gvm_normalizer"] = (totals[step // window_size] * spanned).clamp(min=1e-12)
        return chunks

    @staticmethod
    def _fill_empty(chunk: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
        """An empty micro-batch becomes one zero-weight, fully masked row, so every process runs its backward."""
        return chunk if num_rows(chunk) else _as_filler(select_rows(batch, [0]))

    def _row_normalizers(self, batch: dict[str, Any]) -> torch.Tensor:
        """ω_r τ_r: τ_r is the row's token count (token-level losses), 1 (`grpo`) or the max length (`dr_grpo`)."""
        mask = batch["completion_mask"] * batch.get("tool_mask", 1)
        if self.loss_type == "grpo":
            tokens = (mask.sum(dim=1) > 0).float()
        elif self.loss_type == "dr_grpo":
            tokens = (mask.sum(dim=1) > 0).float() * self.max_completion_length
        else:
            tokens = mask.sum(dim=1).float()
        return batch["gvm_weight"] * tokens

    def _compute_loss(self, model, inputs):
        """The clipped objective of TRL's GRPO loss, aggregated with GVM's per-row weights.

        Written here rather than inherited because TRL's `_compute_loss` aggregates inline with normalisers that
        assume equal, unweighted micro-batches; the per-token terms below keep TRL's definitions.
        """
        if "gvm_weight" not in inputs:
            return super()._compute_loss(model, inputs)  # evaluation batches are TRL's own
        mode = "train" if self.model.training else "eval"
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        completion_mask = inputs["completion_mask"]
        mask = completion_mask * inputs.get("tool_mask", 1)
        per_token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
        )
        advantages = inputs["advantages"].unsqueeze(1)
        old_per_token_logps = inputs.get("old_per_token_logps")
        if old_per_token_logps is None:
            old_per_token_logps = per_token_logps.detach()
        log_ratio = per_token_logps - old_per_token_logps
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        ratio = torch.exp(log_ratio)
        clipped_ratio = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
        upper_ratio = ratio if self.args.delta is None else torch.clamp(ratio, max=self.args.delta)
        per_token_loss = -torch.min(upper_ratio * advantages, clipped_ratio * advantages)
        if self.off_policy_mask_threshold is not None:
            per_token_loss = per_token_loss * self.get_off_policy_mask(
                advantages=advantages,
                per_token_logps=per_token_logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_per_token_logps),
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )
        if self.top_entropy_quantile < 1.0:
            per_token_loss = per_token_loss * self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
        if "importance_sampling_ratio" in inputs:
            per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]
        if self.beta != 0.0:
            ref_logps = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref_logps - per_token_logps) - (ref_logps - per_token_logps) - 1
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * ratio
            per_token_loss = per_token_loss + self.beta * per_token_kl

        row_loss = (per_token_loss * mask).sum(dim=1)
        if self.loss_type == "grpo":
            row_loss = row_loss / mask.sum(dim=1).clamp(min=1.0)
        # Processes average their gradients, so each contributes its share of the global sum times their number.
        loss = (inputs["gvm_weight"] * row_loss).sum() / inputs["gvm_normalizer"] * self.accelerator.num_processes

        self._log_loss_metrics(mode, mask, entropies, ratio, advantages, per_token_kl if self.beta != 0.0 else None)
        return loss

    def _log_loss_metrics(self, mode, mask, entropies, ratio, advantages, per_token_kl) -> None:
        def global_masked_mean(values: torch.Tensor) -> float:
            values = values.expand_as(mask) if values.size(1) == 1 else values
            totals = self.accelerator.reduce(torch.stack([(values * mask).sum(), mask.sum().float()]), "sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if per_token_kl is not None:
            self._metrics[mode]["kl"].append(global_masked_mean(per_token_kl.detach()))
        self._metrics[mode]["entropy"].append(global_masked_mean(entropies.detach()))
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(low))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(high))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))

    # -- what the user sees ----------------------------------------------------------------------------------------

    def _log_allocation(self, record: dict[str, Any]) -> None:
        sizes, accept_rates, grad_norms = record["sizes"], record["accept_rates"], record["grad_norms"]
        num_prompts = len(sizes)
        phase2_accepted = torch.zeros(num_prompts, dtype=torch.long)
        valid = record["phase2_prompt"] >= 0
        phase2_accepted.index_add_(0, record["phase2_prompt"][valid], record["phase2_accepted"][valid].long())
        metrics = self._metrics["train"]
        metrics["gvm/accept_rate"].append(accept_rates.mean().item())
        metrics["gvm/samples_per_prompt_mean"].append(sum(sizes) / num_prompts)
        metrics["gvm/samples_per_prompt_min"].append(float(min(sizes)))
        metrics["gvm/samples_per_prompt_max"].append(float(max(sizes)))
        metrics["gvm/prompts_zero_budget"].append(float(sum(size == 0 for size in sizes)))
        metrics["gvm/probe_completions"].append(float(num_prompts * self.args.gvm_num_probes))
        metrics["gvm/budget_completions"].append(float(sum(sizes)))
        for name, seconds in zip(("probe", "grad_norms", "allocate", "phase2"), record["timings"]):
            metrics[f"gvm/time_{name}"].append(seconds)
            self.rollout_totals[f"time_{name}"] += seconds
        self.rollout_totals["probe_completions"] += num_prompts * self.args.gvm_num_probes
        self.rollout_totals["budget_completions"] += sum(sizes)
        if grad_norms is not None:
            metrics["gvm/grad_norm"].append(grad_norms.mean().item())
            ratio = self._variance_bound_ratio(accept_rates, grad_norms, sizes)
            if math.isfinite(ratio):
                metrics["gvm/variance_bound_ratio"].append(ratio)

        if not self.accelerator.is_main_process:
            return
        line = {
            "step": self.state.global_step,
            "budget": self.args.gvm_budget_per_prompt * num_prompts,
            "prompts": [
                {
                    "index": record["prompt_index"][i],
                    "accept_rate": accept_rates[i].item(),
                    "grad_norm": None if grad_norms is None else grad_norms[i].item(),
                    "num_samples": sizes[i],
                    "num_accepted": int(phase2_accepted[i]),
                }
                for i in range(num_prompts)
            ],
        }
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, ALLOCATIONS_FILE), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

    def _variance_bound_ratio(self, accept_rates, grad_norms, sizes) -> float:
        """Eq. (5) for this allocation over eq. (5) for the uniform split of the same budget (not finite: not logged).

        Sample sizes count the reused probes, as the Lemma 1 weights do.
        """
        uniform = uniform_allocation(len(sizes), sum(sizes))
        options = {"alpha": self.args.gvm_alpha, "beta": self.args.gvm_beta}
        bound = variance_bound(accept_rates, grad_norms, self._samples_drawn(sizes), **options)
        baseline = variance_bound(accept_rates, grad_norms, self._samples_drawn(uniform), **options)
        return bound / baseline if 0 < baseline < math.inf else math.nan

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card, plus the GVM settings this model was trained with."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        fields = {name: getattr(self.args, name) for name in vars(self.args) if name.startswith("gvm_")}
        settings = "\n".join(f"| `{name}` | `{value}` |" for name, value in fields.items())
        section = (
            f"\n## GVM settings\n\nTrained with `{type(self).__name__}` from "
            "[gvm-trl](https://github.com/gvm-trl/gvm-trl): GVM allocates each generation batch's rollout budget "
            "over its prompts to minimise the variance of the gradient estimate "
            f"([arXiv:{GVM_PAPER['id']}](https://huggingface.co/papers/{GVM_PAPER['id']})).\n\n"
            f"| field | value |\n| --- | --- |\n{settings}\n"
        )
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(section)


def last_complete_checkpoint(output_dir: str) -> str:
    """The highest-numbered `checkpoint-N` in `output_dir` whose `trainer_state.json` (written last) exists."""
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


def _as_filler(row: dict[str, Any]) -> dict[str, Any]:
    """A row that takes part in forward and backward but contributes nothing: zero weight, no loss tokens."""
    row["completion_mask"] = torch.zeros_like(row["completion_mask"])
    row["gvm_weight"] = torch.zeros_like(row["gvm_weight"])
    return row


class GVMGRPOTrainer(_GVMTrainer):
    r"""
    GRPO with GVM's rollout allocation (Yao et al. 2025, arXiv:2505.02391, Algorithm 2 and Theorem 3).

    A drop-in replacement for [`~trl.GRPOTrainer`] taking a [`GVMGRPOConfig`]. Each generation batch draws N′ probes
    per prompt, measures accept rates p_i and per-sample gradient norms G_i, allocates N = `gvm_budget_per_prompt`·m
    completions by Theorem 3 (n_i ∝ G_i / sqrt(p_i + α/p_i^(β-1))), generates them, and trains on the group-normalised
    advantages of each prompt's own group (phase-2 completions plus, with `gvm_reuse_probes`, its probes), each row
    weighted per `gvm_weighting` (Lemma 1's 1/(n_i p_i) by default). Supported `loss_type`s: dapo, bnpo, grpo,
    dr_grpo (the aggregations of the same clipped objective).
    """

    config_class = GVMGRPOConfig
    _name = "GVM-GRPO"

    def _advantages(self, rewards, prompts, accepted):
        groups = prompts.clamp(min=0)
        advantages = group_normalized_advantages(rewards, groups, self.num_prompts_per_generation, self.scale_rewards)
        return advantages, prompts >= 0


class GVMRAFTTrainer(_GVMTrainer):
    r"""
    RAFT++ with GVM's rollout allocation (Yao et al. 2025, arXiv:2505.02391, Algorithms 1-2, Theorem 3, Lemma 1).

    Rejection sampling: only accepted completions (reward ≥ `gvm_accept_threshold`) are trained on, with advantage
    = reward clipped at 0, the clipped importance ratio π_θ/π_old (`epsilon`, `epsilon_high`), the k3 KL penalty to
    the reference model (`beta`, 0.001 by default) and token-mean aggregation, each sample weighted by 1/(n_i p_i)
    (Lemma 1, eq. (4)) or 1/|D_i| (Algorithm 1). When nothing is accepted in a generation batch, its update is
    skipped and counted in `gvm/empty_batches`.
    """

    config_class = GVMRAFTConfig
    _name = "GVM-RAFT++"

    def _advantages(self, rewards, prompts, accepted):
        return torch.nan_to_num(rewards, nan=0.0).clamp(min=0.0), accepted
