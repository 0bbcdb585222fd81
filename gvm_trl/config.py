"""Configuration of the GVM trainers: one set of GVM fields shared by `GVMGRPOConfig` and `GVMRAFTConfig`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from trl import GRPOConfig

WEIGHTINGS = ("lemma1", "mean", "none")
ALLOCATIONS = ("gvm", "uniform")
SUPPORTED_LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")


@dataclass
class GVMArguments:
    r"""
    GVM's rollout-allocation parameters (Yao et al. 2025, "Optimizing Chain-of-Thought Reasoners via Gradient
    Variance Minimization in Rejection Sampling and RL", arXiv:2505.02391), shared by both GVM trainers.

    Each generation batch of `m` prompts runs two phases: `gvm_num_probes` completions per prompt estimate the
    accept rate `p_i` and the per-sample gradient norm `G_i`; then a budget of `N = gvm_budget_per_prompt * m`
    completions is split over the prompts by Theorem 3 (`n_i ∝ G_i / sqrt(p_i + α / p_i^(β-1))`).

    Parameters:
        gvm_num_probes (`int`, *optional*):
            N′, the number of probe completions per prompt (phase 1). Defaults to `num_generations`.
        gvm_budget_per_prompt (`int`, *optional*):
            N/m, the phase-2 budget per prompt on average; the generation batch's total is this times the number of
            prompts. Defaults to `num_generations` (the paper's N = N′·m).
        gvm_alpha (`float`, *optional*, defaults to `1e-3`):
            α > 0 of eq. (5): penalises sampling on prompts with a very low accept rate.
        gvm_beta (`float`, *optional*, defaults to `2.0`):
            β ≥ 2 of eq. (5).
        gvm_min_samples (`int`, *optional*, defaults to `0`):
            Floor on n_i for prompts with a positive weight (GRPO needs 2 to have a non-zero advantage).
        gvm_max_samples (`int`, *optional*):
            Cap on n_i. `None` means no cap.
        gvm_filter_threshold (`float`, *optional*):
            Prompts whose accept rate is above this get no phase-2 samples (e.g. `0.99` skips always-solved prompts).
        gvm_filter_insufficient (`float`, *optional*, defaults to `0.0`):
            Prompts whose expected accepted count n_i·p_i is below this get no phase-2 samples.
        gvm_accept_threshold (`float`, *optional*, defaults to `1.0`):
            A completion is accepted iff its total (weighted) reward is at least this.
        gvm_grad_params (`str`, *optional*, defaults to `"trainable"`):
            Which parameters G_i is measured on: `"trainable"`, `"all"`, `"embed_tokens"` (the official code's
            choice), `"lm_head"` or a regular expression over parameter names.
        gvm_grad_batch_size (`int`, *optional*):
            Micro-batch size of the gradient-norm pass. Defaults to `per_device_train_batch_size`.
        gvm_reuse_probes (`bool`, *optional*, defaults to `True`):
            Whether the probe completions also enter the training batch (they are on-policy samples).
        gvm_weighting (`str`, *optional*, defaults to `"lemma1"`):
            Per-prompt loss weight: `"lemma1"` (1/(n_i p_i), the unbiased estimator of Lemma 1), `"mean"`
            (1/|D_i|, Algorithm 1) or `"none"` (no per-prompt weight, as in the official code and vanilla
            RAFT++/GRPO).
        gvm_allocation (`str`, *optional*, defaults to `"gvm"`):
            `"gvm"` (Theorem 3) or `"uniform"` (the same budget split evenly: the vanilla baseline through the same
            code path).
    """

    gvm_num_probes: int | None = field(
        default=None, metadata={"help": "N′: probe completions per prompt. Defaults to `num_generations`."}
    )
    gvm_budget_per_prompt: int | None = field(
        default=None,
        metadata={"help": "N/m: average phase-2 completions per prompt. Defaults to `num_generations`."},
    )
    gvm_alpha: float = field(default=1e-3, metadata={"help": "α > 0 of eq. (5)."})
    gvm_beta: float = field(default=2.0, metadata={"help": "β ≥ 2 of eq. (5)."})
    gvm_min_samples: int = field(default=0, metadata={"help": "Floor on n_i for prompts with a positive weight."})
    gvm_max_samples: int | None = field(default=None, metadata={"help": "Cap on n_i (None: no cap)."})
    gvm_filter_threshold: float | None = field(
        default=None, metadata={"help": "Prompts with an accept rate above this get no phase-2 samples."}
    )
    gvm_filter_insufficient: float = field(
        default=0.0, metadata={"help": "Prompts whose expected accepted count n_i·p_i is below this get none."}
    )
    gvm_accept_threshold: float = field(
        default=1.0, metadata={"help": "A completion is accepted iff its total reward is at least this."}
    )
    gvm_grad_params: str = field(
        default="trainable",
        metadata={"help": "Parameters G_i is measured on: trainable, all, embed_tokens, lm_head, or a regex."},
    )
    gvm_grad_batch_size: int | None = field(
        default=None, metadata={"help": "Micro-batch of the gradient-norm pass (default: per-device batch size)."}
    )
    gvm_reuse_probes: bool = field(
        default=True, metadata={"help": "Whether probe completions also enter the training batch."}
    )
    gvm_weighting: str = field(
        default="lemma1",
        metadata={"help": "Per-prompt loss weight.", "choices": list(WEIGHTINGS)},
    )
    gvm_allocation: str = field(
        default="gvm", metadata={"help": "gvm (Theorem 3) or uniform (baseline).", "choices": list(ALLOCATIONS)}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.gvm_num_probes is None:
            self.gvm_num_probes = self.num_generations
        if self.gvm_budget_per_prompt is None:
            self.gvm_budget_per_prompt = self.num_generations
        self._validate_gvm_fields()

    @property
    def num_prompts_per_generation(self) -> int:
        """m: the distinct prompts of one generation batch, over all processes (TRL's prompt count)."""
        return self.generation_batch_size // self.num_generations

    def _validate_gvm_fields(self) -> None:
        def fail(message: str):
            raise ValueError(message)

        if self.gvm_num_probes < 1:
            fail(f"gvm_num_probes must be ≥ 1 (got {self.gvm_num_probes}); it is N′, the probes per prompt.")
        if self.gvm_budget_per_prompt < 0:
            fail(f"gvm_budget_per_prompt must be ≥ 0 (got {self.gvm_budget_per_prompt}).")
        if self.gvm_budget_per_prompt == 0 and not self.gvm_reuse_probes:
            fail("gvm_budget_per_prompt=0 with gvm_reuse_probes=False leaves nothing to train on; raise the budget.")
        if not self.gvm_alpha > 0:
            fail(f"gvm_alpha must be > 0 (got {self.gvm_alpha}); the paper uses 1e-3.")
        if not self.gvm_beta >= 2:
            fail(f"gvm_beta must be ≥ 2 (got {self.gvm_beta}); the paper uses 2.0.")
        if self.gvm_min_samples < 0:
            fail(f"gvm_min_samples must be ≥ 0 (got {self.gvm_min_samples}).")
        if self.gvm_max_samples is not None and self.gvm_max_samples < max(self.gvm_min_samples, 1):
            fail(f"gvm_max_samples ({self.gvm_max_samples}) must be ≥ max(gvm_min_samples, 1) or None.")
        if self.gvm_filter_threshold is not None and not 0 < self.gvm_filter_threshold <= 1:
            fail(f"gvm_filter_threshold must lie in (0, 1] or be None (got {self.gvm_filter_threshold}).")
        if self.gvm_filter_insufficient < 0:
            fail(f"gvm_filter_insufficient must be ≥ 0 (got {self.gvm_filter_insufficient}).")
        if self.gvm_weighting not in WEIGHTINGS:
            fail(f"gvm_weighting must be one of {WEIGHTINGS} (got {self.gvm_weighting!r}).")
        if self.gvm_allocation not in ALLOCATIONS:
            fail(f"gvm_allocation must be one of {ALLOCATIONS} (got {self.gvm_allocation!r}).")
        if self.gvm_grad_batch_size is not None and self.gvm_grad_batch_size < 1:
            fail(f"gvm_grad_batch_size must be ≥ 1 or None (got {self.gvm_grad_batch_size}).")
        if self.loss_type not in SUPPORTED_LOSS_TYPES:
            fail(
                f"loss_type={self.loss_type!r} is not supported by the GVM trainers; use one of "
                f"{SUPPORTED_LOSS_TYPES}. These aggregate the same clipped objective, so Lemma 1's per-sample weights "
                "keep their meaning; cispo, sapo, vespo and luspo change the per-token objective itself."
            )
        prompts = self.num_prompts_per_generation
        if prompts % self.world_size:
            fail(
                f"A generation batch holds generation_batch_size / num_generations = {prompts} prompts, which must be "
                f"divisible by the {self.world_size} processes; adjust per_device_train_batch_size, "
                "steps_per_generation or num_generations."
            )
        if prompts == 1:
            warnings.warn(
                "A generation batch holds a single prompt (generation_batch_size == num_generations), so GVM has "
                "nothing to allocate across; raise per_device_train_batch_size or steps_per_generation.",
                stacklevel=3,
            )
        steps, accumulation = self.steps_per_generation, self.gradient_accumulation_steps
        if steps % accumulation and accumulation % steps:
            fail(
                f"steps_per_generation ({steps}) and gradient_accumulation_steps ({accumulation}) must divide one "
                "another, so that each optimizer step covers whole micro-steps of whole generation batches."
            )
        if self.gvm_min_samples > self.gvm_budget_per_prompt:
            fail(
                f"gvm_min_samples={self.gvm_min_samples} exceeds gvm_budget_per_prompt={self.gvm_budget_per_prompt}: "
                "the floors alone would need more than the phase-2 budget; lower gvm_min_samples."
            )
        unsupported = {
            "entropy_coef": self.entropy_coef != 0.0,
            "use_adaptive_entropy": self.use_adaptive_entropy,
        }
        for name, is_set in unsupported.items():
            if is_set:
                fail(f"{name} is not supported by the GVM trainers yet; leave it at its default.")


@dataclass
class GVMGRPOConfig(GVMArguments, GRPOConfig):
    r"""
    Configuration for [`GVMGRPOTrainer`]: [`~trl.GRPOConfig`] plus the GVM fields of [`GVMArguments`].

    GRPO's group-normalised advantages are computed within each prompt's own group (its phase-2 completions and, with
    `gvm_reuse_probes`, its probes), so groups have different sizes.
    """


@dataclass
class GVMRAFTConfig(GVMArguments, GRPOConfig):
    r"""
    Configuration for [`GVMRAFTTrainer`]: [`~trl.GRPOConfig`] plus the GVM fields of [`GVMArguments`].

    RAFT++ (Xiong et al. 2025) trains on accepted completions only, with advantage = reward clipped at 0, the clipped
    importance ratio of `epsilon`/`epsilon_high` and the k3 KL penalty of `beta`. The paper's defaults apply:
    `beta=0.001`, `epsilon=0.2`, token-mean aggregation (`loss_type="dapo"`).
    """

    beta: float = field(
        default=0.001, metadata={"help": "KL coefficient to the reference model (k3 estimator); the paper uses 0.001."}
    )
