r"""The per-layer rules: one small class per layer kind, tried in the order of :data:`RULES`, and the generic rule.

A rule says which parameters it measures (:meth:`Rule.matches`, from the module and the parameter's shape, at
planning), what a call's forward hook keeps (:meth:`Rule.capture`) and how a call's per-sample gradients follow
from that and the output gradient (:meth:`Rule.records`). A new layer kind is one new class in :data:`RULES`.

Fast rules match by what a module computes, never by its class name: ``nn.Linear``/``Conv1D`` subclasses that keep
the base ``forward``; any ``nn.Embedding`` whose output is the looked-up rows times one scalar (checked at planning
and on each call: Gemma's scaled embedding gets the scale); and 1-D parameters of leaf modules whose output channel
i depends on p_i only (checked once per module). Every parameter no fast rule matches is measured by
:func:`generic_records`.

Checks made on every call are computed on the device and read once at the end of the pass with the others
(:class:`DeferredCheck`): a host read inside the pass would be a host sync per module and micro-batch.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn import functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from .layout import Batch, Layout, broadcast_mask
from .products import _compute_dtype, _Dense, _Outer, _Record, _SharedInputs, _Squares, _Summed

try:  # transformers is a dependency of the package, but keep this module importable on its own.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None

# Largest per-sample work (parameters, inputs and outputs of one module, in elements) vmapped at once.
_REPLAY_ELEMENTS = 1 << 25
# Relative differences up to which a check accepts equality: a multiple of the dtype's epsilon.
_CHECK_EPS = 16
# Module classes whose forward ``torch.func.vmap`` could not batch (data-dependent control flow): replayed in a loop.
_VMAP_UNSUPPORTED: set[type] = set()


@dataclass(frozen=True, eq=False)
class Target:
    """One use of a selected parameter: reached as ``module.<path>`` by a hooked module, measured by ``rule``."""

    name: str
    path: str
    key: int
    rule: Rule
    shape: tuple[int, ...]


@dataclass(eq=False)
class DeferredCheck:
    """A check of one call, computed on the device: ``passed`` (0-dim bool) and ``figure`` (0-dim float64, what a
    failure reports), read with the pass's other checks in one transfer at its end."""

    passed: Tensor
    figure: Tensor
    module: nn.Module
    rule: Rule
    targets: list[Target]


@dataclass
class Call:
    """A hooked call of a module in the measured forward: its inputs and its output's pytree leaves, of which
    ``graded`` (indices) are the floating-point ones that receive gradients; ``checks`` collects its
    :class:`DeferredCheck`s; ``autocast`` is the autocast it ran under (:func:`autocast_state`), in which every
    re-run of the module (checks, replays) runs too."""

    module: nn.Module
    args: tuple
    kwargs: dict
    leaves: list
    graded: list[int]
    batch: Batch
    inputs: _SharedInputs
    checks: list[DeferredCheck] = field(default_factory=list)
    autocast: tuple[tuple[str, torch.dtype], ...] = ()

    @property
    def output(self) -> Tensor:
        return self.leaves[self.graded[0]]

    def first_input(self) -> Any:
        return self.args[0] if self.args else next(iter(self.kwargs.values()), None)


def autocast_state(device_type: str) -> tuple[tuple[str, torch.dtype], ...]:
    """The autocasts on now, for the CPU and ``device_type``: (device type, dtype) each."""
    return tuple((kind, torch.get_autocast_dtype(kind)) for kind in dict.fromkeys(("cpu", device_type))
                 if torch.is_autocast_enabled(kind))


@contextlib.contextmanager
def autocast_as(state: tuple[tuple[str, torch.dtype], ...], device_type: str) -> Iterator[None]:
    """Exactly the autocasts of ``state`` on (for the CPU and ``device_type``), every other off: a module re-run
    after its forward (during the backward, or after it) computes in the precision it was called in, e.g. a bf16
    input against fp32 weights under bf16 autocast, which outside autocast fails (``expected m1 and m2 to have the
    same dtype``) or computes something else."""
    wanted = dict(state)
    with contextlib.ExitStack() as stack:
        for kind in dict.fromkeys(("cpu", device_type, *wanted)):
            if kind in wanted:
                stack.enter_context(torch.autocast(kind, dtype=wanted[kind]))
            elif torch.is_autocast_enabled(kind):
                stack.enter_context(torch.autocast(kind, enabled=False))
        yield


class Rule:
    """A layer kind. ``checked``: the rule verifies that the module computes what it assumes, where it can once per
    module, else on each call with a :class:`DeferredCheck`; :meth:`capture` returns None where a call's verdict is
    known to fail (that call is then measured by the generic rule)."""

    name: ClassVar[str]
    checked: ClassVar[bool] = False

    def matches(self, module: nn.Module, attr: str, shape: tuple[int, ...]) -> bool:
        raise NotImplementedError

    def is_checked(self, module: nn.Module) -> bool:
        return self.checked

    def capture(self, call: Call, targets: list[Target]) -> Any | None:
        """In the forward hook (single-tensor outputs only): what :meth:`records` needs besides the gradient."""
        return None

    def records(self, call: Call, targets: list[Target], captured: Any, grad: Tensor) -> list[_Record]:
        """The per-sample gradient of each target from this call, given the output gradient."""
        raise NotImplementedError


def _bias_record(grad: Tensor, batch: Batch) -> _Summed:
    """G = Σ_t g_t."""
    rows, valid = batch.rows(grad)
    return _Summed((rows,), valid)


class LinearRule(Rule):
    """``nn.Linear`` (W: out×in): G = Σ_t g_t a_tᵀ, kept as factors; bias Σ_t g_t."""

    name = "linear"
    base: ClassVar[type | None] = nn.Linear

    def matches(self, module, attr, shape):
        base = self.base
        return base is not None and isinstance(module, base) and type(module).forward is base.forward and attr in (
            "weight",
            "bias",
        )

    def capture(self, call, targets):
        if not any(t.path == "weight" for t in targets):
            return {}
        key, inputs = call.inputs.capture(call.first_input())
        return {"key": key, "input": inputs}

    def records(self, call, targets, captured, grad):
        grads, valid = call.batch.rows(grad)
        out = []
        for target in targets:
            if target.path == "bias":
                out.append(_bias_record(grad, call.batch))
                continue
            activations, _ = call.batch.rows(captured["input"].to(grads.device))  # read before a device_map move
            out.append(self._outer(grads, activations, valid, captured["key"]))
        return out

    def _outer(self, grads: Tensor, activations: Tensor, valid: Tensor | None, key: int) -> _Outer:
        return _Outer(grads, activations, grads.shape[-1], valid, right_key=key)


class Conv1DRule(LinearRule):
    """transformers' ``Conv1D`` stores W transposed (in×out): G = Σ_t a_t g_tᵀ."""

    name = "conv1d"
    base = Conv1D

    def _outer(self, grads, activations, valid, key):
        return _Outer(activations, grads, activations.shape[-1], valid, left_key=key)


class EmbeddingRule(Rule):
    """``nn.Embedding``: G = c Σ_t e_{id_t} g_tᵀ for output c·W[ids] (c = 1 unless a subclass scales it).

    Rows at ``padding_idx`` get no gradient. ``scale_grad_by_freq`` rescales by counts within the batch and is
    left to the generic rule. A subclass is probed at planning (:func:`probe_embedding`); on each call c is fitted
    on the device and the fit checked by a :class:`DeferredCheck` (a failure re-measures the call with the
    module on the generic rule).
    """

    name = "embedding"

    def matches(self, module, attr, shape):
        return isinstance(module, nn.Embedding) and attr == "weight" and not module.scale_grad_by_freq

    def is_checked(self, module):
        return type(module).forward is not nn.Embedding.forward

    def capture(self, call, targets):
        ids = call.first_input()
        if not isinstance(ids, Tensor) or ids.is_floating_point():
            return None
        scale = None
        if self.is_checked(call.module):
            fitted = embedding_scale(call.module, ids, call.output)
            if fitted is None:
                return None
            scale, passed, error = fitted
            call.checks.append(DeferredCheck(passed, error, call.module, self, targets))
        return {"ids": ids, "scale": scale}

    def records(self, call, targets, captured, grad):
        module, ids = call.module, captured["ids"]
        grads, valid = call.batch.rows(grad)
        ids = ids.to(grads.device).reshape(grads.shape[:2])
        if module.padding_idx is not None:
            not_padding = ids != module.padding_idx
            valid = not_padding if valid is None else valid & not_padding
        if captured["scale"] is not None:
            grads = grads * captured["scale"]
        return [_Outer(ids, grads, targets[0].shape[0], valid)]


def embedding_scale(module: nn.Embedding, ids: Tensor, output: Any) -> tuple[Tensor, Tensor, Tensor] | None:
    """The least-squares scalar c of ``output ≈ c · module.weight[ids]``, whether the fit is exact up to rounding,
    and its largest error relative to the output: 0-dim tensors on the device (no host read). None where the output
    does not have the shape of the looked-up rows."""
    weight = module.weight
    if not isinstance(output, Tensor) or output.shape != (*ids.shape, weight.shape[-1]):
        return None
    with torch.no_grad():
        rows, values = F.embedding(ids, weight).double(), output.double()
        scale = (rows * values).sum() / rows.square().sum()
        error = (values - scale * rows).abs().max()
        size = values.abs().max()
        passed = (error <= _CHECK_EPS * torch.finfo(output.dtype).eps * size) & (size > 0)
        return scale, passed, error / size


_EMBEDDING_PROBES: weakref.WeakKeyDictionary[nn.Module, bool | None] = weakref.WeakKeyDictionary()


def probe_embedding(module: nn.Embedding) -> bool | None:
    """Whether an ``nn.Embedding`` subclass computes c·W[ids] on a few ids (tried once per module); None where that
    cannot be tried at planning (weights sharded, on the meta device, or renormalised in place by ``max_norm``).
    A call failing the check later sets it to False for the module's lifetime (:func:`reject_embedding`)."""
    if module not in _EMBEDDING_PROBES:
        _EMBEDDING_PROBES[module] = _probe_embedding(module)
    return _EMBEDDING_PROBES[module]


def reject_embedding(module: nn.Module) -> None:
    """From now on ``module`` is measured by the generic rule: a call's output was not c·W[ids]."""
    _EMBEDDING_PROBES[module] = False


def _probe_embedding(module: nn.Embedding) -> bool | None:
    weight = module.weight
    if type(weight) not in (nn.Parameter, Tensor) or weight.device.type == "meta" or weight.ndim != 2:
        return None
    if module.max_norm is not None or weight.numel() == 0:
        return None
    ids = torch.arange(min(weight.shape[0], 16), device=weight.device)[None]
    try:
        with torch.no_grad():
            output = module.forward(ids)
    except Exception:  # noqa: BLE001 - a forward that cannot run on a probe is checked on real calls instead
        return None
    fitted = embedding_scale(module, ids, output)
    return fitted is not None and bool(fitted[1])


class ChannelwiseRule(Rule):
    """1-D parameters of leaf modules (norm weights and biases, gates, DoRA magnitudes) where output channel i
    depends on p_i only: G = Σ_t u_t ⊙ g_t, u = ∂y/∂p by forward-mode AD of the module, so RMSNorm, LayerNorm and
    variants such as Gemma's (1 + w) are exact without per-class formulas. Checked once per module by a second
    forward-mode pass with a random tangent r (channel-wise iff ∂y/∂p · r = u ⊙ r): at planning on a probe input
    where the module takes one tensor of width |p|, else on its first measured call; the verdict is kept, so later
    calls run no check. Modules whose u does not depend on their parameters (:func:`sensitivity_group`) get u after
    the backward, one forward-mode pass per group of them; the others one pass each, in the forward hook."""

    name = "channelwise"
    checked = True

    def matches(self, module, attr, shape):
        convolution = isinstance(module, nn.modules.conv._ConvNd)
        return len(shape) == 1 and not convolution and next(module.children(), None) is None

    def capture(self, call, targets):
        if call.batch.layout(call.output) is None:
            return None
        verdicts = _CHANNELWISE_VERDICTS.setdefault(call.module, {})
        captured = {}
        for target in targets:
            if verdicts.get(target.path) is None:
                u = channel_sensitivity(call.module, target.path, call.args, call.kwargs)
                verdicts[target.path] = u is not None
                if u is not None:
                    captured[target.path] = u
            if not verdicts[target.path]:
                return None
        for target in targets:
            if target.path not in captured and sensitivity_group(call.module, target.path) is None:
                # Alone in no group (or sharded, e.g. FSDP2, whose weights are only whole during the forward): its
                # own forward-mode pass, now.
                captured[target.path] = _tangent(call.module, target.path, call.args, call.kwargs,
                                                 torch.ones_like(call.module._parameters[target.path]))
        args = tuple(a.detach() if isinstance(a, Tensor) else a for a in call.args)
        _CHANNELWISE_PATHS[call.module] = tuple(t.path for t in targets)
        return {"args": args, "kwargs": call.kwargs, "sensitivity": captured}

    def records(self, call, targets, captured, grad):
        grads, valid = call.batch.rows(grad)
        out = []
        for target in targets:
            u = captured["sensitivity"].pop(target.path, None)
            if u is None:
                with autocast_as(call.autocast, grad.device.type):
                    u = _tangent(call.module, target.path, captured["args"], captured["kwargs"],
                                 torch.ones_like(call.module._parameters[target.path]))
            out.append(_Summed((call.batch.rows(u)[0], grads), valid))
        return out


# Verdicts of the channel-wise check per module and parameter path, kept for the module's lifetime.
_CHANNELWISE_VERDICTS: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()


def probe_channelwise(module: nn.Module, attr: str) -> None:
    """Run the channel-wise check once on a random [2, 3, |p|] input where the module accepts one, and keep the
    verdict; a module whose forward cannot run on it is checked on its first measured call instead."""
    verdicts = _CHANNELWISE_VERDICTS.setdefault(module, {})
    param = module._parameters[attr]
    if attr in verdicts or type(param) not in (nn.Parameter, Tensor) or param.device.type == "meta":
        return
    if param.numel() == 0 or hasattr(param, "ds_shape"):
        return  # partitioned by DeepSpeed ZeRO-3: whole only inside the forward, where the call checks it
    generator = torch.Generator(device=param.device).manual_seed(1)
    probe = torch.randn((2, 3, param.shape[0]), generator=generator, device=param.device).to(param.dtype)
    with torch.inference_mode(False):
        probe = probe.clone()
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                plain = module.forward(probe)
        except Exception:  # noqa: BLE001 - checked on real calls instead
            return
        if isinstance(plain, Tensor) and plain.shape == probe.shape:
            sensitivity = channel_sensitivity(module, attr, (probe,), {})
            verdicts[attr] = sensitivity is not None
            if sensitivity is not None and _independent_of_parameters(module, attr, probe, sensitivity):
                _SENSITIVITY_GROUPS.setdefault(module, {})[attr] = _group_token(module, attr, sensitivity)


# Modules whose sensitivity u(x) = ∂y/∂p does not depend on their parameters' values (RMSNorm, LayerNorm, Gemma's
# (1 + w)), per parameter path: a token shared by the modules that compute the same u (same class, same u on the
# probe, e.g. the same eps). One module's forward-mode pass then gives u for the stacked inputs of all of them.
_SENSITIVITY_GROUPS: weakref.WeakKeyDictionary[nn.Module, dict[str, object]] = weakref.WeakKeyDictionary()
_GROUP_REFERENCES: list[tuple[type, str, Tensor, object]] = []


def sensitivity_group(module: nn.Module, attr: str) -> object | None:
    """The token of the modules computing the same parameter-independent u as ``module.<attr>`` (None: none)."""
    return _SENSITIVITY_GROUPS.get(module, {}).get(attr)


def _independent_of_parameters(module: nn.Module, attr: str, probe: Tensor, sensitivity: Tensor) -> bool:
    """Whether u(probe) is unchanged with every parameter of the module redrawn (and the module has no buffers,
    which training could change), and a row's u does not depend on the other rows (inputs get stacked)."""
    if next(module.buffers(), None) is not None:
        return False
    alone = channel_sensitivity(module, attr, (probe[:1],), {})
    if alone is None or not torch.equal(alone, sensitivity[:1]):
        return False
    saved = dict(module._parameters)
    generator = torch.Generator(device=probe.device).manual_seed(2)
    try:
        for name, param in saved.items():
            if param is not None:
                module._parameters[name] = torch.rand(param.shape, generator=generator, device=param.device).add_(
                    0.5).to(param.dtype)
        redrawn = channel_sensitivity(module, attr, (probe,), {})
    finally:
        module._parameters.update(saved)
    return redrawn is not None and torch.equal(redrawn, sensitivity)


def _group_token(module: nn.Module, attr: str, sensitivity: Tensor) -> object:
    for cls, path, reference, token in _GROUP_REFERENCES:
        if cls is type(module) and path == attr and reference.shape == sensitivity.shape and \
                reference.dtype == sensitivity.dtype and reference.device == sensitivity.device and \
                torch.equal(reference, sensitivity):
            return token
    token = object()
    _GROUP_REFERENCES.append((type(module), attr, sensitivity, token))
    return token


def shared_sensitivities(calls: list[tuple[Call, dict]]) -> None:
    """u for channel-wise calls in one forward-mode pass per group of modules computing the same
    parameter-independent u (:func:`sensitivity_group`): their inputs stacked, one module of the group run on them;
    each call's u is stored in its captures (``captured["sensitivity"]``), where :meth:`ChannelwiseRule.records`
    takes it instead of running its own pass."""
    groups: dict[tuple, list[tuple[Call, dict]]] = {}
    for call, captured in calls:
        args = captured["args"]
        if captured["kwargs"] or len(args) != 1 or not isinstance(args[0], Tensor):
            continue
        for path in _CHANNELWISE_PATHS.get(call.module, ()):
            token = sensitivity_group(call.module, path)
            if token is not None and path not in captured["sensitivity"]:
                key = (token, path, args[0].shape, args[0].dtype, args[0].device, call.autocast)
                groups.setdefault(key, []).append((call, captured))
    for (_, path, _, _, device, autocast), members in groups.items():
        if len(members) < 2:
            continue
        module = members[0][0].module
        stacked = torch.stack([captured["args"][0] for _, captured in members])
        ones = torch.ones_like(module._parameters[path])
        with autocast_as(autocast, device.type):
            u = _tangent(module, path, (stacked.flatten(0, 1),), {}, ones)
        if u is None or u.shape != stacked.flatten(0, 1).shape:
            continue
        u = u.reshape(stacked.shape)
        for (_, captured), value in zip(members, u):
            captured["sensitivity"][path] = value


# The channel-wise paths measured per module (set by ChannelwiseRule.capture), for shared_sensitivities.
_CHANNELWISE_PATHS: weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _tangent(module: nn.Module, attr: str, args: tuple, kwargs: dict, tangent: Tensor) -> Tensor | None:
    """∂ module(args)/∂p · tangent for p = ``module.<attr>``, calling ``forward`` directly (bypassing hooks)."""
    param = module._parameters[attr]
    args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
    with torch.no_grad(), forward_ad.dual_level():
        module._parameters[attr] = forward_ad.make_dual(param.detach(), tangent)
        try:
            output = module.forward(*args, **kwargs)
        finally:
            module._parameters[attr] = param
        return forward_ad.unpack_dual(output).tangent if isinstance(output, Tensor) else None


def channel_sensitivity(module: nn.Module, attr: str, args: tuple, kwargs: dict) -> Tensor | None:
    """u = ∂y/∂p (tangent 1) for a parameter p that output channel i depends on through p_i only; None where the
    output is not channel-wise in p over its last dimension."""
    param = module._parameters[attr]
    try:
        sensitivity = _tangent(module, attr, args, kwargs, torch.ones_like(param))
        if sensitivity is None or sensitivity.ndim == 0 or sensitivity.shape[-1] != param.shape[0]:
            return None
        generator = torch.Generator(device=param.device).manual_seed(0)  # the caller's RNG stays untouched
        probe = torch.rand(param.shape, generator=generator, device=param.device).add_(0.5).to(param.dtype)
        along_probe = _tangent(module, attr, args, kwargs, probe)
    except Exception:  # noqa: BLE001 - a module whose forward-mode AD fails is measured by the generic rule
        return None
    if along_probe is None or along_probe.shape != sensitivity.shape:
        return None
    expected = sensitivity.double() * probe.double()
    error = (along_probe.double() - expected).abs().max()
    bound = _CHECK_EPS * torch.finfo(sensitivity.dtype).eps * expected.abs().max()
    return sensitivity if bool(error <= bound) else None


class GenericRule(Rule):
    """Everything else: per sample, re-run the module on that sample's inputs and take the VJP of its output
    gradient w.r.t. just these parameters (:func:`generic_records`)."""

    name = "generic"

    def matches(self, module, attr, shape):
        return True


LINEAR, CONV1D, EMBEDDING, CHANNELWISE = LinearRule(), Conv1DRule(), EmbeddingRule(), ChannelwiseRule()
GENERIC = GenericRule()
RULES: tuple[Rule, ...] = (LINEAR, CONV1D, EMBEDDING, CHANNELWISE)


def rule_for(module: nn.Module, attr: str, shape: tuple[int, ...]) -> Rule:
    """The first rule of :data:`RULES` that measures ``module.<attr>``, else :data:`GENERIC`."""
    for rule in RULES:
        if rule.matches(module, attr, shape):
            if rule is EMBEDDING and rule.is_checked(module) and probe_embedding(module) is False:
                return GENERIC
            if rule is CHANNELWISE:
                probe_channelwise(module, attr)
            return rule
    return GENERIC


# --------------------------------------------------------------------------------------------------------------
# The generic rule


def generic_records(
    call: Call, targets: list[Target], grads: Sequence[Tensor | None], single: set[int]
) -> list[_Record | None]:
    """Exact per-sample gradients of ``targets`` from one call of any module that treats samples independently.

    For every sample b, ``module.forward`` is re-run on b's slice of each input that leads with the batch (or the
    flattened batch × positions), and the VJP of b's output gradient (zero at padding) w.r.t. just these parameters
    gives b's gradient: ``torch.func.vmap`` over samples where the module allows it, a Python loop where it has
    data-dependent control flow (MoE routing). The re-run outputs must match the recorded ones (else the module
    mixes samples and this raises). Cost: one forward and backward of the module per sample (batched under vmap)
    and each sample's dense gradient of the parameters, reduced at once for ``single``-use keys.
    """
    batch = call.batch
    size = batch.size
    graded = [(i, g) for i, g in zip(call.graded, grads) if g is not None]
    if not graded:  # no output reached the loss: every gradient is 0
        return [None] * len(targets)
    replay = _Replay(call, [i for i, _ in graded], [g for _, g in graded], [t.path for t in targets])
    rows_per_chunk = max(1, _REPLAY_ELEMENTS // max(replay.elements_per_sample, 1))
    squares = [torch.zeros(size, dtype=torch.float64, device=graded[0][1].device) for _ in targets]
    dense: list[list[Tensor]] = [[] for _ in targets]
    mismatches = []
    for start in range(0, size, rows_per_chunk):
        rows = range(start, min(start + rows_per_chunk, size))
        outputs, gradients = replay.run(rows)
        mismatches.append(replay.mismatch(rows, outputs))
        for k, (target, g) in enumerate(zip(targets, gradients)):
            if target.key in single:
                squares[k][start : start + len(rows)] = g.to(torch.float64).square().flatten(1).sum(1)
            else:
                dense[k].append(g)
    passed, figure = (torch.stack(values) for values in zip(*mismatches))
    call.checks.append(DeferredCheck(passed.all(), figure.max(), call.module, GENERIC, targets))
    return [_Squares(s) if t.key in single else _Dense(torch.cat(d)) for t, s, d in zip(targets, squares, dense)]


class _Replay:
    """One module call, split into per-sample inputs and output gradients, ready to re-run sample by sample."""

    def __init__(self, call: Call, outputs: list[int], grads: list[Tensor], paths: list[str]) -> None:
        self.call, self.outputs, self.paths = call, outputs, paths
        batch = call.batch
        self.params = tuple(call.module.get_parameter(p).detach() for p in paths)
        self.leaves, self.spec = tree_flatten((call.args, call.kwargs))
        self.leaves = [x.detach() if isinstance(x, Tensor) else x for x in self.leaves]
        self.sliced: list[tuple[int, bool, Tensor]] = []  # (leaf index, flat, per-sample [B, ...] tensor)
        for j, leaf in enumerate(self.leaves):
            layout = batch.layout(leaf) if isinstance(leaf, Tensor) else None
            if layout is not None:
                self.sliced.append((j, layout.flat, batch.per_sample(_finite_padding(leaf, layout, batch), layout)))
        self.layouts = [batch.layout(call.leaves[i]) for i in outputs]
        self.recorded = [batch.per_sample(call.leaves[i].detach(), lay) for i, lay in zip(outputs, self.layouts)]
        self.cotangents = []
        for grad, layout in zip(grads, self.layouts):
            grad = batch.per_sample(grad, layout)
            if layout.mask is not None:
                grad = torch.where(broadcast_mask(layout.mask, grad), grad, 0)
            self.cotangents.append(grad)
        per_sample = sum(p.numel() for p in self.params) + sum(x[0].numel() for _, _, x in self.sliced)
        self.elements_per_sample = per_sample + sum(x[0].numel() for x in self.recorded)

    def _one(self, params: tuple[Tensor, ...], inputs: list[Tensor], cotangents: list[Tensor]):
        """(outputs, gradients) of one sample; inputs and cotangents come without the batch dimension."""
        leaves = list(self.leaves)
        for (j, flat, _), x in zip(self.sliced, inputs):
            leaves[j] = x if flat else x.unsqueeze(0)
        args, kwargs = tree_unflatten(leaves, self.spec)
        module, paths, picked = self.call.module, self.paths, self.outputs

        def forward(*values: Tensor) -> tuple[Tensor, ...]:
            output = torch.func.functional_call(module, dict(zip(paths, values)), tuple(args), kwargs, strict=False)
            flat_output = tree_flatten(output)[0]
            return tuple(flat_output[i] for i in picked)

        outputs, vjp = torch.func.vjp(forward, *params)
        cotangents = tuple(c if lay.flat else c.unsqueeze(0) for c, lay in zip(cotangents, self.layouts))
        cotangents = tuple(c.to(o.dtype) for c, o in zip(cotangents, outputs))
        outputs = tuple(o if lay.flat else o.squeeze(0) for o, lay in zip(outputs, self.layouts))
        return outputs, vjp(cotangents)

    def run(self, rows: range) -> tuple[list[Tensor], list[Tensor]]:
        """Outputs [b, ...] and gradients [b, *shape] of ``rows``: vmapped where possible, else one at a time."""
        index = slice(rows.start, rows.stop)
        inputs = [x[index] for _, _, x in self.sliced]
        cotangents = [c[index] for c in self.cotangents]
        with torch.enable_grad(), autocast_as(self.call.autocast, self.cotangents[0].device.type):
            if type(self.call.module) not in _VMAP_UNSUPPORTED:
                try:
                    with warnings.catch_warnings():  # ops without a batching rule run in a loop inside vmap
                        warnings.filterwarnings("ignore", message="There is a performance drop")
                        batched = torch.func.vmap(self._one, in_dims=(None, 0, 0))
                        outputs, grads = batched(self.params, inputs, cotangents)
                    return list(outputs), list(grads)
                except Exception:  # noqa: BLE001 - e.g. data-dependent routing; the loop below is exact too
                    _VMAP_UNSUPPORTED.add(type(self.call.module))
            per_sample = [self._one(self.params, [x[b] for x in inputs], [c[b] for c in cotangents])
                          for b in range(len(rows))]
        outputs = [torch.stack([s[0][k] for s in per_sample]) for k in range(len(self.outputs))]
        grads = [torch.stack([s[1][k] for s in per_sample]) for k in range(len(self.params))]
        return outputs, grads

    def mismatch(self, rows: range, outputs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Whether the re-run outputs equal the recorded ones at real positions, and their largest relative
        difference (0-dim tensors, no host read). Where they differ the module does not treat samples
        independently (or an input's batch-sized leading dimension is not the batch)."""
        index = slice(rows.start, rows.stop)
        passed, figure = [], []
        for replayed, recorded, layout in zip(outputs, self.recorded, self.layouts):
            recorded = recorded[index]
            if layout.mask is not None:
                keep = broadcast_mask(layout.mask[index], recorded)
                replayed, recorded = torch.where(keep, replayed, 0), torch.where(keep, recorded, 0)
            dtype = _compute_dtype(recorded)
            difference = torch.linalg.vector_norm((replayed.to(dtype) - recorded.to(dtype)).flatten())
            scale = torch.linalg.vector_norm(recorded.to(dtype).flatten())
            tolerance = 1e-3 if torch.finfo(recorded.dtype).bits > 16 else 5e-2
            passed.append(difference <= tolerance * scale + torch.finfo(dtype).tiny)
            figure.append((difference / scale).double())
        return torch.stack(passed).all(), torch.stack(figure).max()


def mixing_samples_error(check: DeferredCheck, relative: float, setting: str) -> RuntimeError:
    """The error for a module whose generic re-run did not reproduce its output."""
    names = sorted({t.name for t in check.targets})
    return RuntimeError(
        f"the generic per-sample rule could not reproduce the output of {type(check.module).__name__} from one "
        f"sample's inputs (relative difference {relative:.1e}): the module mixes samples, or an input's leading "
        f"dimension only looks like the batch; narrow {setting} to exclude {names[:3]}"
    )


def _finite_padding(x: Tensor, layout: Layout, batch: Batch) -> Tensor:
    """``x`` with NaN at padding positions set to 0 (it would turn their zero gradients into NaN); real positions
    and everything else are untouched, so the module computes what it computed in the forward. Always one
    ``where``: asking whether there is any NaN would be a host sync."""
    if layout.mask is None or not x.is_floating_point():
        return x
    per_sample = batch.per_sample(x, layout)
    keep = broadcast_mask(layout.mask, per_sample) | ~torch.isnan(per_sample)
    return torch.where(keep, per_sample, 0).reshape(x.shape)
