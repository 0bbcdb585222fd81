"""The hooks of one pass: which module calls use which measured parameters, their records, and the squared norms."""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .layout import Batch
from .memory import MemoryAccount
from .planning import embeddings
from .products import (
    Method,
    _compute_dtype,
    _cross,
    _Outer,
    _Record,
    _self_square,
    _SharedInputs,
    batchable,
    batched_self_squares,
    on_device,
    record_device,
)
from .rules import (
    _CHECK_EPS,
    CHANNELWISE,
    EMBEDDING,
    GENERIC,
    Call,
    DeferredCheck,
    Rule,
    Target,
    autocast_as,
    autocast_state,
    generic_records,
    mixing_samples_error,
    reject_embedding,
    shared_sensitivities,
)

try:  # transformers is a dependency of the package, but keep this module importable on its own.
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover
    GradientCheckpointingLayer = None


@dataclass(eq=False)
class _HookedCall:
    """A call whose output gradient is awaited: its fast rules' captures, its generic targets, and the parameters
    it must leave out because an enclosing call re-runs them (``skip``)."""

    call: Call
    fast: list[tuple[Rule, list[Target], object]]
    generic: list[Target]
    skip: set[int] = field(default_factory=set)


@dataclass(eq=False)
class _Frame:
    """A module call in progress: measured parameters it used while none of their modules was running, and the
    calls hooked inside it."""

    module: nn.Module
    foreign: set[int] = field(default_factory=set)
    hooked: list[_HookedCall] = field(default_factory=list)


class _UseTracer(TorchFunctionMode):
    """Notes measured parameters that a module reads directly from a submodule, e.g. a Mamba mixer calling
    ``causal_conv1d_fn(x, self.conv1d.weight, ...)`` without calling ``self.conv1d``: those uses have no hooked
    call of the parameter's own module, so the module that read it is re-run by the generic rule instead.

    A ``TorchFunctionMode`` because reads of a parameter (``param.squeeze(1)``, ``param @ x``) are only visible
    as the torch functions they call; the check costs a dictionary lookup per tensor argument."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        recorder = self.recorder
        if recorder.replaying or not recorder.stack:
            return result
        keys = [k for k in map(recorder.watched.get, map(id, _tensor_arguments(args, kwargs))) if k is not None]
        if keys and _has_float_tensor(result):  # metadata reads (.dtype, .shape) are no use
            recorder.note_uses(keys)
        return result


def _tensor_arguments(args: tuple, kwargs: dict) -> Iterator[Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, Tensor))


def _has_float_tensor(value) -> bool:
    if isinstance(value, Tensor):
        return value.is_floating_point()
    return isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) and v.is_floating_point() for v in value)


class Recorder:
    """Hooks every module (a call stack for :class:`_UseTracer`) and the measured ones, pairs activations with
    output gradients, and accumulates per-row squared norms of each measured parameter's summed uses."""

    def __init__(
        self,
        model: nn.Module,
        targets: dict[nn.Module, list[Target]],
        method: Method,
        setting: str,
        temperature: float = 1.0,
        forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
        account: MemoryAccount | None = None,
    ) -> None:
        self.model, self.targets, self.method, self.setting = model, targets, method, setting
        self.account = account  # counts what a micro-batch keeps (memory probes only)
        self.temperature, self.forward_context = temperature, forward_context or contextlib.nullcontext
        self.owners: dict[int, list[nn.Module]] = defaultdict(list)
        self.names: dict[int, str] = {}
        for module, module_targets in targets.items():
            for target in module_targets:
                self.owners[target.key].append(module)
                self.names[target.key] = target.name
        self.watched = {id(m._parameters[t.path]): t.key for m, ts in targets.items() for t in ts}
        # FSDP2 swaps unsharded parameters into the modules for their forward: watch those objects too.
        self.swapping = any(type(m._parameters[t.path]) is not nn.Parameter for m, ts in targets.items() for t in ts)
        self.input_embeddings = embeddings(model, output=False)
        self.head = embeddings(model, output=True)
        # Checkpointed layers need a grad-requiring input, so the backward then starts at the embeddings.
        has_embeddings = self.input_embeddings is not None
        self.checkpointed_layers = _checkpointed_layers(model, list(targets)) if has_embeddings else []
        self.inputs = _SharedInputs()
        self.checks: list[DeferredCheck] = []  # of every micro-batch of a call, read at its end
        self.replaying = False
        self._in_forward = False
        self._fallbacks: set[str] = set()
        self._start(None, None)

    def _start(self, batch: Batch | None, squares: Tensor | None) -> None:
        """Per micro-batch state."""
        self.batch, self.squares, self.head_gathered = batch, squares, False
        self.scores: Tensor | None = None
        self.records: dict[int, list[_Record]] = defaultdict(list)
        self.pending: list[tuple[_HookedCall, Tensor]] = []
        self.received: dict[int, int] = defaultdict(int)
        self.calls: dict[nn.Module, int] = defaultdict(int)
        self.registered: dict[nn.Module, int] = defaultdict(int)
        self.stack: list[_Frame] = []
        self.active: dict[nn.Module, int] = defaultdict(int)
        self.foreign_by_module: dict[nn.Module, set[int]] = defaultdict(set)
        self.foreign_uses: dict[int, int] = defaultdict(int)
        self.foreign_sites: dict[int, set[str]] = defaultdict(set)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        handles = []
        try:
            if self.input_embeddings is not None:
                handles.append(self.input_embeddings.register_forward_hook(self._root_at_embeddings))
            if self.head is not None:
                handles.append(self.head.register_forward_pre_hook(self._gather_head_input))
            self.module_names = {m: n for n, m in self.model.named_modules()}
            for module in self.model.modules():
                handles.append(module.register_forward_pre_hook(self._enter))
                handles.append(module.register_forward_hook(self._leave, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.inputs.clear()
            self.checks.clear()
            self._start(None, None)

    def settle_checks(self) -> bool:
        """Read the call's deferred checks in one transfer (the pass's second host sync, only where there are any)
        and act on the failed ones: a module mixing samples raises; an embedding whose output was not c·W[ids]
        goes to the generic rule for good, and True asks the caller to measure the call again (unless the model is
        sharded: a re-run on one process would desynchronise the collectives of its forward, so that raises)."""
        checks, self.checks[:] = list(self.checks), []
        if not checks:
            return False
        device = checks[0].passed.device
        passed = torch.stack([c.passed.to(device) for c in checks]).to(torch.float64)
        figures = torch.stack([c.figure.to(device, torch.float64) for c in checks])
        values = torch.cat([passed, figures]).tolist()
        failed = [(c, f) for c, p, f in zip(checks, values[: len(checks)], values[len(checks) :]) if not p]
        for check, figure in failed:
            if check.rule is GENERIC:
                raise mixing_samples_error(check, figure, self.setting)
        for check, _ in failed:
            reject_embedding(check.module)
        if failed and self.sharded:
            names = sorted({t.name for check, _ in failed for t in check.targets})
            raise RuntimeError(
                f"{names} did not compute what the embedding rule assumes (c·W[ids]) in this call of a sharded "
                f"model; they are measured by the generic rule from the next call on, or narrow {self.setting} to "
                "exclude them"
            )
        for check, _ in failed:
            self._warn_fallback(check.module, EMBEDDING, check.targets)
        return bool(failed)

    @property
    def sharded(self) -> bool:
        """Parameters sharded across processes (FSDP2's DTensors, DeepSpeed ZeRO-3's partitions)."""
        return self.swapping or any(hasattr(m._parameters[t.path], "ds_shape") for m, ts in self.targets.items()
                                    for t in ts)

    @contextlib.contextmanager
    def replay_mode(self) -> Iterator[None]:
        """Modules re-run by the rules (checks, generic replays) are invisible to the hooks and the tracer."""
        previous, self.replaying = self.replaying, True
        try:
            yield
        finally:
            self.replaying = previous

    def measure(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        loss_mask: Tensor,
        columns: slice,
        head_length: int,
        score_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Squared norms of one micro-batch (float64 [b]) and, given ``score_mask``, the log-probabilities of its
        scored tokens at ``self.temperature`` (float32 [b, T], NaN where not scored; None without ``score_mask``).

        ``columns`` hold its real tokens, ``head_length`` is its most counted or scored tokens in a row (both read
        by the caller in its one host sync); ``position_ids`` (None: counted over real tokens) cover all T columns.
        """
        batch, width = input_ids.shape
        squares = torch.zeros(batch, dtype=torch.float64, device=input_ids.device)
        scores = None
        if score_mask is not None:
            scores = torch.full((batch, width), float("nan"), dtype=torch.float32, device=input_ids.device)
        if head_length == 0:
            return squares, scores
        input_ids, attention_mask, loss_mask = (x[:, columns] for x in (input_ids, attention_mask, loss_mask))
        if score_mask is not None:
            score_mask = score_mask[:, columns]
        if position_ids is not None:
            position_ids = position_ids[:, columns]
        self._start(Batch.build(input_ids, attention_mask, loss_mask, head_length, score_mask), squares)
        try:
            self._in_forward = True
            with _UseTracer(self), self.account.saving() if self.account else contextlib.nullcontext():
                log_prob = self._log_prob(input_ids, attention_mask, position_ids)
            self._in_forward = False
            # Autocast covers the forward only (a caller's too): the backward takes the forward's dtypes, the
            # products stay in fp32, and re-runs enter the autocast of their own call.
            with autocast_as((), input_ids.device.type):
                if log_prob.requires_grad:
                    log_prob.backward()
                self._reduce()
            self._warn_unused()
            if scores is not None:
                # Head position l of row b reads column head_index[b, l] (distinct per row) and scores the token
                # after it; a scatter, not a boolean index, keeps the pass free of host syncs.
                token_columns = self.batch.head_index + 1 + (columns.start or 0)
                scores.scatter_(1, token_columns, torch.where(self.batch.scored, self.scores, float("nan")))
        finally:
            self._in_forward = False
            self.records.clear()
            self.pending.clear()
            self.inputs.clear()
            self.stack.clear()
            self.scores = None
        return squares, scores

    def _reduce(self) -> None:
        """After the backward: every use's record from the kept references, then the squared norms — single-use
        parameters in a few batched kernels across layers, the others (tied, called twice) use by use."""
        with torch.no_grad(), self.replay_mode():
            shared_sensitivities([(hooked.call, captured) for hooked, _ in self.pending
                                  for rule, _, captured in hooked.fast if rule is CHANNELWISE])
            for hooked, grad in self.pending:
                for rule, targets, captured in hooked.fast:
                    for target, record in zip(targets, rule.records(hooked.call, targets, captured, grad)):
                        if target.key not in hooked.skip:
                            self._add(target.key, record)
            self.pending.clear()
            batched = []
            for key, records in list(self.records.items()):
                if len(records) == 1 and self._uses(key) == 1 and batchable(records[0], self.method):
                    batched.append(records[0])
                    del self.records[key]
            if batched:
                self.squares += batched_self_squares(batched, self.batch.size, self.squares.device)
        for key in list(self.records):
            self._finalize(key)

    def _log_prob(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Σ over the batch of the counted tokens' log-probabilities (rows are independent, so its gradient w.r.t.
        a row's activations is that row's own); the scored tokens' tempered log-probabilities, detached, go to
        ``self.scores``."""
        with self.forward_context():
            logits = _logits(self.model, input_ids, attention_mask, prepared_mask_kinds(self.model), position_ids)
        if self.account is not None:
            self.account.keep_gradient(logits)
        device = logits.device  # the last device of a model split by device_map
        if not self.head_gathered:
            index = self.batch.head_index.to(device)
            logits = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
        targets = self.batch.targets.to(device)
        if logits.shape[:2] != targets.shape:
            raise RuntimeError(f"logits of shape {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
        if self.batch.scored is not None:
            tokens = self.batch.tokens.to(device)
            self.scores = tempered_log_probs(logits.detach(), tokens, self.temperature).to(self.batch.valid.device)
        logits, targets = logits.flatten(0, 1), targets.flatten()
        if logits.dtype in (torch.float32, torch.float64):
            return -nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        return _CountedLogProbs.apply(logits, targets)

    # -- hooks --------------------------------------------------------------------------------------------------

    def _root_at_embeddings(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """Cut autograd below the embeddings (and other hooks' ``requires_grad_``); start it there only when
        checkpointed layers need a grad-requiring input. Measured embeddings become a root in ``_leave``."""
        if self.replaying or not self._in_forward or not isinstance(output, Tensor):
            return None
        output = output.detach()
        return output.requires_grad_() if self.checkpointed_layers else output

    def _gather_head_input(self, module: nn.Module, args: tuple) -> tuple | None:
        """Feed the head only the positions whose next token counts: [B, L, d] instead of [B, T, d]."""
        hidden = args[0] if args else None
        if self.replaying or not self._in_forward or self.head_gathered or not isinstance(hidden, Tensor):
            return None
        if hidden.ndim != 3 or hidden.shape[:2] != self.batch.valid.shape:
            return None
        self.head_gathered = True
        index = self.batch.head_index.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1])
        head_valid = self.batch.head_valid.to(hidden.device)
        return (torch.where(head_valid[..., None], hidden.gather(1, index), 0), *args[1:])

    def _enter(self, module: nn.Module, args: tuple) -> None:
        if self.replaying or self.batch is None:
            return
        self.stack.append(_Frame(module))
        self.active[module] += 1
        if self.swapping:  # a module reads its children's parameters at most (Mamba mixers)
            for owner in (module, *module.children()):
                for target in self.targets.get(owner, ()):
                    self.watched[id(owner._parameters[target.path])] = target.key

    def note_uses(self, keys: list[int]) -> None:
        """Parameters read by the innermost running module while none of their owning modules runs."""
        frame = self.stack[-1]
        for key in keys:
            if not any(self.active[owner] for owner in self.owners[key]):
                frame.foreign.add(key)

    def _leave(self, module: nn.Module, args: tuple, kwargs: dict, output) -> object:
        if self.replaying or self.batch is None or not self.stack or self.stack[-1].module is not module:
            return None
        frame = self.stack.pop()
        self.active[module] -= 1
        replaced = self._hook_call(module, args, kwargs, output, frame)
        if self.stack:
            self.stack[-1].hooked.extend(frame.hooked)
        return replaced

    def _foreign_targets(self, module: nn.Module, frame: _Frame) -> list[Target]:
        """Generic targets for the parameters this call read outside their own modules (from the forward's notes
        when the call is a checkpoint's recompute)."""
        if self._in_forward:
            keys = frame.foreign
            self.foreign_by_module[module] |= keys
            for key in keys:
                self.foreign_uses[key] += 1
                self.foreign_sites[key].add(self.module_names.get(module, type(module).__name__))
        else:
            keys = self.foreign_by_module.get(module, set())
        if not keys:
            return []
        if module is self.model:
            names = sorted(self.names[k] for k in keys)
            raise NotImplementedError(
                f"{names[:3]} are used by the model's own forward, outside any submodule: their per-sample "
                f"gradients cannot be measured; narrow {self.setting} to exclude them"
            )
        paths = {}
        for path, p in module.named_parameters(remove_duplicate=False):
            key = self.watched.get(id(p))
            if key in keys:
                paths.setdefault(key, path)
        return [Target(self.names[k], paths[k], k, GENERIC, tuple(module.get_parameter(paths[k]).shape))
                for k in keys if k in paths]

    def _hook_call(self, module: nn.Module, args: tuple, kwargs: dict, output, frame: _Frame) -> object:
        """Hook the output gradient of a call that uses measured parameters; an output that needs no grad yet
        becomes a root (a detached, grad-requiring copy)."""
        static = self.targets.get(module, [])
        foreign = self._foreign_targets(module, frame)
        if not static and not foreign:
            return None
        if self._in_forward:
            self.calls[module] += 1
        elif self.registered[module] >= self.calls[module]:
            return None  # checkpoint recompute of a call already hooked in the forward
        if not torch.is_grad_enabled():
            return None  # first pass of a reentrant checkpoint: hooked when recomputed
        leaves, spec = tree_flatten(output)
        floats = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.is_floating_point()]
        if not floats:
            return None
        replaced = None
        if not any(leaves[i].requires_grad for i in floats):
            if not self._in_forward:
                return None
            for i in floats:
                leaves[i] = leaves[i].detach().requires_grad_()
            replaced = output = leaves[floats[0]] if isinstance(output, Tensor) else tree_unflatten(leaves, spec)
        graded = [i for i in floats if leaves[i].requires_grad]
        if len(graded) > 1 and replaced is None:
            # An output computed from another (a router's scores from its logits) would receive, through that one,
            # gradient from inside the module: hooking aliases leaves each with only the gradient from outside.
            for i in graded:
                leaves[i] = leaves[i].view_as(leaves[i])
            replaced = tree_unflatten(leaves, spec)
        for i in graded:
            if self.batch.layout(leaves[i]) is None:
                names = sorted({t.name for t in static + foreign})
                raise RuntimeError(
                    f"{type(module).__name__} output of shape {tuple(leaves[i].shape)} does not lead with the batch "
                    f"dimension: its per-sample gradients cannot be told apart; narrow {self.setting} to exclude "
                    f"{names[:3]}"
                )
        self.registered[module] += 1
        for hooked in frame.hooked:  # this call's re-run covers every use of these parameters inside it
            hooked.skip.update(t.key for t in foreign)
        device_type = leaves[graded[0]].device.type
        call = Call(module, args, kwargs, leaves, graded, self.batch, self.inputs, self.checks,
                    autocast_state(device_type))
        hooked = _HookedCall(call, [], list(foreign))
        plain = isinstance(output, Tensor) and len(graded) == 1
        for rule, targets in _by_rule(static).items():
            captured = None
            if rule is not GENERIC and plain:
                with self.replay_mode():
                    captured = rule.capture(call, targets)
                if captured is None and rule.is_checked(module):
                    self._warn_fallback(module, rule, targets)
            if captured is None:
                hooked.generic.extend(targets)
            else:
                hooked.fast.append((rule, targets, captured))
        frame.hooked.append(hooked)
        tensors = [leaves[i] for i in graded]
        if not hooked.generic:
            call.args, call.kwargs, call.leaves = (), {}, []  # fast rules keep only their captures (not the logits)
        if self.account is not None:
            self.account.add(hooked)
        if len(tensors) == 1:
            tensors[0].register_hook(lambda grad: self._on_grad(hooked, (grad,)))
        else:
            torch.autograd.graph.register_multi_grad_hook(tensors, functools.partial(self._on_grad, hooked))
        return replaced

    def _on_grad(self, hooked: _HookedCall, grads) -> None:
        """Fast rules only keep the gradient (reduced after the backward); the generic rule re-runs its module now."""
        call = hooked.call
        if self.account is not None:
            self.account.add(grads)
        if hooked.fast:
            self.pending.append((hooked, grads[0]))
        generic = [t for t in hooked.generic if t.key not in hooked.skip]
        if generic:
            single = {t.key for t in generic if self._uses(t.key) == 1}
            with self.replay_mode():
                records = generic_records(call, generic, grads, single)
            for target, record in zip(generic, records):
                self._add(target.key, record)

    def _uses(self, key: int) -> int:
        return sum(self.calls[m] for m in self.owners[key]) + self.foreign_uses[key]

    def _add(self, key: int, record: _Record | None) -> None:
        if record is not None:
            self.records[key].append(record)
            if self.account is not None:
                self.account.add(record)
        self.received[key] += 1

    def _finalize(self, key: int) -> None:
        """Add ‖Σ_k G_k‖² = Σ_k ‖G_k‖² + 2Σ_{k<l}⟨G_k, G_l⟩ of one parameter to the squares."""
        records = self.records.pop(key, [])
        device = self.squares.device
        with torch.no_grad():
            for i, rec in enumerate(records):
                self.squares += _self_square(rec, self.method, self.inputs).to(device)
                for other in records[i + 1 :]:  # uses on other devices (device_map) meet on this one's
                    self.squares += 2 * _cross(rec, on_device(other, record_device(rec)), self.method).to(device)
        for rec in records:
            if isinstance(rec, _Outer):
                self.inputs.release(rec.left_key)
                self.inputs.release(rec.right_key)

    def _warn_fallback(self, module: nn.Module, rule: Rule, targets: list[Target]) -> None:
        names = [t.name for t in targets]
        message = (
            f"{names} ({type(module).__name__}) do not compute what the {rule.name} rule assumes in this call: "
            "measured by the exact, slower generic rule"
        )
        if message not in self._fallbacks:
            self._fallbacks.add(message)
            warnings.warn(message, UserWarning, stacklevel=2)

    def _warn_unused(self) -> None:
        unused = [self.names[k] for k in self.owners if self._uses(k) == 0]
        if unused:
            warnings.warn(
                f"{unused[:5]} (of {len(unused)}) were not used in the forward pass: their per-sample gradient is 0",
                stacklevel=4,
            )
        foreign = sorted(f"{self.names[k]} (in {', '.join(sorted(s))})" for k, s in self.foreign_sites.items())
        if foreign:
            message = (
                f"{foreign[:3]} (of {len(foreign)}) are used outside their own module's forward: measured by the "
                "exact, slower generic rule at the module that uses them"
            )
            if message not in self._fallbacks:
                self._fallbacks.add(message)
                warnings.warn(message, UserWarning, stacklevel=4)


def _by_rule(targets: list[Target]) -> dict[Rule, list[Target]]:
    groups: dict[Rule, list[Target]] = defaultdict(list)
    for target in targets:
        groups[target.rule].append(target)
    return groups


# --------------------------------------------------------------------------------------------------------------
# Model state


@contextlib.contextmanager
def measurement_mode(model: nn.Module, checkpointed: list[nn.Module]) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration; checkpointed layers keep their training flag only."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for layer in checkpointed:
            layer.training = True  # HF layers checkpoint only in training; their submodules (dropout) stay in eval
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _checkpointed_layers(model: nn.Module, measured: list[nn.Module]) -> list[nn.Module]:
    """HF layers with gradient checkpointing on, if any of them holds a measured module (else none is needed)."""
    if GradientCheckpointingLayer is None:  # pragma: no cover
        return []
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    inside = {id(sub) for layer in layers for sub in layer.modules()}
    return layers if any(id(m) in inside for m in measured) else []


# Largest fp32 temporary of the head step, in elements: low-precision logits are up-cast in row chunks this large.
_HEAD_CHUNK_ELEMENTS = 1 << 28


class _CountedLogProbs(torch.autograd.Function):
    """Σ_i log softmax(logits_i)[target_i] over rows with a target (-100: none), and its gradient
    onehot(target_i) − softmax(logits_i), in the logits' dtype.

    For low-precision logits, instead of ``cross_entropy`` on logits cast to fp32, which keeps a full fp32 copy of
    the [B·L, V] logits and its fp32 gradient: rows are up-cast in chunks of ``_HEAD_CHUNK_ELEMENTS``, and only the
    per-row log-normaliser is kept for the backward. (fp32 logits use ``cross_entropy``, faster on a CPU.)"""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        counted = targets >= 0
        index = targets.clamp(min=0)[:, None]
        normalisers, total = [], torch.zeros((), dtype=_compute_dtype(logits), device=logits.device)
        for rows in _head_chunks(logits):
            chunk = logits[rows].to(total.dtype)
            normaliser = chunk.logsumexp(-1)
            picked = chunk.gather(1, index[rows])[:, 0]
            total = total + torch.where(counted[rows], picked - normaliser, 0).sum()
            normalisers.append(normaliser)
        ctx.save_for_backward(logits, index, counted, torch.cat(normalisers) if len(normalisers) > 1 else
                              normalisers[0])
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor, None]:
        logits, index, counted, normaliser = ctx.saved_tensors
        chunks = _head_chunks(logits)
        grad = torch.empty_like(logits) if len(chunks) > 1 else None
        for rows in chunks:
            probabilities = (logits[rows].to(normaliser.dtype) - normaliser[rows, None]).exp_().neg_()
            probabilities.scatter_add_(1, index[rows], torch.ones_like(index[rows], dtype=normaliser.dtype))
            chunk = torch.where(counted[rows, None], probabilities, 0).mul_(grad_total)
            if grad is None:
                return chunk.to(logits.dtype), None
            grad[rows] = chunk
        return grad, None


def tempered_log_probs(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / temperature)[token], float32 [..., ] (no gradient), as TRL's fused head computes it: the
    logits up-cast to fp32, times 1/temperature, minus their logsumexp; in row chunks of ``_HEAD_CHUNK_ELEMENTS``."""
    flat, index = logits.detach().flatten(0, -2), tokens.flatten()[:, None]
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    inverse = 1 / temperature
    step = max(1, _HEAD_CHUNK_ELEMENTS // max(flat.shape[-1], 1))
    with torch.no_grad():
        for start in range(0, flat.shape[0], step):
            rows = slice(start, start + step)
            z = flat[rows].float() * inverse
            out[rows] = z.gather(1, index[rows])[:, 0] - z.logsumexp(-1)
    return out.view(tokens.shape)


def _head_chunks(logits: Tensor) -> list[slice]:
    if logits.dtype in (torch.float32, torch.float64) or logits.numel() <= _HEAD_CHUNK_ELEMENTS:
        return [slice(None)]
    step = max(1, _HEAD_CHUNK_ELEMENTS // logits.shape[-1])
    return [slice(i, i + step) for i in range(0, logits.shape[0], step)]


def _logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    prepared: tuple[str, ...] | None,
    position_ids: Tensor | None = None,
    mask: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The model's logits, with ``position_ids`` (None: counted over real tokens); ``prepared``: None for the 2-D
    padding mask, else the layer kinds of a prepared mask (see :func:`prepared_mask_kinds`), whose full-attention
    part ``mask`` builds (default :func:`_causal_mask`)."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask.long()}
    if _accepts(model, "position_ids"):
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        kwargs["position_ids"] = position_ids
    elif position_ids is not None:
        raise TypeError(f"{type(model).__name__}.forward takes no position_ids: they cannot be chosen")
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    if prepared is not None:
        kwargs["attention_mask"] = _prepared_mask(attention_mask, prepared, mask or _causal_mask)
    output = model(**kwargs)
    return output.logits if hasattr(output, "logits") else output[0]


def _prepared_mask(real: Tensor, kinds: tuple[str, ...], causal: Callable[[Tensor], Tensor]) -> Tensor | dict:
    """One [B, 1, T, T] mask (``kinds`` empty), or transformers' mapping of layer kind to mask for models mixing
    kinds: the 4-D mask for full attention, the 2-D padding mask for recurrent (linear-attention) layers."""
    if not kinds:
        return causal(real)
    return {kind: causal(real) if kind == "full_attention" else real.long() for kind in kinds}


def _causal_mask(real: Tensor) -> Tensor:
    """[B, 1, T, T] boolean: query t sees the real keys s ≤ t, and a padding query sees itself (no empty row, whose
    softmax would be NaN)."""
    length = real.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=real.device).tril_()
    own = torch.eye(length, dtype=torch.bool, device=real.device)
    return ((causal & real[:, None, :]) | own)[:, None]


def _bidirectional_mask(real: Tensor) -> Tensor:
    """[B, 1, T, T] boolean: every query sees every real key (and itself). Its effect on the logits is the scale
    against which :func:`_probe_prepared_mask` judges a difference."""
    own = torch.eye(real.shape[1], dtype=torch.bool, device=real.device)
    return (real[:, None, :] | own)[:, None]


_PREPARED_MASK: weakref.WeakKeyDictionary[nn.Module, tuple[str, ...] | None] = weakref.WeakKeyDictionary()
# Layer kinds whose masks depend on more than causality and padding (a window, chunks): left to the model.
_WINDOWED_KINDS = ("sliding_attention", "chunked_attention")


def takes_prepared_mask(model: nn.Module) -> bool:
    """Whether ``model`` computes the same logits at real positions from a prepared mask (:func:`_prepared_mask`)
    as from its 2-D padding mask. transformers then skips its own mask preparation, which reads the mask on the host
    (``_ignore_causal_mask_sdpa`` twice, a recurrent layer's all-ones check once) — host syncs on every forward.
    Tried once per model, on a small left- and right-padded probe batch in eval mode; only for transformers models
    using SDPA (other attention kernels take other mask formats). Sliding-window and chunked layers keep the 2-D
    mask (windows longer than the probe would pass it), and so does any model the comparison fails."""
    return prepared_mask_kinds(model) is not None


def prepared_mask_kinds(model: nn.Module) -> tuple[str, ...] | None:
    """None: the model prepares its own mask; else the layer kinds of the prepared mask (empty: one 4-D tensor)."""
    if model not in _PREPARED_MASK:
        _PREPARED_MASK[model] = _probe_prepared_mask(model)
    return _PREPARED_MASK[model]


def _probe_prepared_mask(model: nn.Module) -> tuple[str, ...] | None:
    """The prepared mask's layer kinds if, on a probe batch, it gives the model's own logits up to rounding.

    The tolerance is ``_CHECK_EPS`` units of the logits' precision at their largest magnitude (0.125·max in bf16,
    0.016·max in fp16, 2e-6·max in fp32), capped at a quarter of what a non-causal mask changes: a correct mask
    gives the very same computation (in practice a difference of exactly 0), a wrong one changes logits by a
    sizeable share of the attention's effect."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "is_encoder_decoder", False):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if any(kind in _WINDOWED_KINDS for kind in layer_types):
            return None
        mixed = set(layer_types) - {"full_attention"}
        kinds = tuple(k for k in ("full_attention", "linear_attention") if k in set(layer_types)) if mixed else ()
    elif getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return None
    else:
        kinds = ()
    if getattr(config, "attention_chunk_size", None) is not None:
        return None
    embedding = embeddings(model, output=False)
    weight = getattr(embedding, "weight", None)
    if type(weight) is not nn.Parameter or weight.device.type == "meta" or weight.ndim != 2:
        return None  # sharded (FSDP, ZeRO-3) or not materialised: keep the model's own mask preparation
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, weight.shape[0], (3, 9), generator=generator).to(weight.device)
    real = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9, [1, 1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool,
                        device=weight.device)
    try:
        with torch.inference_mode(False), torch.no_grad(), measurement_mode(model, []), _hooks_silenced(model):
            own = _logits(model, ids, real, None)
            prepared = _logits(model, ids, real, kinds)
            wrong = _logits(model, ids, real, kinds, mask=_bidirectional_mask)
    except Exception:  # noqa: BLE001 - a model that cannot take the prepared mask keeps its own
        return None
    if not all(isinstance(x, Tensor) and x.shape == own.shape for x in (prepared, wrong)):
        return None
    own, prepared, wrong = (x.double()[real] for x in (own, prepared, wrong))
    rounding = _CHECK_EPS * torch.finfo(weight.dtype).eps * own.abs().max()
    tolerance = torch.minimum(rounding, (own - wrong).abs().max() / 4)
    accepted = torch.isfinite(prepared).all() & ((own - prepared).abs().max() <= tolerance)
    return kinds if bool(accepted) else None


@contextlib.contextmanager
def _hooks_silenced(model: nn.Module) -> Iterator[None]:
    """The model's own forward hooks left out (and put back) while it runs an internal probe they should not see."""
    names = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
             "_forward_hooks_always_called")
    saved = [(m, name, getattr(m, name)) for m in model.modules() for name in names if hasattr(m, name)]
    try:
        for module, name, hooks in saved:
            setattr(module, name, type(hooks)())
        yield
    finally:
        for module, name, hooks in saved:
            setattr(module, name, hooks)


def _accepts(model: nn.Module, name: str) -> bool:
    parameters = inspect.signature(model.forward).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
