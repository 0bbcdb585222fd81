"""`GVMGRPOTrainer` and `GVMRAFTTrainer`: TRL's GRPO trainer with GVM's rollout allocation.

Yao et al. 2025, "Optimizing Chain-of-Thought Reasoners via Gradient Variance Minimization in Rejection Sampling
and RL" (arXiv:2505.02391). Each generation batch of m prompts:

1. Probes (Algorithm 2, lines 3-4): N′ completions per prompt through TRL's own generation path, scored by the reward
   functions; accept rate p_i; G_i = mean per-sample gradient norm ‖∇ ln P(y|x)‖ of the accepted probes
   (:func:`gvm_trl.grad_norms.per_sample_grad_norms`), optionally combined with the prompt's history
   (:class:`gvm_trl.estimates.PromptHistory`).
2. Allocation (Theorem 3): n_i from :func:`gvm_trl.allocation.allocate_budget`, Σ n_i = N.
3. Allocated rollouts: n_i completions for prompt i. With ``gvm_probe_ahead`` the next batch's probes are drawn in
   the same generation call, under the same weights, so each batch costs one generation round; its estimates are
   then one update old and its reused probes are corrected by TRL's importance ratio (their old log-probabilities
   are those of the weights that drew them).
4. Update (Lemma 1 / Algorithm 1) through TRL's own loss: the per-row weight ω_r (1/(n_i p_i), 1/|D_i| or 1) enters
   through the advantage. Every loss TRL offers is positively homogeneous in the advantage — PPO's clipped
   objective min(ρ·ωA, clip(ρ)·ωA) = ω·min(ρA, clip(ρ)A) for ω > 0, and CISPO, SAPO, VESPO and the off-policy mask
   depend on A through its sign or linearly — so ω·A weights each row's policy term by ω, and TRL's `_compute_loss`
   runs unchanged (every loss type, the KL term, the entropy bonus, the MoE auxiliary loss). The weights are
   rescaled to mean 1 over the generation batch's loss tokens (rows, for sequence-level losses), so the loss keeps
   TRL's scale; the KL and entropy terms are TRL's, unweighted.

With ``gvm_allocation="uniform"`` there is no probe round: one generation round of N′ + N/m completions per prompt,
and with ``gvm_weighting="none"`` the trainers compute exactly what `trl.GRPOTrainer` computes (GRPO) or RAFT++.

The two trainers differ only in which rows they train on and their advantages (RAFT++: accepted rows, advantage =
reward clipped at 0; GRPO: all rows, advantages normalised within each prompt's own, variably sized group).
"""

from __future__ import annotations

import json
import math
import os
import textwrap
import time
import warnings
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import gather, gather_object
from datasets import Dataset, IterableDataset
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing, unwrap_model_for_generation
from trl.trainer.utils import nanmax, nanmin, nanstd, repeat_iterable_dataset

from .advantages import grpo_advantages
from .allocation import allocate_budget, lemma1_weights, mean_weights, uniform_allocation, variance_bound
from .batching import num_rows, select_rows, split_rows, trim_padding_columns
from .config import GVMArguments, GVMGRPOConfig, GVMRAFTConfig
from .estimates import PromptEvidence, PromptHistory
from .grad_norms import per_sample_grad_norms, plan_per_sample_grad_norms
from .rollout import BatchAllocation, GenerationBatchSampler, Rollout, concat_rollout_batches

logger = logging.get_logger(__name__)

PROMPT_INDEX_COLUMN = "gvm_prompt_index"
ALLOCATIONS_FILE = "gvm_allocations.jsonl"
STATE_FILE = "gvm_state.json"
# Loss types whose aggregation averages per sequence: their weights are normalised per row, the others' per token.
SEQUENCE_LEVEL_LOSSES = ("grpo", "sapo", "luspo", "dr_grpo")

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


@dataclass
class _ProbedBatch:
    """A generation batch whose probes are drawn and allocation computed, waiting for its allocated rollouts."""

    prompts: list[dict]
    probes: Rollout
    allocation: BatchAllocation


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
        for name in ("tools", "environment_factory", "rollout_func"):  # refused before TRL validates them
            if trainer_kwargs.get(name):
                _refuse(name)
        self._probe_ahead = self._resolve_probe_ahead(args, train_dataset)
        train_dataset = self._with_prompt_index(train_dataset, args)
        super().__init__(model, reward_funcs, args, train_dataset, *trainer_args, **trainer_kwargs)
        self._check_supported()
        if args.gvm_allocation == "gvm":  # a bad selection fails here, not at the first batch; the generic rule warns
            self.grad_norm_plan = plan_per_sample_grad_norms(
                self.accelerator.unwrap_model(self.model), args.gvm_grad_params, setting="gvm_grad_params"
            )
        self.num_prompts_per_generation = args.num_prompts_per_generation
        decay = 0.0 if isinstance(train_dataset, IterableDataset) else args.gvm_history_decay_in_use
        self.prompt_history = PromptHistory(decay) if decay else None
        self.rollout_totals: dict[str, float] = defaultdict(float)  # completions and seconds, summed over the run
        self._pending: _ProbedBatch | None = None
        self._empty_batches = 0
        self._consecutive_empty = 0
        self._reward_range = [math.inf, -math.inf]
        self._warned: set[str] = set()
        self._user_metric_names: set[str] = set()
        self._unfilled_old_logps: torch.Tensor | None = None
        # TRL's completions table keeps one generation batch; GVM's can hold more rows than TRL's.
        capacity = self.num_prompts_per_generation * args.gvm_num_probes + args.gvm_budget
        self._logs = {key: self._resized(value, capacity) for key, value in self._logs.items()}

    @staticmethod
    def _resized(container, capacity: int):
        if isinstance(container, deque):
            return deque(container, maxlen=capacity)
        resized = defaultdict(lambda: deque(maxlen=capacity))
        resized.update({name: deque(values, maxlen=capacity) for name, values in container.items()})
        return resized

    @staticmethod
    def _resolve_probe_ahead(args, dataset) -> bool:
        if args.gvm_allocation == "uniform":
            return False
        iterable = isinstance(dataset, IterableDataset)
        if args.gvm_probe_ahead and iterable:
            raise NotImplementedError(
                "gvm_probe_ahead=True needs a map-style training dataset (datasets.Dataset), whose sampler can look "
                "one generation batch ahead; convert the iterable dataset, or leave gvm_probe_ahead unset (then an "
                "iterable dataset runs the sequential schedule)."
            )
        return not iterable if args.gvm_probe_ahead is None else args.gvm_probe_ahead

    @staticmethod
    def _with_prompt_index(dataset, args):
        """Tag each training prompt with its dataset index (its position in the stream, for an iterable dataset),
        which the allocation log and the per-prompt history record."""
        if isinstance(dataset, IterableDataset):
            if args.gvm_history_decay:
                raise NotImplementedError(
                    "gvm_history_decay keys each prompt's history by its dataset index, which an iterable dataset "
                    "does not have; use a map-style dataset (datasets.Dataset) or leave gvm_history_decay unset."
                )
            return dataset.map(lambda row, index: {PROMPT_INDEX_COLUMN: index}, with_indices=True)
        if isinstance(dataset, Dataset) and PROMPT_INDEX_COLUMN not in dataset.column_names:
            return dataset.add_column(PROMPT_INDEX_COLUMN, list(range(len(dataset))))
        return dataset

    def _check_supported(self) -> None:
        unsupported = {
            "tools": bool(self.tools),
            "environment_factory": self.environment_factories is not None,
            "rollout_func": self.rollout_func is not None,
            "a vision-language model": self._is_vlm,
        }
        for name, present in unsupported.items():
            if present:
                _refuse(name)
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
        self._pending = None  # a resumed run probes its first batch again
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # -- data: m distinct prompts per generation batch -------------------------------------------------------------

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

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if PROMPT_INDEX_COLUMN not in self._signature_columns:  # kept by `remove_unused_columns`
            self._signature_columns = [*self._signature_columns, PROMPT_INDEX_COLUMN]

    def _upcoming_prompts(self, all_prompts: list[dict]) -> list[dict]:
        """This process's share of the next generation batch's prompts, as the dataloader will deliver them
        (empty where there is none to look ahead to)."""
        sampler = getattr(self, "_prompt_sampler", None)
        following = sampler.following(self._keys(all_prompts)) if sampler is not None else None
        if following is None:
            return []
        share = len(following) // self.accelerator.num_processes
        rank = self.accelerator.process_index
        if getattr(self, "_lookahead_dataset", None) is None:
            self._lookahead_dataset = self._remove_unused_columns(self.train_dataset, description="Training")
        rows = [self._lookahead_dataset[i] for i in following[rank * share : (rank + 1) * share]]
        return self.data_collator(rows)

    # -- one generation batch --------------------------------------------------------------------------------------

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        if isinstance(generation_batch, dict):
            return generation_batch  # a micro-batch this trainer already built (see `training_step`)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            prompts = generation_batch[:: self.num_generations]  # TRL's layout repeats each prompt
            self._buffered_inputs = self._build_micro_batches(self._generate_training_batch(prompts))
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

    def _generate_training_batch(self, prompts: list[dict]) -> dict[str, Any]:
        """This process's training rows of one generation batch, under the configured schedule."""
        if self.args.gvm_allocation == "uniform":
            return self._uniform_batch(prompts)
        if self._probe_ahead:
            return self._probe_ahead_batch(prompts)
        return self._sequential_batch(prompts)

    def _uniform_batch(self, prompts: list[dict]) -> dict[str, Any]:
        """No probes: one round of N′ + N/m completions per prompt, grouped per prompt as TRL groups them."""
        group = self.args.gvm_uniform_group_size
        start = time.perf_counter()
        rollout = self._generate_rollout(
            [row for row in prompts for _ in range(group)],
            group_size=group,
            prompts=torch.arange(self.num_prompts_per_generation).repeat_interleave(group),
            phase="allocated",
        )
        elapsed = time.perf_counter() - start
        all_prompts = self._gathered(prompts)
        self._count_completions(rollout)
        accepted = self._per_prompt(self._accepted(rollout), rollout.prompts)
        allocation = BatchAllocation(
            prompt_keys=self._keys(all_prompts),
            budget=group * self.num_prompts_per_generation,
            sizes=[group] * self.num_prompts_per_generation,
            accept_rates=(accepted / group).tolist(),
            grad_norms=None,
            num_probes=0,
            probe_step=None,
        )
        self._timed(allocation, "phase2", elapsed)
        return self._assemble(allocation, None, rollout)

    def _sequential_batch(self, prompts: list[dict]) -> dict[str, Any]:
        """The paper's protocol: probe, measure and allocate, then generate the allocated rows."""
        probed = self._probe_and_allocate(prompts)
        start = time.perf_counter()
        allocated = self._generate_allocated(probed.allocation, self._gathered(prompts))
        self._timed(probed.allocation, "phase2", time.perf_counter() - start)
        return self._assemble(probed.allocation, probed.probes, allocated)

    def _probe_ahead_batch(self, prompts: list[dict]) -> dict[str, Any]:
        """One generation round: this batch's allocated rows and the next batch's probes, under the same weights.

        The first batch of a run (or after resuming) has no probes yet and gets a probe round of its own; the last
        batch of the run has no successor to probe.
        """
        all_prompts = self._gathered(prompts)
        probed = self._pending
        if probed is None or probed.allocation.prompt_keys != self._keys(all_prompts):
            probed = self._probe_and_allocate(prompts)
        upcoming = [] if self._is_last_generation_batch() else self._upcoming_prompts(all_prompts)
        if self.accelerator.num_processes > 1:  # every process probes ahead, or none does
            upcoming = upcoming if all(gather_object([bool(upcoming)])) else []
        start = time.perf_counter()
        allocated, next_probes = self._generate_allocated_and_probes(probed.allocation, all_prompts, upcoming)
        self._timed(probed.allocation, "phase2", time.perf_counter() - start)
        batch = self._assemble(probed.allocation, probed.probes, allocated)
        self._pending = self._allocate(upcoming, next_probes) if next_probes is not None else None
        return batch

    def _is_last_generation_batch(self) -> bool:
        done = self.state.global_step * self.args.gradient_accumulation_steps
        done += self._step % self.args.gradient_accumulation_steps
        remaining = self.state.max_steps * self.args.gradient_accumulation_steps - done
        return remaining <= self.args.steps_per_generation * self.num_iterations

    # -- phases ----------------------------------------------------------------------------------------------------

    def _probe_and_allocate(self, prompts: list[dict]) -> _ProbedBatch:
        """A probe round for `prompts` (N′ completions each), then their estimates and allocation."""
        start = time.perf_counter()
        probes = self._generate_rollout(
            [row for row in prompts for _ in range(self.args.gvm_num_probes)],
            group_size=self.args.gvm_num_probes,
            prompts=self._probe_slots(),
            phase="probe",
        )
        elapsed = time.perf_counter() - start
        self._count_completions(probes)
        probed = self._allocate(prompts, probes)
        self._timed(probed.allocation, "probe", elapsed)
        return probed

    def _probe_slots(self) -> torch.Tensor:
        """Prompt slot of each probe row: process-major, N′ consecutive rows per prompt."""
        return torch.arange(self.num_prompts_per_generation).repeat_interleave(self.args.gvm_num_probes)

    def _allocate(self, prompts: list[dict], probes: Rollout) -> _ProbedBatch:
        """p_i, G_i (gradient-norm pass over the accepted probes, history if kept) and n_i (Theorem 3)."""
        args, num_prompts = self.args, self.num_prompts_per_generation
        all_prompts = self._gathered(prompts)
        accepted = self._accepted(probes)
        start = time.perf_counter()
        norms = self._probe_grad_norms(probes, accepted)
        time_grad_norms = time.perf_counter() - start

        start = time.perf_counter()
        measured = accepted & (norms > 0)
        evidence = PromptEvidence(
            keys=self._keys(all_prompts),
            trials=[float(args.gvm_num_probes)] * num_prompts,
            accepted=self._per_prompt(accepted).tolist(),
            norm_sums=self._per_prompt(norms * measured).tolist(),
            norm_counts=self._per_prompt(measured).tolist(),
        )
        if self.prompt_history is not None:
            rates, grad_norms = self.prompt_history.estimates(evidence)
        else:
            rates = [a / t for a, t in zip(evidence.accepted, evidence.trials)]
            grad_norms = [s / c if c else 0.0 for s, c in zip(evidence.norm_sums, evidence.norm_counts)]
        sizes = allocate_budget(
            rates,
            grad_norms,
            args.gvm_budget,
            alpha=args.gvm_alpha,
            beta=args.gvm_beta,
            min_samples=args.gvm_min_samples,
            max_samples=args.gvm_max_samples,
            filter_threshold=args.gvm_filter_threshold,
            filter_insufficient=args.gvm_filter_insufficient,
            explore_samples=args.gvm_explore_samples,
        )
        fallback = not any(p > 0 and g > 0 for p, g in zip(rates, grad_norms))
        if fallback:  # no prompt carries an allocation weight: split the budget evenly (and say so)
            sizes = uniform_allocation(num_prompts, args.gvm_budget)
            self._warn_once("fallback", self._fallback_message())
        allocation = BatchAllocation(
            prompt_keys=evidence.keys,
            budget=args.gvm_budget,
            sizes=sizes,
            accept_rates=rates,
            grad_norms=grad_norms,
            num_probes=args.gvm_num_probes,
            probe_step=probes.step,
            probes_accepted=[int(a) for a in evidence.accepted],
            probe_norm_sums=evidence.norm_sums,
            probe_norm_counts=[int(c) for c in evidence.norm_counts],
            fallback=fallback,
        )
        self._timed(allocation, "grad_norms", time_grad_norms)
        self._timed(allocation, "allocate", time.perf_counter() - start)
        return _ProbedBatch(prompts, probes, allocation)

    def _deal(self, allocation: BatchAllocation, all_prompts: list[dict]) -> tuple[list[dict], torch.Tensor]:
        """This process's allocated rows and every row's prompt slot: the n_i completions of each prompt dealt
        round-robin over processes, padding rows (slot -1) keeping every process's count equal."""
        num_processes = self.accelerator.num_processes
        plan = [i for i, size in enumerate(allocation.sizes) for _ in range(size)]
        per_process = -(-len(plan) // num_processes)
        dealt = [plan[r::num_processes] for r in range(num_processes)]
        dealt = [share + [-1] * (per_process - len(share)) for share in dealt]
        rows = [all_prompts[max(i, 0)] for i in dealt[self.accelerator.process_index]]
        return rows, torch.tensor([i for share in dealt for i in share], dtype=torch.long)

    def _generate_allocated(self, allocation: BatchAllocation, all_prompts: list[dict]) -> Rollout | None:
        """The allocated completions of a generation batch (sequential schedule)."""
        rows, slots = self._deal(allocation, all_prompts)
        if not len(slots):
            return None
        allocated = self._generate_rollout(rows, group_size=1, prompts=slots, phase="allocated")
        self._count_completions(allocated)
        return allocated

    def _generate_allocated_and_probes(
        self, allocation: BatchAllocation, all_prompts: list[dict], upcoming: list[dict]
    ) -> tuple[Rollout | None, Rollout | None]:
        """The allocated completions of this batch and the N′ probes of each `upcoming` prompt, in one call."""
        num_processes = self.accelerator.num_processes
        rows, allocated_slots = self._deal(allocation, all_prompts)
        probe_rows = [row for row in upcoming for _ in range(self.args.gvm_num_probes)]
        if not rows and not probe_rows:
            return None, None
        probe_slots = self._probe_slots() if probe_rows else torch.empty(0, dtype=torch.long)
        # Each process generates its allocated rows, then its probe rows; global rows stay process-major.
        slots = torch.cat([allocated_slots.view(num_processes, -1), probe_slots.view(num_processes, -1)], dim=1)
        rollout = self._generate_rollout(rows + probe_rows, group_size=1, prompts=slots.flatten(), phase="round")
        allocated = rollout.part(slice(0, len(rows)), "allocated") if rows else None
        probes = rollout.part(slice(len(rows), None), "probe") if probe_rows else None
        for part in (allocated, probes):
            if part is not None:
                self._count_completions(part)
        if probes is not None and self.args.gvm_reuse_probes:
            self._attach_sampling_logps(probes)
        return allocated, probes

    def _attach_sampling_logps(self, probes: Rollout) -> None:
        """Log-probabilities of the probes under the weights that drew them, for the importance ratio when they are
        trained a generation batch later. TRL computes these itself when the steps are misaligned or vLLM's
        correction is on (trl 1.16.0, grpo_trainer.py lines 2634-2655, which this mirrors); otherwise here, for the
        rows that will train (the others get NaN, never read)."""
        batch = probes.batch
        if "old_per_token_logps" in batch:
            return
        trains = self._trains(probes)[probes.local_rows(self.accelerator.process_index)]
        if self._dist.is_zero3 or self.is_fsdp_enabled:
            trains = torch.ones_like(trains)  # sharded forwards are collectives: every process scores all its rows
        rows = trains.nonzero().flatten()
        logps = torch.full(batch["completion_ids"].shape, float("nan"), device=batch["completion_ids"].device)
        if len(rows):
            part = select_rows(batch, rows)
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                logps[rows.to(logps.device)], _, _ = self._get_per_token_logps_and_entropies(
                    self.model,
                    torch.cat([part["prompt_ids"], part["completion_ids"]], dim=1),
                    torch.cat([part["prompt_mask"], part["completion_mask"]], dim=1),
                    part["completion_ids"].size(1),
                    batch_size=self.args.per_device_train_batch_size,
                )
        batch["old_per_token_logps"] = logps

    # -- TRL's generation, one call ------------------------------------------------------------------------------------

    @contextmanager
    def _group_size(self, size: int):
        """Run TRL's generate-and-score with `size` consecutive rows per prompt (it reads `num_generations`)."""
        saved = self.num_generations
        self.num_generations = size
        try:
            yield
        finally:
            self.num_generations = saved

    @contextmanager
    def _call_logging(self):
        """TRL logs its metrics and completions table per generation call; a GVM generation batch spans several
        calls, some rows of which it does not train on. Collect one call's entries aside (the yielded dict: TRL's
        gathered prompts, completions, rewards and extra columns), and keep only what reward functions log
        themselves; the generation batch is logged once, for the rows it trains on (`_log_training_rows`)."""
        saved_logs, saved_metrics = self._logs, self._metrics["train"]
        saved_tokens = self.state.num_input_tokens_seen
        self._logs = {
            "images": [],
            "prompt": [],
            "completion": [],
            "rewards": defaultdict(list),
            "advantages": [],
            "extra": defaultdict(list),
        }
        self._metrics["train"] = defaultdict(list)
        captured = self._logs
        try:
            yield captured
        finally:
            call_metrics = self._metrics["train"]
            self._logs, self._metrics["train"] = saved_logs, saved_metrics
            self.state.num_input_tokens_seen = saved_tokens
            for name in self._user_metric_names:
                saved_metrics[name].extend(call_metrics.get(name, []))

    def _log_metric(self, name: str, value: float):
        self._user_metric_names.add(name)
        super()._log_metric(name, value)

    def _generate(self, prompts: list):
        """TRL's generation; keeps each completion's length and truncation as TRL's own metrics define them."""
        output = super()._generate(prompts)
        _, completion_ids, tool_mask = output[:3]
        lengths = [sum(mask) for mask in tool_mask] if tool_mask is not None else [len(ids) for ids in completion_ids]
        eos_and_pad = [*self.eos_token_ids, self._tokenizer.pad_token_id]
        truncated = [bool(ids) and ids[-1] not in eos_and_pad for ids in completion_ids]
        self._last_completion_stats = (torch.tensor(lengths, dtype=torch.float), torch.tensor(truncated))
        return output

    def _generate_rollout(self, rows: list[dict], group_size: int, prompts: torch.Tensor, phase: str) -> Rollout:
        """TRL's generate-and-score for `rows`, with the per-row facts of every process."""
        step = self.state.global_step
        with self._group_size(group_size), self._call_logging() as logged:
            batch = super()._generate_and_score_completions(rows)
        rewards_per_func = torch.tensor(
            [logged["rewards"][name] for name in self.reward_func_names], dtype=torch.float32
        ).T.reshape(len(prompts), len(self.reward_func_names))
        rewards = (rewards_per_func * self.reward_weights.cpu()).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1) | (prompts < 0)] = torch.nan
        lengths, truncated = self._last_completion_stats
        if self.accelerator.num_processes > 1:
            device = self.accelerator.device
            lengths = gather(lengths.to(device)).cpu()
            truncated = gather(truncated.to(device)).cpu()
        reward_range = rewards[~torch.isnan(rewards)]
        if reward_range.numel():
            self._reward_range = [
                min(self._reward_range[0], reward_range.min().item()),
                max(self._reward_range[1], reward_range.max().item()),
            ]
        return Rollout(
            batch=batch,
            prompts=prompts,
            rewards_per_func=rewards_per_func,
            rewards=rewards,
            lengths=lengths,
            truncated=truncated,
            logged={key: value for key, value in logged.items() if key != "images"},
            step=step,
            phase=phase,
            num_processes=self.accelerator.num_processes,
        )

    def _timed(self, allocation: BatchAllocation, phase: str, seconds: float) -> None:
        """Record a phase's seconds on the batch it belongs to, and in the run's totals when it ran."""
        allocation.timings[phase] = seconds
        self.rollout_totals[f"time_{phase}"] += seconds

    def _count_completions(self, rollout: Rollout) -> None:
        """Completions generated over the run, by phase (padding rows not counted)."""
        key = "probe_completions" if rollout.phase == "probe" else "budget_completions"
        self.rollout_totals[key] += int((rollout.prompts >= 0).sum())

    # -- estimates -------------------------------------------------------------------------------------------------

    def _accepted(self, rollout: Rollout) -> torch.Tensor:
        return (rollout.rewards >= self.args.gvm_accept_threshold) & (rollout.prompts >= 0)

    def _per_prompt(self, values: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Per-prompt sums of per-row `values` (probe rows by default)."""
        prompts = self._probe_slots() if prompts is None else prompts
        valid = prompts >= 0
        totals = torch.zeros(self.num_prompts_per_generation, dtype=torch.float64)
        return totals.index_add_(0, prompts[valid], values[valid].double())

    def _probe_grad_norms(self, probes: Rollout, accepted: torch.Tensor) -> torch.Tensor:
        """Per-sample ‖∇ ln P(y|x)‖ of the accepted probes, over all processes (0 for the others).

        Every process measures the same number of rows, so sharded models run the same forwards and backwards
        everywhere (ZeRO-3's forward hook and FSDP's unshard are collectives). Short processes fill up with copies
        of a real probe, loss mask included, and discard their norms: a fully masked micro-batch would skip its
        forward and leave the other processes waiting. Parameters are gathered as for TRL's generation and
        released on exit.
        """
        accepted_here = accepted[probes.local_rows(self.accelerator.process_index)]
        norms = torch.zeros(len(accepted_here))
        index = accepted_here.nonzero().flatten()
        count = len(index)
        rows = count
        if self.accelerator.num_processes > 1:
            rows = int(gather(torch.tensor([count], device=self.accelerator.device)).max())
        if rows:
            padded = torch.cat([index, index.new_full((rows - count,), int(index[0]) if count else 0)])
            batch = trim_padding_columns(select_rows(probes.batch, padded))
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
                    setting="gvm_grad_params",
                )
            norms[index] = measured[:count].float().cpu()
        if self.accelerator.num_processes > 1:
            norms = gather(norms.to(self.accelerator.device)).cpu()
        return norms

    # -- the training rows -----------------------------------------------------------------------------------------

    def _assemble(self, allocation: BatchAllocation, probes: Rollout | None, allocated: Rollout | None) -> dict:
        """Training rows, advantages and Lemma 1 weights of one generation batch (this process's share)."""
        parts = [p for p in ((probes if self.args.gvm_reuse_probes else None), allocated) if p is not None]
        prompts = torch.cat([p.prompts for p in parts])
        rewards = torch.cat([p.rewards for p in parts])
        accepted = (rewards >= self.args.gvm_accept_threshold) & (prompts >= 0)
        allocation.allocated_accepted = (
            [int(a) for a in self._per_prompt(self._accepted(allocated), allocated.prompts)]
            if allocated is not None
            else [0] * allocation.num_prompts
        )
        self._record_history(allocation)

        advantages, trains = self._advantages(parts, prompts, rewards, accepted)
        drawn = self._per_prompt(torch.ones(len(prompts)), prompts)
        accepted_count = self._per_prompt(accepted.double(), prompts)
        weights = self._prompt_weights(allocation, drawn, accepted_count)[prompts.clamp(min=0)]
        weights = torch.where(trains, weights, torch.zeros_like(weights))
        empty = not trains.any()
        self._log_allocation(allocation, empty)
        if empty:
            self._note_empty_batch()
            return {"gvm_skip": True}
        self._consecutive_empty = 0

        local = self._local_rows(parts)
        batch = concat_rollout_batches([p.batch for p in parts], self._pad_values())
        keep = trains[local].nonzero().flatten()
        tokens = (batch["completion_mask"] * batch.get("tool_mask", 1)).sum(dim=1).cpu()
        scale = self._weight_scale(weights[local][keep], tokens[keep].double())
        weights = weights * scale
        effective = (advantages.double() * weights).float()
        batch["advantages"] = effective[local].to(self.accelerator.device)
        batch["gvm_weight"] = weights[local].float().to(self.accelerator.device)  # for inspection; TRL ignores it
        self._log_training_rows(parts, trains, effective, batch, local, keep)
        if keep.numel() == 0:  # this process has nothing to train on: keep one row as a filler to copy
            batch = _as_filler(select_rows(batch, [0]))
        else:
            batch = select_rows(batch, keep)
        batch["num_items_in_batch"] = self._global_sum(tokens[keep].sum()).to(self.accelerator.device)
        return batch

    def _local_rows(self, parts: list[Rollout]) -> torch.Tensor:
        """Global row indices (into the parts' concatenation) of this process's rows, in local order."""
        rank, offset, rows = self.accelerator.process_index, 0, []
        for part in parts:
            rows.append(offset + torch.arange(len(part.prompts))[part.local_rows(rank)])
            offset += len(part.prompts)
        return torch.cat(rows)

    def _advantages(self, parts, prompts, rewards, accepted) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row advantages and which rows train, over the whole generation batch (all processes)."""
        raise NotImplementedError

    def _trains(self, rollout: Rollout) -> torch.Tensor:
        """Which rows of `rollout` (all processes) will be trained on."""
        raise NotImplementedError

    def _prompt_weights(self, allocation: BatchAllocation, drawn: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
        """Per-prompt loss factor: Lemma 1's 1/(n_i p_i), Algorithm 1's 1/|D_i|, or 1.

        n_i counts every training sample drawn for the prompt (reused probes included) and p_i is the estimate the
        allocation used. Where that estimate is 0 (an explored or fallback prompt) the pooled rate |D_i|/n_i stands
        in, and a prompt with no accepted row counts as one accepted (weight 1/n_i·n_i = 1), so its rows keep the
        reward-difference signal GRPO trains on.
        """
        mode = self.args.gvm_weighting
        if mode == "none":
            return torch.ones(len(drawn), dtype=torch.float64)
        floor = torch.ones_like(accepted)
        if mode == "mean":
            weights = torch.tensor(mean_weights(accepted.tolist()), dtype=torch.float64)
            return torch.where(accepted > 0, weights, floor)
        rates = torch.tensor(allocation.accept_rates, dtype=torch.float64)
        pooled = torch.maximum(accepted, floor) / drawn.clamp(min=1)
        rates = torch.where(rates > 0, rates, pooled)
        return torch.tensor(lemma1_weights(drawn.tolist(), rates.tolist()), dtype=torch.float64)

    def _weight_scale(self, weights: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """s with Σ s·ω_r τ_r = Σ τ_r over the generation batch's training rows (all processes): the weights keep
        their ratios and the loss TRL's scale. τ_r is the row's loss-token count, 1 for sequence-level losses."""
        if self.args.gvm_weighting == "none":
            return torch.ones((), dtype=torch.float64)  # every ω_r = 1: exactly TRL's loss
        if self.loss_type in SEQUENCE_LEVEL_LOSSES:
            tokens = torch.ones_like(tokens)
        totals = self._global_sum(torch.stack([tokens.sum(), (weights * tokens).sum()]))
        return (totals[0] / totals[1]) if totals[1] > 0 else torch.ones((), dtype=torch.float64)

    def _global_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return value.cpu()
        return self.accelerator.reduce(value.to(self.accelerator.device), reduction="sum").cpu()

    def _record_history(self, allocation: BatchAllocation) -> None:
        """Fold this batch's probes and allocated rows into the per-prompt history."""
        if self.prompt_history is None or allocation.num_probes == 0:
            return
        self.prompt_history.record(
            PromptEvidence(
                keys=allocation.prompt_keys,
                trials=[float(allocation.num_probes + n) for n in allocation.sizes],
                accepted=[float(a + b) for a, b in zip(allocation.probes_accepted, allocation.allocated_accepted)],
                norm_sums=allocation.probe_norm_sums,
                norm_counts=[float(c) for c in allocation.probe_norm_counts],
            )
        )

    def _note_empty_batch(self) -> None:
        """A generation batch with nothing to train on (RAFT++: nothing accepted): warn once, stop after K in a row."""
        self._empty_batches += 1
        self._consecutive_empty += 1
        message = (
            f"{type(self).__name__}: no completion of this generation batch reached "
            f"gvm_accept_threshold={self.args.gvm_accept_threshold} (rewards seen so far range over "
            f"[{self._reward_range[0]:.4g}, {self._reward_range[1]:.4g}]), so its update was skipped. RAFT++ trains "
            "only on accepted completions: set gvm_accept_threshold to the reward of a correct answer, or train "
            "with GVMGRPOTrainer, which learns from reward differences."
        )
        limit = self.args.gvm_max_empty_batches
        if limit is not None and self._consecutive_empty >= limit:
            raise RuntimeError(
                f"{message} This happened in {self._consecutive_empty} consecutive generation batches "
                f"(gvm_max_empty_batches={limit}); the run stops rather than train nothing. Checkpoints already saved "
                f"in {self.args.output_dir} are kept."
            )
        self._warn_once("empty", message)

    def _fallback_message(self) -> str:
        return (
            f"{type(self).__name__}: no probe of this generation batch reached gvm_accept_threshold="
            f"{self.args.gvm_accept_threshold} (rewards seen so far range over [{self._reward_range[0]:.4g}, "
            f"{self._reward_range[1]:.4g}]), so its budget was split uniformly (gvm/uniform_fallback). GVM's "
            "allocation needs accepted probes: set gvm_accept_threshold to the reward of a correct answer."
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # -- micro-batches ---------------------------------------------------------------------------------------------

    def _build_micro_batches(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Shuffle and split the local rows over `steps_per_generation` micro-steps, as TRL does (a permutation
        from the global RNG, then consecutive chunks), except that nothing is dropped: chunk sizes may differ by one
        row, and each micro-step is filled up with filler rows to the same row count on every process (TRL's loss
        gathers per-row metrics, which needs equal counts; every process then also runs every backward).

        Filler rows carry no loss tokens and no advantage, so token-level losses (dapo, bnpo, cispo, vespo) do not
        see them; sequence-level ones (grpo, sapo, luspo, dr_grpo) average over rows, so a padded micro-batch's real
        rows get their advantages scaled by padded/real rows, which keeps their policy term TRL's per-micro-batch
        mean (their KL term, inside TRL's loss, is diluted by the same factor).
        """
        steps = self.args.steps_per_generation
        if batch.get("gvm_skip"):
            return [{"gvm_skip": True}] * steps
        permutation = torch.randperm(num_rows(batch))
        chunks = split_rows(select_rows(batch, permutation), steps)
        sizes = torch.tensor([num_rows(chunk) for chunk in chunks], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            sizes = gather(sizes).view(self.accelerator.num_processes, steps).max(dim=0).values
        return [self._pad_rows(chunk, batch, max(int(size), 1)) for chunk, size in zip(chunks, sizes)]

    def _pad_rows(self, chunk: dict[str, Any], batch: dict[str, Any], size: int) -> dict[str, Any]:
        """`chunk` filled up to `size` rows with filler rows (see `_build_micro_batches`)."""
        real = num_rows(chunk)
        if real == size:
            return chunk
        fillers = _as_filler(select_rows(batch, [0] * (size - real)))
        if real == 0:
            return fillers
        if self.loss_type in SEQUENCE_LEVEL_LOSSES:
            chunk = dict(chunk, advantages=chunk["advantages"] * (size / real))
        padded = concat_rollout_batches([chunk, fillers], self._pad_values())
        padded.update({key: value for key, value in chunk.items() if torch.is_tensor(value) and value.dim() == 0})
        return padded

    def _pad_values(self) -> dict[str, float]:
        return {"prompt_ids": self._tokenizer.pad_token_id, "completion_ids": self._tokenizer.pad_token_id}

    # -- the loss: TRL's, with on-policy rows' old log-probabilities filled in -------------------------------------

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

    def _log_training_rows(self, parts, trains, advantages, batch, local, keep) -> None:
        """TRL's completion, reward and sampling metrics and its completions table, for the rows trained on."""
        metrics = self._metrics["train"]
        rows = trains.nonzero().flatten()
        lengths = torch.cat([p.lengths for p in parts])[rows]
        truncated = torch.cat([p.truncated for p in parts])[rows]
        metrics["completions/mean_length"].append(lengths.mean().item())
        metrics["completions/min_length"].append(lengths.min().item())
        metrics["completions/max_length"].append(lengths.max().item())
        metrics["completions/clipped_ratio"].append(truncated.float().mean().item())
        terminated = lengths[~truncated] if (~truncated).any() else torch.zeros(1)
        metrics["completions/mean_terminated_length"].append(terminated.mean().item())
        metrics["completions/min_terminated_length"].append(terminated.min().item())
        metrics["completions/max_terminated_length"].append(terminated.max().item())
        prompt_tokens = self._global_sum(batch["prompt_mask"][keep].sum().double()).item()
        self.state.num_input_tokens_seen += int(prompt_tokens + lengths.sum().item())
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]

        rewards_per_func = torch.cat([p.rewards_per_func for p in parts])
        totals = torch.cat([p.rewards for p in parts])
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[rows, i]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(rewards_per_func[rows, i]).item())
        metrics["reward"].append(torch.nanmean(totals[rows]).item())
        metrics["reward_std"].append(nanstd(totals[rows]).item())
        prompts = torch.cat([p.prompts for p in parts])
        group_std = self._group_reward_std(prompts, totals)
        metrics["frac_reward_zero_std"].append((group_std[prompts[rows]] == 0).float().mean().item())
        self._log_sampling_metrics(select_rows(batch, keep) if keep.numel() else None)

        for key in ("prompt", "completion"):
            values = [v for p in parts for v in p.logged[key]]
            self._logs[key].extend(values[i] for i in rows.tolist())
        for i, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards_per_func[rows, i].tolist())
        self._logs["advantages"].extend(advantages[rows].tolist())
        extra_columns = sorted({column for p in parts for column in p.logged["extra"]})
        for column in extra_columns:
            values = [v for p in parts for v in p.logged["extra"].get(column, [None] * len(p.prompts))]
            self._logs["extra"][column].extend(values[i] for i in rows.tolist())
        phases = [p.phase for p in parts for _ in range(len(p.prompts))]
        self._logs["extra"]["gvm_phase"].extend(phases[i] for i in rows.tolist())

    def _group_reward_std(self, prompts: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        """Per prompt: the std of the rewards of all its scored rows in this generation batch."""
        stds = torch.zeros(self.num_prompts_per_generation)
        for slot in range(self.num_prompts_per_generation):
            values = rewards[(prompts == slot) & ~torch.isnan(rewards)]
            stds[slot] = values.std() if values.numel() > 1 else 0.0
        return stds

    def _log_sampling_metrics(self, batch: dict | None) -> None:
        """vLLM's sampling metrics over the training rows (trl 1.16.0, grpo_trainer.py lines 2862-2896, mirrored:
        TRL logs them per generation call)."""
        if not (self.use_vllm and self.vllm_importance_sampling_correction):
            return
        device, metrics = self.accelerator.device, self._metrics["train"]
        delta = ratio = torch.zeros(0, device=device)
        if batch is not None:
            mask = (batch["completion_mask"] * batch.get("tool_mask", 1)).bool()
            delta = torch.abs(batch["old_per_token_logps"] - batch["sampling_per_token_logps"])
            delta = delta[mask & ~torch.isnan(delta)]
            is_ratio = batch["importance_sampling_ratio"]
            ratio = is_ratio.flatten() if is_ratio.size(1) == 1 else is_ratio[mask]
        zero = torch.tensor(0.0, device=device)
        nan = torch.tensor(math.nan, device=device)
        mean_delta = delta.mean() if delta.numel() else zero
        max_delta = delta.max() if delta.numel() else zero
        metrics["sampling/sampling_logp_difference/mean"].append(self.accelerator.gather(mean_delta).mean().item())
        metrics["sampling/sampling_logp_difference/max"].append(self.accelerator.gather(max_delta).max().item())
        for name, value in (("min", ratio.min() if ratio.numel() else nan), ("max", ratio.max() if ratio.numel() else nan)):
            reduce = nanmin if name == "min" else nanmax
            metrics[f"sampling/importance_sampling_ratio/{name}"].append(reduce(self.accelerator.gather(value)).item())
        mean_ratio = ratio.mean() if ratio.numel() else nan
        metrics["sampling/importance_sampling_ratio/mean"].append(self.accelerator.gather(mean_ratio).nanmean().item())

    def _log_allocation(self, allocation: BatchAllocation, empty: bool) -> None:
        sizes, rates, norms = allocation.sizes, allocation.accept_rates, allocation.grad_norms
        num_prompts, probes = allocation.num_prompts, allocation.num_probes * allocation.num_prompts
        metrics = self._metrics["train"]
        metrics["gvm/accept_rate"].append(sum(rates) / num_prompts)
        metrics["gvm/samples_per_prompt_mean"].append(sum(sizes) / num_prompts)
        metrics["gvm/samples_per_prompt_min"].append(float(min(sizes)))
        metrics["gvm/samples_per_prompt_max"].append(float(max(sizes)))
        metrics["gvm/prompts_zero_budget"].append(float(sum(size == 0 for size in sizes)))
        metrics["gvm/probe_completions"].append(float(probes))
        metrics["gvm/budget_completions"].append(float(sum(sizes)))
        metrics["gvm/uniform_fallback"].append(float(allocation.fallback))
        metrics["gvm/empty_batches"] = [float(self._empty_batches + empty)]  # a running count: its last value
        if allocation.probe_step is not None:
            metrics["gvm/probe_age"].append(float(self.state.global_step - allocation.probe_step))
        for name, seconds in allocation.timings.items():
            metrics[f"gvm/time_{name}"].append(seconds)
        if norms is not None:
            metrics["gvm/grad_norm"].append(sum(norms) / num_prompts)
            ratio = self._variance_bound_ratio(rates, norms, sizes)
            if math.isfinite(ratio):
                metrics["gvm/variance_bound_ratio"].append(ratio)
        if self.accelerator.is_main_process:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, ALLOCATIONS_FILE), "a", encoding="utf-8") as handle:
                handle.write(json.dumps(allocation.log_line(self.state.global_step)) + "\n")

    def _samples_drawn(self, sizes: list[int]) -> list[int]:
        """Training samples per prompt: its allocated completions, plus its probes when they are reused."""
        reused = self.args.gvm_num_probes if self.args.gvm_reuse_probes else 0
        return [size + reused for size in sizes]

    def _variance_bound_ratio(self, accept_rates, grad_norms, sizes) -> float:
        """Eq. (5) for this allocation over eq. (5) for the uniform split of the same budget (not finite: not logged).

        Sample sizes count the reused probes, as the Lemma 1 weights do.
        """
        uniform = uniform_allocation(len(sizes), sum(sizes))
        options = {"alpha": self.args.gvm_alpha, "beta": self.args.gvm_beta}
        bound = variance_bound(accept_rates, grad_norms, self._samples_drawn(sizes), **options)
        baseline = variance_bound(accept_rates, grad_norms, self._samples_drawn(uniform), **options)
        return bound / baseline if 0 < baseline < math.inf else math.nan

    @staticmethod
    def _keys(prompts: list[dict]) -> list[int]:
        return [row.get(PROMPT_INDEX_COLUMN) for row in prompts]

    def _gathered(self, prompts: list[dict]) -> list[dict]:
        return gather_object(prompts) if self.accelerator.num_processes > 1 else prompts

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            state = {
                "empty_batches": self._empty_batches,
                "consecutive_empty": self._consecutive_empty,
                "prompt_history": None if self.prompt_history is None else self.prompt_history.state_dict(),
            }
            with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as handle:
                json.dump(state, handle)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, STATE_FILE) if checkpoint is not None else None
        if path is None or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        self._empty_batches = state["empty_batches"]
        self._consecutive_empty = state["consecutive_empty"]
        if self.prompt_history is not None:
            if state["prompt_history"] is None:
                raise ValueError(
                    f"{checkpoint} was trained without a prompt history (gvm_history_decay), so there is none to "
                    "resume; resume with gvm_history_decay=0, or start a new run."
                )
            self.prompt_history.load_state_dict(state["prompt_history"])

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card, plus the GVM settings this model was trained with."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        fields = {name: getattr(self.args, name) for name in vars(self.args) if name.startswith("gvm_")}
        fields["gvm_history_decay"] = self.prompt_history.decay if self.prompt_history is not None else 0.0
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


def _refuse(feature: str) -> None:
    raise NotImplementedError(
        f"The GVM trainers do not support {feature} (see the README's 'Not supported'); use trl.GRPOTrainer for it."
    )


def _as_filler(row: dict[str, Any]) -> dict[str, Any]:
    """A row that takes part in forward and backward but contributes nothing: no loss tokens, zero advantage."""
    row["completion_mask"] = torch.zeros_like(row["completion_mask"])
    row["advantages"] = torch.zeros_like(row["advantages"])
    row["gvm_weight"] = torch.zeros_like(row["gvm_weight"])
    return row


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

    def _advantages(self, parts, prompts, rewards, accepted):
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

    def _advantages(self, parts, prompts, rewards, accepted):
        return torch.nan_to_num(rewards, nan=0.0).clamp(min=0.0), accepted
