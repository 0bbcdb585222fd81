"""Configuration of the GVM trainers: one set of GVM fields shared by `GVMGRPOConfig` and `GVMRAFTConfig`."""

from __future__ import annotations

import typing
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from trl import GRPOConfig

from .allocation import ALPHA_RANGE, BETA_RANGE, DYNAMIC_EPSILON_RANGE, FILTER_INSUFFICIENT_RANGE, FILTER_THRESHOLD_RANGE
from .allocation import REINFORCE_ADA_EXITS
from .validation import Bounds

WEIGHTINGS = ("lemma1", "mean", "none")
ALLOCATIONS = ("gvm", "uniform", "dynamic", "knapsack", "reinforce-ada")
GRAD_NORM_SOURCES = ("measured", "constant")
RATE_PRIORS = ("none", "batch")
PROBED_ALLOCATIONS = ("gvm", "dynamic", "knapsack")  # the policies that probe first and plan from the estimates
DEFAULT_HISTORY_DECAY = 0.7  # chosen on the facts task (seeds 0-7); not yet shown to beat uniform with the same weights


@dataclass
class GVMArguments:
    r"""
    GVM's rollout-allocation parameters (Yao et al. 2025, "Optimizing Chain-of-Thought Reasoners via Gradient
    Variance Minimization in Rejection Sampling and RL", arXiv:2505.02391), shared by both GVM trainers.

    Each generation batch of `m` prompts runs two phases: `gvm_num_probes` completions per prompt estimate the
    accept rate `p_i` and the per-sample gradient norm `G_i`; then a budget of `N = gvm_budget_per_prompt * m`
    completions is split over the prompts by Theorem 3 (`n_i ∝ G_i / sqrt(p_i + α / p_i^(β-1))`). With
    `gvm_probe_ahead` the probes of the next generation batch are drawn in the same generation call as this batch's
    allocated completions, so each step costs one generation round. With `gvm_allocation="uniform"` there is no probe
    round at all: one round of `gvm_num_probes + gvm_budget_per_prompt` completions per prompt.

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
            A completion is accepted iff its total reward — the `reward_weights`-weighted sum of the reward functions'
            raw outputs, whatever `multi_objective_aggregation` is — is at least this. Accepted completions give p_i
            and G_i (both trainers) and are the rows RAFT++ trains on.
        gvm_grad_params (`str`, *optional*, defaults to `"trainable"`):
            Which parameters G_i is measured on: `"trainable"`, `"all"`, `"embed_tokens"` (the official code's
            choice), `"lm_head"` or a regular expression over parameter names.
        gvm_grad_batch_size (`int`, *optional*):
            Micro-batch size of the gradient-norm pass. Defaults, on a GPU, to as many rows as fit in its free memory
            (one micro-batch where they all fit), elsewhere to `per_device_train_batch_size`.
        gvm_reuse_probes (`bool`, *optional*, defaults to `True`):
            Whether the probe completions also enter the training batch (they are on-policy samples).
        gvm_weighting (`str`, *optional*, defaults to `"mean"`):
            Per-prompt loss weight: `"mean"` (1/|D_i|, Algorithm 1: Lemma 1's 1/(n_i p_i) with the pooled estimate
            p_i = |D_i|/n_i over probes and allocated rows), `"lemma1"` (1/(n_i p_i) with the estimate the allocation
            used) or `"none"` (no per-prompt weight, as in the official code and vanilla RAFT++/GRPO). `"mean"` is
            the default because it measured better: 0.58x `"lemma1"`'s completions to the target objective
            (`benchmarks/convergence.py`), and `"lemma1"` with a history is unstable (`benchmarks/variance.py`).
        gvm_allocation (`str`, *optional*, defaults to `"gvm"`):
            How a generation batch's budget is split over its prompts:
            - `"gvm"`: Theorem 3 from the probes' p_i and G_i (the gradient-norm pass runs on the accepted probes);
            - `"uniform"`: no probe round: one round of the same number of completions split evenly (with
              `gvm_weighting="none"` it is vanilla GRPO / RAFT++; with `"mean"`, the fair baseline for GVM's
              weighted runs);
            - `"dynamic"`: DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476) as a budget: prompts whose
              estimate is all-correct or all-wrong (p_i ≤ `gvm_dynamic_epsilon` or ≥ 1 − it) get no allocated
              completions, the others share the budget equally;
            - `"knapsack"`: Knapsack RL's budgets (Li et al. 2025, arXiv:2509.25849): the split that maximises
              Σ_i P(a group of n_i holds an accepted and a rejected completion) · p_i(1 − p_i)², reused probes
              counted in each group.
            - `"reinforce-ada"`: Reinforce-Ada (Xiong et al. 2025, arXiv:2510.04996): rounds of
              `gvm_ada_round_size` completions of every prompt not yet able to fill a balanced update group of
              `gvm_ada_group_size` rows (`gvm_ada_exit`), at most `gvm_ada_max_rounds`; each prompt then trains on
              that fixed-size group, its advantage baseline over every row drawn. No probes, no plan and no
              history; `gvm_weighting` must be `"none"` (its published loss), and `gvm_num_probes` /
              `gvm_budget_per_prompt` do not apply.
            `"dynamic"` and `"knapsack"` probe and keep the history exactly as `"gvm"` does, but need no gradient
            norms. When no prompt can be allocated to (no accepted probe; for `"dynamic"`/`"knapsack"` also every
            estimate 0 or 1) the budget is split uniformly (`gvm/uniform_fallback`).
        gvm_probe_ahead (`bool`, *optional*):
            Draw the next generation batch's probes in the same generation call as this batch's allocated
            completions (one generation round per batch, estimates one update old, corrected by the importance
            ratio) instead of a probe round before each allocation (the paper's sequential protocol). `None`: on for
            map-style datasets, off for iterable ones.
        gvm_history_decay (`float`, *optional*):
            Keep a per-prompt history of accept rates and gradient norms across visits and combine it with the
            probes (:class:`~gvm_trl.estimates.PromptHistory`); each visit multiplies the past counts by this
            factor in (0, 1]. `0`: estimates from the current probes alone (the paper's). `None`: 0.7 with a probing
            allocation and `gvm_weighting` `"mean"` or `"none"` on a map-style dataset (chosen on the facts task,
            where each prompt is seen ~67 times; not yet shown to beat uniform allocation with the same weights),
            and no history otherwise (uniform allocation has nothing to estimate, an iterable dataset has no
            prompt index, and `"lemma1"` weights with a history measured unstable).
        gvm_explore_samples (`int`, *optional*, defaults to `0`):
            Samples given first to each prompt whose estimated accept rate is 0 (an exploration floor, so that a
            rare-success prompt whose probes all failed can be found).
        gvm_dynamic_epsilon (`float`, *optional*, defaults to `0.0`):
            With `gvm_allocation="dynamic"`, the margin of "all-correct or all-wrong": p_i ≤ ε or p_i ≥ 1 − ε. 0
            drops exactly DAPO's zero-variance groups when p_i comes from the probes; with a history, ε > 0 also
            drops prompts it says are almost surely solved or unsolved.
        gvm_grad_norms (`str`, *optional*, defaults to `"measured"`):
            With `gvm_allocation="gvm"`, the G_i Theorem 3 reads: `"measured"` (the gradient-norm pass over the
            accepted probes) or `"constant"` (G_i ≡ 1 for every prompt: n_i ∝ 1/sqrt(p_i + α/p_i^(β-1)) from the
            accept rates alone, and no gradient-norm pass, GVM's main cost). The ablation of issue 17: does G_i
            matter?
        gvm_rate_floor_quantile (`float`, *optional*):
            With `gvm_allocation="gvm"`, a floor against starvation: a prompt with no accepted completion in its probes
            (and history) gets, instead of p_i = 0 and nothing, the rate at this quantile of its Beta(1, 1 + t)
            posterior after t failed tries (0.5: the posterior median, 0.129 after 4 failed probes; larger: an
            upper confidence bound), and the mean G_i of the batch's measured prompts. `None`: no floor (the paper).
        gvm_rate_prior (`str`, *optional*, defaults to `"none"`):
            With `gvm_allocation="gvm"`: `"batch"` pools p across the batch's prompts, each estimate becoming its
            posterior mean under a Beta prior fitted to the batch by the method of moments (empirical Bayes), so a
            prompt with nothing accepted keeps a rate above 0 that shrinks with its own failures (and the batch's
            mean G_i). `"none"`: each prompt's own estimate. Exclusive with `gvm_rate_floor_quantile`.
        gvm_ada_round_size (`int`, *optional*, defaults to `8`):
            With `gvm_allocation="reinforce-ada"`: completions of each unfinished prompt per round (the paper's
            `round_repeat`).
        gvm_ada_max_rounds (`int`, *optional*, defaults to `4`):
            With `gvm_allocation="reinforce-ada"`: the most rounds (a prompt gets at most round size × rounds).
        gvm_ada_group_size (`int`, *optional*):
            With `gvm_allocation="reinforce-ada"`: n, the fixed size of each prompt's update group (the paper's
            `rollout.n`, 4 in its script). Defaults to `num_generations`.
        gvm_ada_exit (`str`, *optional*, defaults to `"balanced"`):
            With `gvm_allocation="reinforce-ada"`: when a prompt stops being sampled: `"balanced"`
            (Reinforce-Ada-balance, the paper's best: ⌊n/2⌋ accepted and n − ⌊n/2⌋ rejected rows drawn) or
            `"positive"` (Reinforce-Ada-pos: one accepted row).
        gvm_max_empty_batches (`int`, *optional*, defaults to `10`):
            `GVMRAFTTrainer` stops with an error after this many consecutive generation batches in which no
            completion was accepted (nothing to train on); `None` never stops.
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
        default=None,
        metadata={"help": "Micro-batch of the gradient-norm pass (default: what fits a GPU's free memory; on CPU the "
                  "per-device batch size)."},
    )
    gvm_reuse_probes: bool = field(
        default=True, metadata={"help": "Whether probe completions also enter the training batch."}
    )
    gvm_weighting: str = field(
        default="mean",
        metadata={"help": "Per-prompt loss weight.", "choices": list(WEIGHTINGS)},
    )
    gvm_allocation: str = field(
        default="gvm",
        metadata={"help": "How the budget is split: gvm (Theorem 3), uniform (the baseline, no probes), dynamic (DAPO's "
                  "dynamic sampling) or knapsack (Knapsack RL).", "choices": list(ALLOCATIONS)},
    )
    gvm_probe_ahead: bool | None = field(
        default=None,
        metadata={"help": "Probe the next batch in this batch's generation call (None: when possible)."},
    )
    gvm_history_decay: float | None = field(
        default=None,
        metadata={"help": "Per-visit decay of each prompt's p/G history; 0: none; None: 0.7 where it applies."},
    )
    gvm_explore_samples: int = field(
        default=0, metadata={"help": "Samples for each prompt with estimated accept rate 0 (exploration floor)."}
    )
    gvm_dynamic_epsilon: float = field(
        default=0.0,
        metadata={"help": "gvm_allocation='dynamic': prompts with p_i ≤ ε or ≥ 1 − ε get no allocated completions."},
    )
    gvm_grad_norms: str = field(
        default="measured",
        metadata={"help": "gvm_allocation='gvm': G_i measured, or constant (G_i ≡ 1, no gradient-norm pass).",
                  "choices": list(GRAD_NORM_SOURCES)},
    )
    gvm_rate_floor_quantile: float | None = field(
        default=None,
        metadata={"help": "gvm_allocation='gvm': a prompt with nothing accepted gets this quantile of its posterior "
                  "accept rate instead of 0 (None: no floor)."},
    )
    gvm_rate_prior: str = field(
        default="none",
        metadata={"help": "gvm_allocation='gvm': 'batch' shrinks each p_i towards a Beta prior fitted to the batch.",
                  "choices": list(RATE_PRIORS)},
    )
    gvm_ada_round_size: int = field(
        default=8, metadata={"help": "gvm_allocation='reinforce-ada': completions per unfinished prompt per round."}
    )
    gvm_ada_max_rounds: int = field(
        default=4, metadata={"help": "gvm_allocation='reinforce-ada': the most sampling rounds per generation batch."}
    )
    gvm_ada_group_size: int | None = field(
        default=None,
        metadata={"help": "gvm_allocation='reinforce-ada': rows of each prompt's update group (default: num_generations)."},
    )
    gvm_ada_exit: str = field(
        default="balanced",
        metadata={"help": "gvm_allocation='reinforce-ada': a prompt's exit rule, balanced or positive.",
                  "choices": list(REINFORCE_ADA_EXITS)},
    )
    gvm_max_empty_batches: int | None = field(
        default=10, metadata={"help": "RAFT++: error after this many consecutive batches with nothing accepted."}
    )

    def __post_init__(self):
        super().__post_init__()
        _check_field_types(self)
        unused = [name for name in ("gvm_num_probes", "gvm_budget_per_prompt") if getattr(self, name) is not None]
        if self.gvm_allocation == "reinforce-ada" and unused:
            raise ValueError(f"{' and '.join(unused)} do not apply to gvm_allocation='reinforce-ada', which draws "
                             "gvm_ada_round_size completions per unfinished prompt and round: drop them.")
        if self.gvm_allocation != "reinforce-ada" and self.gvm_ada_group_size is not None:
            raise ValueError(f"gvm_ada_group_size applies to gvm_allocation='reinforce-ada' only (got "
                             f"gvm_allocation='{self.gvm_allocation}'); drop the option or choose that allocation.")
        for name in ("gvm_num_probes", "gvm_budget_per_prompt", "gvm_ada_group_size"):
            if getattr(self, name) is None:
                setattr(self, name, self.num_generations)
        self._validate_gvm_fields()
        for message in _field_warnings(self):
            warnings.warn(message, stacklevel=3)

    @property
    def num_prompts_per_generation(self) -> int:
        """m: the distinct prompts of one generation batch, over all processes (TRL's prompt count)."""
        return self.generation_batch_size // self.num_generations

    @property
    def gvm_budget(self) -> int:
        """N: the completions allocated over a generation batch's prompts (after its probes)."""
        return self.gvm_budget_per_prompt * self.num_prompts_per_generation

    @property
    def gvm_completions_per_batch(self) -> int:
        """The most completions one generation batch can draw: its probes and budget, or Reinforce-Ada's rounds."""
        if self.gvm_allocation == "reinforce-ada":
            return self.num_prompts_per_generation * self.gvm_ada_round_size * self.gvm_ada_max_rounds
        return self.num_prompts_per_generation * self.gvm_num_probes + self.gvm_budget

    @property
    def gvm_reused_probes(self) -> int:
        """Probes per prompt that also train (`gvm_num_probes` with `gvm_reuse_probes`, else 0)."""
        return self.gvm_num_probes if self.gvm_reuse_probes else 0

    @property
    def gvm_history_decay_in_use(self) -> float:
        """The history decay this config trains with on a map-style dataset (0: no history)."""
        if self.gvm_history_decay is not None:
            return self.gvm_history_decay
        if self.gvm_allocation in ("uniform", "reinforce-ada") or self.gvm_weighting == "lemma1":
            return 0.0
        return DEFAULT_HISTORY_DECAY

    @property
    def gvm_uniform_group_size(self) -> int:
        """Completions per prompt of the single round of `gvm_allocation="uniform"`: the probes it would have
        trained on, plus the budget."""
        return self.gvm_reused_probes + self.gvm_budget_per_prompt

    def _validate_gvm_fields(self) -> None:
        """The rules between fields (each field's own type and range: :func:`_check_field_types`)."""
        for message in _field_conflicts(self):
            raise ValueError(message)


def _counts(from_: int) -> Bounds:
    return Bounds(low=from_, finite=False)  # an int field: its type already refuses infinities


# The range of each numeric `gvm_*` field, with what a user should know to fix a value outside it; the field's type
# (and whether None is allowed) is its annotation, its choices its `choices` metadata.
FIELD_RANGES: dict[str, tuple[Bounds, str]] = {
    "gvm_num_probes": (_counts(from_=1), "it is N′, the probes per prompt"),
    "gvm_budget_per_prompt": (_counts(from_=0), "it is N/m, the allocated completions per prompt on average"),
    "gvm_alpha": (ALPHA_RANGE, "the paper uses 1e-3"),
    "gvm_beta": (BETA_RANGE, "the paper uses 2.0"),
    "gvm_min_samples": (_counts(from_=0), "0: no floor"),
    "gvm_max_samples": (_counts(from_=1), "None: no cap"),
    "gvm_filter_threshold": (FILTER_THRESHOLD_RANGE, "None: no filter"),
    "gvm_filter_insufficient": (FILTER_INSUFFICIENT_RANGE, "0: no filter"),
    "gvm_accept_threshold": (Bounds(), "set it to the reward of a correct answer, e.g. 1.0"),
    "gvm_grad_batch_size": (_counts(from_=1), "None: sized by the free memory"),
    "gvm_history_decay": (Bounds(low=0.0, high=1.0), "0: no history; None: the default"),
    "gvm_explore_samples": (_counts(from_=0), "0: no exploration floor"),
    "gvm_dynamic_epsilon": (DYNAMIC_EPSILON_RANGE, "0 drops exactly DAPO's zero-variance groups"),
    "gvm_rate_floor_quantile": (Bounds(low=0.0, high=1.0, low_open=True, high_open=True),
                                "0.5 is the posterior median; None: no floor"),
    "gvm_max_empty_batches": (_counts(from_=1), "None: never stop"),
    "gvm_ada_round_size": (_counts(from_=1), "the paper uses 8"),
    "gvm_ada_max_rounds": (_counts(from_=1), "the paper uses 4"),
    "gvm_ada_group_size": (_counts(from_=1), "the paper uses 4; None: num_generations"),
}
_TYPE_NAMES = {bool: "True or False", int: "an integer", float: "a real number", str: "a string"}


def _check_field_types(args: GVMArguments) -> None:
    """Every `gvm_*` field against its annotation, range and choices: ints refuse floats, bools and strings; floats
    take ints; bools take only bools; a refusal names the field and the fix."""
    hints = typing.get_type_hints(GVMArguments)
    for spec in fields(GVMArguments):
        value, (kind, optional) = getattr(args, spec.name), _annotation(hints[spec.name])
        if value is None and optional:
            continue
        accepted = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            accepted = True
        bounds, hint = FIELD_RANGES.get(spec.name, (None, ""))
        choices = spec.metadata.get("choices")
        if not accepted:
            expected = _TYPE_NAMES[kind] + (" or None" if optional else "")
            problem = f"must be {expected}, got {value!r} ({type(value).__name__}){_unquoted(value, kind)}"
        elif bounds is not None and value not in bounds:
            problem = f"must be {bounds.describe()}{' or None' if optional else ''}, got {value!r}"
        elif choices is not None and value not in choices:
            problem = f"must be one of {tuple(choices)}, got {value!r}"
        else:
            continue
        raise ValueError(f"{spec.name} {problem}" + (f" ({hint})." if hint else "."))


def _unquoted(value: Any, kind: type) -> str:
    """The fix for a number or flag given as a string (as a YAML file with quotes gives it)."""
    if not isinstance(value, str):
        return ""
    if kind is bool and value.lower() in ("true", "false"):
        return f": write {value.lower() == 'true'} without quotes"
    try:
        return f": write {kind(value)!r} without quotes" if kind in (int, float) else ""
    except ValueError:
        return ""


def _annotation(hint: Any) -> tuple[type, bool]:
    """(the type, whether None is allowed) of a field annotated `T` or `T | None`."""
    members = [member for member in typing.get_args(hint) if member is not type(None)] or [hint]
    return members[0], type(None) in typing.get_args(hint)


def _field_conflicts(args: GVMArguments) -> Iterator[str]:
    """What breaks the rules between `gvm_*` fields (and TRL's batch sizes), each message naming the fix."""
    prompts, budget, cap = args.num_prompts_per_generation, args.gvm_budget, args.gvm_max_samples
    if args.gvm_budget_per_prompt == 0 and not args.gvm_reuse_probes:
        yield "gvm_budget_per_prompt=0 with gvm_reuse_probes=False leaves nothing to train on; raise the budget."
    if prompts % args.world_size:
        yield (f"A generation batch holds generation_batch_size / num_generations = {prompts} prompts, which must be "
               f"divisible by the {args.world_size} processes; adjust per_device_train_batch_size, "
               "steps_per_generation or num_generations.")
    if args.gvm_min_samples > args.gvm_budget_per_prompt:
        yield (f"gvm_min_samples={args.gvm_min_samples} exceeds gvm_budget_per_prompt={args.gvm_budget_per_prompt}: "
               "the floors alone would need more than the phase-2 budget; lower gvm_min_samples.")
    if cap is not None and cap < args.gvm_min_samples:
        yield f"gvm_max_samples ({cap}) must be ≥ gvm_min_samples ({args.gvm_min_samples}) or None."
    if cap is not None and cap * prompts < budget:
        yield (f"gvm_max_samples={cap} caps the {prompts} prompts of a generation batch at {cap * prompts} "
               f"completions, less than its budget N = gvm_budget_per_prompt × m = {budget}: raise gvm_max_samples "
               f"to at least {-(-budget // prompts)} or lower gvm_budget_per_prompt.")
    if args.gvm_rate_prior != "none" and args.gvm_rate_floor_quantile is not None:
        yield ("gvm_rate_prior and gvm_rate_floor_quantile both replace the rate of a prompt with nothing accepted; "
               "set one of them.")
    for name, (policy, is_set) in _policy_options(args).items():
        if is_set and args.gvm_allocation != policy:
            yield (f"{name} applies to gvm_allocation='{policy}' only (got gvm_allocation='{args.gvm_allocation}'); "
                   "drop the option or choose that allocation.")
    for name, is_set in _planning_options(args).items():
        if is_set and args.gvm_allocation in ("uniform", "reinforce-ada"):
            yield (f"{name} needs probes and a plan, which gvm_allocation='{args.gvm_allocation}' has none of: drop "
                   f"the option or choose one of {PROBED_ALLOCATIONS}.")
    if args.gvm_allocation == "reinforce-ada" and args.gvm_weighting != "none":
        yield (f"gvm_weighting='{args.gvm_weighting}' does not apply to gvm_allocation='reinforce-ada', which trains "
               "a fixed-size group per prompt with its published unweighted loss: set gvm_weighting='none'.")
    most = args.gvm_ada_round_size * args.gvm_ada_max_rounds
    if args.gvm_allocation == "reinforce-ada" and args.gvm_ada_group_size > most:
        yield (f"gvm_ada_group_size={args.gvm_ada_group_size} exceeds the {most} completions a prompt can get "
               "(gvm_ada_round_size × gvm_ada_max_rounds): raise those or lower the group size.")


def _policy_options(args: GVMArguments) -> dict[str, tuple[str, bool]]:
    """Each option of one allocation policy: (that policy, whether the option is set)."""
    return {
        "gvm_dynamic_epsilon": ("dynamic", args.gvm_dynamic_epsilon > 0),
        "gvm_explore_samples": ("gvm", args.gvm_explore_samples > 0),
        "gvm_filter_threshold": ("gvm", args.gvm_filter_threshold is not None),
        "gvm_filter_insufficient": ("gvm", args.gvm_filter_insufficient > 0),
        "gvm_grad_norms": ("gvm", args.gvm_grad_norms != "measured"),
        "gvm_rate_floor_quantile": ("gvm", args.gvm_rate_floor_quantile is not None),
        "gvm_rate_prior": ("gvm", args.gvm_rate_prior != "none"),
        "gvm_ada_round_size": ("reinforce-ada", args.gvm_ada_round_size != 8),
        "gvm_ada_max_rounds": ("reinforce-ada", args.gvm_ada_max_rounds != 4),
        "gvm_ada_exit": ("reinforce-ada", args.gvm_ada_exit != "balanced"),
    }


def _planning_options(args: GVMArguments) -> dict[str, bool]:
    """The options of every probing policy (they shape the probes, the estimates or the plan): whether each is set."""
    return {
        "gvm_probe_ahead=True": args.gvm_probe_ahead is True,
        "gvm_history_decay": bool(args.gvm_history_decay),
        "gvm_min_samples": args.gvm_min_samples > 0,
        "gvm_max_samples": args.gvm_max_samples is not None,
    }


def _field_warnings(args: GVMArguments) -> Iterator[str]:
    if args.num_prompts_per_generation == 1:
        yield ("A generation batch holds a single prompt (generation_batch_size == num_generations), so GVM has "
               "nothing to allocate across; raise per_device_train_batch_size or steps_per_generation.")
    if args.gvm_weighting == "lemma1" and args.gvm_history_decay:
        yield ("gvm_weighting='lemma1' with gvm_history_decay: Lemma 1's 1/(n_i p_i) with a history's p_i measured "
               "unstable (benchmarks/variance.py: up to 67x uniform's gradient error); gvm_weighting='mean' uses the "
               "history safely.")


def trainer_config(config_class: type, args: Any, model: Any, trainer_name: str, has_peft: bool) -> GVMArguments:
    """The config a GVM trainer trains with: `args`, or the default config (named after the model) when None;
    refused by name when it is not a GVM config, or when its KL term needs a reference model that cannot be
    loaded."""
    if args is None:
        model_name = model if isinstance(model, str) else model.config._name_or_path
        args = config_class(output_dir=f"{str(model_name).split('/')[-1]}-{trainer_name}")
    if not isinstance(args, GVMArguments):
        raise TypeError(
            f"The {trainer_name} trainer needs a {config_class.__name__}, got {type(args).__name__}: build the config "
            f"with {config_class.__name__}(...) to get the gvm_* fields."
        )
    in_memory = not isinstance(model, str) and not model.config._name_or_path
    if args.beta != 0.0 and in_memory and not has_peft and not hasattr(model, "peft_config"):
        raise ValueError(
            f"beta={args.beta} needs a reference model, which TRL loads from the policy's name or path, but this "
            "in-memory model has none: save it (model.save_pretrained(path)) and pass the path, or set beta=0.0."
        )
    return args


def check_train_dataset(args: GVMArguments, dataset: Any) -> None:
    """Refuse, by name, a training dataset the trainers could not train on, where TRL says nothing or fails deep in a
    step: no `prompt` column, fewer prompts than one generation batch holds (TRL's sampler then yields no batch and
    trains 0 steps), or an empty prompt (generation cannot start from no tokens). An iterable dataset has no length
    and is read lazily: its prompts are checked as they arrive (:func:`check_prompts`)."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "prompt" not in columns:
        raise ValueError(
            f"train_dataset has no 'prompt' column (its columns: {columns}); the trainers read each row's prompt "
            "from it: rename yours, e.g. dataset.rename_column('question', 'prompt')."
        )
    if dataset is None or not hasattr(dataset, "__len__"):
        return
    prompts = args.num_prompts_per_generation
    if len(dataset) < prompts:
        raise ValueError(
            f"train_dataset has {len(dataset)} rows, fewer than the {prompts} prompts of one generation batch "
            f"(generation_batch_size / num_generations = {args.generation_batch_size} / {args.num_generations}), so "
            "training would run 0 steps: add prompts, or lower per_device_train_batch_size or steps_per_generation."
        )
    index = _first_empty_prompt(dataset.with_format("arrow")["prompt"]) if isinstance(dataset, Dataset) else None
    if index is not None:
        _refuse_empty_prompt(index, dataset[index])


def _first_empty_prompt(column: pa.ChunkedArray) -> int | None:
    """The index of the first missing, blank (text) or message-less (conversational) prompt, read in Arrow so that
    a dataset of millions of rows is checked in a fraction of a second."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        empty = pc.equal(pc.list_value_length(column), 0)
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        empty = pc.equal(pc.utf8_trim_whitespace(column), "")
    else:
        return None
    empty = pc.or_kleene(empty, pc.is_null(column))
    return int(pc.index(empty, True).as_py()) if pc.any(empty).as_py() else None


def check_prompts(rows: list[dict]) -> None:
    """:func:`check_train_dataset`'s empty-prompt rule, for rows as the dataloader delivers them."""
    for index, row in enumerate(rows):
        prompt = row.get("prompt")
        if (isinstance(prompt, str) and not prompt.strip()) or (isinstance(prompt, list) and not prompt):
            _refuse_empty_prompt(index, row, "of a generation batch")


def _refuse_empty_prompt(index: int, row: dict, where: str = "of train_dataset") -> None:
    raise ValueError(
        f"Row {index} {where} has an empty prompt ({row.get('prompt')!r}); generation cannot start from no tokens. "
        "Drop such rows, e.g. dataset.filter(lambda row: len(row['prompt']) > 0 and str(row['prompt']).strip())."
    )


def dataset_settings(args: GVMArguments, iterable: bool) -> tuple[bool, float]:
    """(whether the schedule probes ahead, the history decay in use) for a map-style or an iterable training
    dataset: the rules an iterable dataset imposes, in one place.

    An iterable dataset has no sampler to look one generation batch ahead with, and no dataset index to key a
    prompt's history by: probing ahead and the history are off by default there, and refused when asked for.
    """
    if iterable and args.gvm_probe_ahead and args.gvm_allocation != "uniform":
        raise NotImplementedError(
            "gvm_probe_ahead=True needs a map-style training dataset (datasets.Dataset), whose sampler can look one "
            "generation batch ahead; convert the iterable dataset, or leave gvm_probe_ahead unset (then an iterable "
            "dataset runs the sequential schedule)."
        )
    if iterable and args.gvm_history_decay:
        raise NotImplementedError(
            "gvm_history_decay keys each prompt's history by its dataset index, which an iterable dataset does not "
            "have; use a map-style dataset (datasets.Dataset) or leave gvm_history_decay unset."
        )
    if args.gvm_allocation in ("uniform", "reinforce-ada"):
        return False, 0.0
    probe_ahead = not iterable if args.gvm_probe_ahead is None else args.gvm_probe_ahead
    return probe_ahead, 0.0 if iterable else args.gvm_history_decay_in_use


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

    def _validate_gvm_fields(self) -> None:
        super()._validate_gvm_fields()
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                f"multi_objective_aggregation={self.multi_objective_aggregation!r} does not apply to RAFT++, whose "
                "advantage is the accepted completion's own (weighted total) reward, with no group normalisation; "
                "leave it at 'sum_then_normalize', or use GVMGRPOConfig."
            )
