"""Which parameters a selection means, and which rule measures each of their uses: one definition, used at a
trainer's construction (:func:`plan_per_sample_grad_norms`) and on every call of the pass."""

from __future__ import annotations

import math
import re
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .rules import GENERIC, Target, rule_for

ParamSelection = str | Callable[[str, nn.Parameter], bool]

NAMED_SELECTIONS = ("trainable", "all", "embed_tokens", "lm_head")
# Cost of the generic rule, measured by benchmarks/grad_norms.py --generic (README: "Per-sample gradient norms").
GENERIC_COST = (
    "it re-runs each owning module once per sample and forms that sample's dense gradient of these parameters "
    "(vectorised with torch.func.vmap where the module allows it, a Python loop otherwise, e.g. MoE routing)"
)


@dataclass(frozen=True)
class ParameterRule:
    """How one use of a selected parameter is measured.

    ``rule`` is ``"linear"``, ``"conv1d"``, ``"embedding"``, ``"channelwise"`` (fast rules) or ``"generic"``.
    ``checked``: the fast rule verifies that the module computes what it assumes (once per module where it can, else
    on each call), and a call where it does not is measured by the generic rule (with a warning).
    """

    parameter: str
    module: str
    module_type: str
    shape: tuple[int, ...]
    rule: str
    checked: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GradNormPlan:
    """What :func:`~gvm_trl.grad_norms.per_sample_grad_norms` will use for a selection: one entry per (parameter,
    owning module) pair; a tied parameter has one per module that holds it.

    Uses of a parameter outside its owning module's forward (e.g. a Mamba mixer reading ``self.conv1d.weight``)
    are only seen while measuring: they are measured by the generic rule at the module that reads them, with a
    warning.
    """

    setting: str
    params: str
    uses: tuple[ParameterRule, ...]

    @property
    def generic(self) -> tuple[ParameterRule, ...]:
        return tuple(u for u in self.uses if u.rule == GENERIC.name)

    def parameters(self, rule: str) -> list[str]:
        """Names of the parameters with a use measured by ``rule``."""
        return list(dict.fromkeys(u.parameter for u in self.uses if u.rule == rule))

    def __str__(self) -> str:
        counts = defaultdict(int)
        for use in self.uses:
            counts[use.rule] += 1
        summary = ", ".join(f"{rule}: {count}" for rule, count in counts.items())
        return f"GradNormPlan({self.setting}={self.params}; {len(self.uses)} uses, {summary})"


@dataclass
class Resolved:
    """A selection resolved against a model: the hooks' targets per owning module, and their description."""

    selected: dict[int, tuple[str, nn.Parameter]]
    targets: dict[nn.Module, list[Target]]
    plan: GradNormPlan


def resolve(model: nn.Module, params: ParamSelection, setting: str) -> Resolved:
    """Select parameters and give each use the first matching rule of :data:`~.rules.RULES` (else generic)."""
    selected = select_parameters(model, params, setting)
    targets: dict[nn.Module, list[Target]] = defaultdict(list)
    uses = []
    for module_name, module in model.named_modules():
        for attr, p in module._parameters.items():
            if p is None or id(p) not in selected:
                continue
            shape = parameter_shape(p)
            rule = rule_for(module, attr, shape)
            targets[module].append(Target(selected[id(p)][0], attr, id(p), rule, shape))
            name, module_type = selected[id(p)][0], type(module).__name__
            uses.append(ParameterRule(name, module_name, module_type, shape, rule.name, rule.is_checked(module)))
    description = params if isinstance(params, str) else getattr(params, "__name__", "<predicate>")
    return Resolved(selected, dict(targets), GradNormPlan(setting, repr(description), tuple(uses)))


def parameter_shape(p: nn.Parameter) -> tuple[int, ...]:
    """The full shape, also of a parameter partitioned by DeepSpeed ZeRO-3 (whose local shape is [0])."""
    return tuple(getattr(p, "ds_shape", p.shape))


def generic_warning(plan: GradNormPlan) -> str | None:
    """The warning for a plan whose selection needs the generic rule: a few of those parameters, a count, the cost."""
    generic = plan.generic
    if not generic:
        return None
    names = list(dict.fromkeys(f"{u.parameter} ({u.module_type})" for u in generic))
    elements = sum({u.parameter: u.numel for u in generic}.values())
    listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (
        f"{plan.setting}={plan.params}: {len(names)} parameters ({elements:,} elements) have no fast per-sample "
        f"gradient rule and are measured by the exact generic rule: {listed}. It is slower: {GENERIC_COST}. "
        f"Narrow {plan.setting} to leave them out if the gradient-norm pass is too slow."
    )


def warn_generic(plan: GradNormPlan, stacklevel: int) -> None:
    message = generic_warning(plan)
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


def select_parameters(model: nn.Module, params: ParamSelection, setting: str) -> dict[int, tuple[str, nn.Parameter]]:
    """Parameters chosen by ``params``, keyed by identity (tied parameters once, under their first name)."""
    named = list(model.named_parameters(remove_duplicate=False))
    if callable(params):
        chosen = [p for n, p in named if params(n, p)]
    elif not isinstance(params, str):
        message = f"{setting} must be a string or a callable (name, param) -> bool, got {type(params).__name__}"
        raise TypeError(message)
    elif params == "trainable":
        chosen = [p for _, p in named if p.requires_grad]
    elif params == "all":
        chosen = [p for _, p in named]
    elif params in ("embed_tokens", "lm_head"):
        chosen = [_embedding_weight(model, params, setting)]
    else:
        try:
            pattern = re.compile(params)
        except re.error as err:
            message = f"{setting}={params!r} is neither one of {NAMED_SELECTIONS} nor a valid regex: {err}"
            raise ValueError(message) from None
        chosen = [p for n, p in named if pattern.search(n)]
    ids = {id(p) for p in chosen}
    selected: dict[int, tuple[str, nn.Parameter]] = {}
    for name, p in named:
        if id(p) in ids and id(p) not in selected:
            selected[id(p)] = (name, p)
    if not selected:
        examples = ", ".join(n for n, _ in named[:3])
        raise ValueError(
            f"{setting}={params!r} selects no parameter; accepted: {NAMED_SELECTIONS}, a regex searched in parameter "
            f"names (e.g. {examples}) or a predicate (name, param) -> bool"
        )
    return selected


def embeddings(model: nn.Module, *, output: bool) -> nn.Module | None:
    """``model.get_output_embeddings()`` or ``get_input_embeddings()``, None where the model has none."""
    try:
        module = getattr(model, "get_output_embeddings" if output else "get_input_embeddings")()
    except (AttributeError, NotImplementedError):
        return None
    return module if isinstance(module, nn.Module) else None


def _embedding_weight(model: nn.Module, params: str, setting: str) -> nn.Parameter:
    output = params == "lm_head"
    weight = getattr(embeddings(model, output=output), "weight", None)
    if not isinstance(weight, nn.Parameter):
        getter = "get_output_embeddings" if output else "get_input_embeddings"
        raise ValueError(f"{setting}={params!r}: model.{getter}() has no weight")
    return weight
