r"""Per-sample gradient norms ‖∇_θ ln P(y | x)‖₂ for a batch of completions, in one forward and one backward.

GVM weights each prompt by the mean norm of the per-sample gradient of ln P(y|x) = Σ_t log p_θ(y_t | ·) (a
*sum* over completion tokens) over its accepted completions. Autograd only gives the gradient of a sum over the
batch; looping over samples costs a backward each, and ``torch.func`` per-sample gradients need B×|θ| memory.
This module instead hooks the modules that own the measured parameters and rebuilds per-sample squared norms from
what each layer sees — its input activations a_t and the gradients g_t of its output — with the parameters
frozen, so no weight gradient is ever formed.

Per-sample gradient of each parameter kind, summed over the positions t of one sample:

* ``nn.Linear`` (W: out×in) G = Σ_t g_t a_tᵀ; transformers' ``Conv1D`` stores W transposed, G = Σ_t a_t g_tᵀ.
  Either materialise G (cost ∝ T·d_in·d_out), or use the Gram ("ghost norm") identity

      ‖G‖²_F = Σ_{t,s} (a_t·a_s)(g_t·g_s)          (cost ∝ T²·(d_in + d_out)).

  :func:`_choose_method` picks per layer and sequence length whichever costs less (mixed ghost norm, as in the
  book-keeping method of Bu et al. 2022). Layers reading one input (q/k/v, gate/up) share its Gram.
* ``nn.Embedding`` (rows selected by token ids): G = Σ_t e_{id_t} g_tᵀ, so ‖G‖² = Σ_{t,s} [id_t = id_s](g_t·g_s)
  (token-equality ghost norm, ``method="ghost"``), or — otherwise — sum the g_t of equal ids per sample (a segment
  sum over unique (sample, id) pairs) and square, O(T·d).
* biases (of Linear, Conv1D and norm layers): G = Σ_t g_t.
* norm-layer weights (1-D parameters of ``*Norm`` modules, where output channel i depends on p_i only):
  G = Σ_t u_t ⊙ g_t with u = ∂y/∂p, taken by forward-mode AD of the module, so RMSNorm, LayerNorm and variants
  such as Gemma's (1 + w) are all exact without per-class formulas.

A parameter reached by several uses k (tied ``embed_tokens``/``lm_head``, a module called twice) has per-sample
gradient Σ_k G_k and ‖Σ_k G_k‖² = Σ_k ‖G_k‖² + 2 Σ_{k<l} ⟨G_k, G_l⟩. Uses are grouped by parameter identity and
the cross terms computed from the same factors, e.g. for a tied head (a_s, g_s at loss positions s) and embedding
(ids id_t, gradients e_t): ⟨G_head, G_emb⟩ = Σ_{t,s} g_s[id_t] (a_s·e_t). Dropping it is wrong (measured: 2e-3
relative error at random init, more on trained models).

Autograd never reaches further down than needed: all parameters are frozen during the call and gradients start
from detached, grad-requiring copies of the outputs of the lowest measured modules, so ``params="lm_head"`` costs a
forward plus a backward through the head only. The head is fed only the positions whose next token counts (its
input is gathered to B×L×d, L = most counted tokens in a row), never B×T×V logits. With HF gradient checkpointing
on layers that hold measured parameters, checkpointing stays on and the backward starts at the input embeddings
(checkpointed layers need a grad-requiring input); forward hooks re-run by the recompute are not counted twice.

Limits: a parameter used outside its module's ``forward`` (e.g. ``F.linear(h, self.embed.weight)``) is not seen
(a warning names modules never called); checkpointing other than HF's ``GradientCheckpointingLayer`` must be off;
under non-reentrant checkpointing (HF's default) the inputs of measured layers are kept from the forward, as
without checkpointing.

Why hand-written: Opacus' ghost clipping and private-transformers use the same identities, but around DP-SGD's
clipped update and their own model wrappers, without a per-layer choice of method, and they refuse (or ignore the
cross terms of) shared parameters; here any Hugging Face causal LM, PEFT-wrapped or not, is measured in place and
left exactly as it was.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

try:  # transformers is a dependency of the package, but keep this module importable on its own.
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    GradientCheckpointingLayer = Conv1D = None

__all__ = ["per_sample_grad_norms"]

from .products import (
    Method,
    _choose_method,
    _compute_dtype,
    _Dense,
    _Outer,
    _cross,
    _masked,
    _Record,
    _self_square,
    _SharedInputs,
)

ParamSelection = str | Callable[[str, nn.Parameter], bool]

_METHODS = ("auto", "ghost", "materialize")
_NAMED_SELECTIONS = ("trainable", "all", "embed_tokens", "lm_head")
_LINEAR, _CONV1D, _EMBEDDING, _CHANNELWISE = "linear", "conv1d", "embedding", "channelwise"


def per_sample_grad_norms(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    loss_mask: Tensor,
    *,
    params: ParamSelection = "trainable",
    micro_batch_size: int | None = None,
    method: Method = "auto",
) -> Tensor:
    """‖∇_θ Σ_t loss_mask[b,t]·log p_θ(input_ids[b,t] | input_ids[b,<t])‖₂ for every row b: float32 [B].

    Args:
        model: a causal LM whose forward takes ``input_ids``/``attention_mask`` and returns ``.logits`` (HF or PEFT).
        input_ids: [B, T] token ids, left or right padded.
        attention_mask: [B, T], 1 on real tokens (``None``: no padding).
        loss_mask: [B, T] aligned with ``input_ids``; non-zero where the token's log-probability counts (bool, int or
            float). Position 0 cannot count, nor can padding.
        params: which parameters θ spans: ``"trainable"`` (``requires_grad``), ``"all"``, ``"embed_tokens"`` (the
            input embedding matrix, the official GVM code's choice), ``"lm_head"`` (the output embedding matrix; with
            tied embeddings both names mean the shared matrix, with both its contributions), otherwise a regular
            expression searched in parameter names (any alias of a tied parameter) or a predicate ``(name, param)``.
        micro_batch_size: rows per forward/backward (``None``: all at once).
        method: ``"auto"`` chooses ghost or materialised norms per layer and length (:func:`_choose_method`);
            ``"ghost"``/``"materialize"`` force one (for embeddings: token-equality Gram / segment sums).

    The model runs in eval mode (no dropout), with position ids counted over real tokens as in generation, so
    padding does not change a row's norm. It is left as found: no hooks, the same ``.grad`` (none is created),
    ``requires_grad`` flags and per-module train/eval modes. HF gradient checkpointing, if enabled on layers that
    hold measured parameters, stays on. Rows are measured in micro-batches of similar lengths.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    selected = _select_parameters(model, params)
    targets = _targets(model, selected)
    device, out_device = _model_device(model), input_ids.device
    recorder = _Recorder(model, targets, method)
    # Callers may hold no_grad or inference mode (e.g. around generation); the measurement needs autograd.
    with torch.inference_mode(False), torch.enable_grad():
        input_ids, attention_mask, loss_mask = _check_inputs(input_ids, attention_mask, loss_mask, device)
        batch = input_ids.shape[0]
        step = micro_batch_size or max(batch, 1)
        # Micro-batches of similar lengths carry less padding.
        order = torch.argsort(attention_mask.sum(1), descending=True, stable=True)
        squares = torch.zeros(batch, dtype=torch.float64, device=device)
        with _measurement_mode(model, recorder.checkpointed_layers), recorder.attached():
            for start in range(0, batch, step):
                rows = order[start : start + step]
                squares[rows] = recorder.measure(input_ids[rows], attention_mask[rows], loss_mask[rows])
    return squares.clamp(min=0).sqrt().to(device=out_device, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------
# Inputs and parameter selection


def _check_inputs(
    input_ids: Tensor, attention_mask: Tensor | None, loss_mask: Tensor, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Validated copies on ``device`` (copies: inputs made under inference mode cannot enter autograd)."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    for name, mask in (("attention_mask", attention_mask), ("loss_mask", loss_mask)):
        if mask.shape != input_ids.shape:
            raise ValueError(f"{name} must have the shape {tuple(input_ids.shape)} of input_ids, got {tuple(mask.shape)}")
    input_ids = input_ids.to(device).clone()
    attention_mask, loss_mask = attention_mask.to(device) != 0, loss_mask.to(device) != 0
    if loss_mask[:, :1].any():
        raise ValueError("loss_mask[:, 0] must be 0: the first token has no log-probability")
    if (loss_mask & ~attention_mask).any():
        raise ValueError("loss_mask marks padding tokens (attention_mask == 0)")
    return input_ids, attention_mask, loss_mask


def _select_parameters(model: nn.Module, params: ParamSelection) -> dict[int, tuple[str, nn.Parameter]]:
    """Parameters chosen by ``params``, keyed by identity (tied parameters once, under their first name)."""
    named = list(model.named_parameters(remove_duplicate=False))
    if callable(params):
        chosen = [p for n, p in named if params(n, p)]
    elif not isinstance(params, str):
        raise TypeError(f"params must be a string or a callable (name, param) -> bool, got {type(params).__name__}")
    elif params == "trainable":
        chosen = [p for _, p in named if p.requires_grad]
    elif params == "all":
        chosen = [p for _, p in named]
    elif params in ("embed_tokens", "lm_head"):
        chosen = [_embedding_weight(model, output=params == "lm_head")]
    else:
        try:
            pattern = re.compile(params)
        except re.error as err:
            message = f"params={params!r} is neither one of {_NAMED_SELECTIONS} nor a valid regex: {err}"
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
            f"params={params!r} selects no parameter; accepted: {_NAMED_SELECTIONS}, a regex searched in parameter "
            f"names (e.g. {examples}) or a predicate (name, param) -> bool"
        )
    return selected


def _embeddings(model: nn.Module, *, output: bool) -> nn.Module | None:
    """``model.get_output_embeddings()`` or ``get_input_embeddings()``, None where the model has none."""
    try:
        module = getattr(model, "get_output_embeddings" if output else "get_input_embeddings")()
    except (AttributeError, NotImplementedError):
        return None
    return module if isinstance(module, nn.Module) else None


def _embedding_weight(model: nn.Module, *, output: bool) -> nn.Parameter:
    weight = getattr(_embeddings(model, output=output), "weight", None)
    if not isinstance(weight, nn.Parameter):
        getter = "get_output_embeddings" if output else "get_input_embeddings"
        raise ValueError(f"params={'lm_head' if output else 'embed_tokens'!r}: model.{getter}() has no weight")
    return weight


@dataclass(frozen=True, eq=False)
class _Target:
    """A selected parameter ``module.<attr>`` and how its per-sample gradient is formed (one of the kinds above)."""

    name: str
    attr: str
    param: nn.Parameter
    kind: str


def _targets(model: nn.Module, selected: dict[int, tuple[str, nn.Parameter]]) -> dict[nn.Module, list[_Target]]:
    """Owning module → measured parameters; raises for parameters whose module type has no per-sample rule."""
    targets: dict[nn.Module, list[_Target]] = defaultdict(list)
    owned = set()
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None and id(p) in selected:
                name = selected[id(p)][0]
                targets[module].append(_Target(name, attr, p, _kind(module, attr, p, name)))
                owned.add(id(p))
    missing = [name for key, (name, _) in selected.items() if key not in owned]
    if missing:  # pragma: no cover - every parameter is registered on some module
        raise ValueError(f"no owning module found for {missing}")
    return dict(targets)


def _kind(module: nn.Module, attr: str, param: nn.Parameter, name: str) -> str:
    cls = type(module)
    if isinstance(module, nn.Linear) and cls.forward is nn.Linear.forward and attr in ("weight", "bias"):
        return _LINEAR
    is_conv1d = Conv1D is not None and isinstance(module, Conv1D) and cls.forward is Conv1D.forward
    if is_conv1d and attr in ("weight", "bias"):
        return _CONV1D
    if isinstance(module, nn.Embedding) and cls.forward is nn.Embedding.forward and attr == "weight":
        if module.scale_grad_by_freq:
            raise NotImplementedError(f"{name}: nn.Embedding(scale_grad_by_freq=True) has no per-sample gradient")
        return _EMBEDDING
    if "Norm" in cls.__name__ and param.ndim == 1:
        return _CHANNELWISE
    raise NotImplementedError(
        f"cannot measure per-sample gradients of {name!r} ({cls.__name__}.{attr}, shape {tuple(param.shape)}): "
        "supported are weights/biases of nn.Linear, transformers Conv1D, nn.Embedding weights and 1-D parameters "
        "of *Norm modules; narrow `params` to exclude it"
    )


def _model_device(model: nn.Module) -> torch.device:
    weight = getattr(_embeddings(model, output=False), "weight", None)
    if isinstance(weight, Tensor):
        return weight.device
    return next(model.parameters()).device


# --------------------------------------------------------------------------------------------------------------
# Model state


@contextlib.contextmanager
def _measurement_mode(model: nn.Module, checkpointed: list[nn.Module]) -> Iterator[None]:
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


def _accepts(model: nn.Module, name: str) -> bool:
    parameters = inspect.signature(model.forward).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


# --------------------------------------------------------------------------------------------------------------
# Hooks


@dataclass
class _Batch:
    """One micro-batch: its real tokens, and where the head reads (position t-1 for a counted token t) and what.

    The head's L positions are fewer than the T of the layers below (position 0 never counts), so a tensor
    leading with [B, T] is never a head tensor: that is how hooks tell which mask applies.
    """

    valid: Tensor
    head_index: Tensor
    head_valid: Tensor
    targets: Tensor

    @classmethod
    def build(cls, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> _Batch:
        counted = loss_mask[:, 1:]
        length = int(counted.sum(1).max())
        order = torch.argsort((~counted).to(torch.int8), dim=1, stable=True)[:, :length]
        head_valid = torch.arange(length, device=input_ids.device) < counted.sum(1, keepdim=True)
        targets = torch.where(head_valid, input_ids.gather(1, order + 1), -100)
        return cls(attention_mask, order, head_valid, targets)


class _Recorder:
    """Hooks the measured modules, pairs activations with output gradients, accumulates per-row squared norms."""

    def __init__(self, model: nn.Module, targets: dict[nn.Module, list[_Target]], method: Method) -> None:
        self.model, self.targets, self.method = model, targets, method
        self.owners: dict[int, list[nn.Module]] = defaultdict(list)
        for module, module_targets in targets.items():
            for target in module_targets:
                self.owners[id(target.param)].append(module)
        self.input_embeddings = _embeddings(model, output=False)
        self.head = _embeddings(model, output=True)
        # Checkpointed layers need a grad-requiring input, so the backward then starts at the embeddings.
        has_embeddings = self.input_embeddings is not None
        self.checkpointed_layers = _checkpointed_layers(model, list(targets)) if has_embeddings else []
        self.inputs = _SharedInputs()
        self._in_forward = False
        self._start(None, None)

    def _start(self, batch: _Batch | None, squares: Tensor | None) -> None:
        """Per micro-batch state: records waiting for their parameter's other uses, calls hooked per module."""
        self.batch, self.squares, self.head_gathered = batch, squares, False
        self.records: dict[int, list[_Record]] = defaultdict(list)
        self.calls: dict[nn.Module, int] = defaultdict(int)
        self.registered: dict[nn.Module, int] = defaultdict(int)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        handles = []
        try:
            if self.input_embeddings is not None:
                handles.append(self.input_embeddings.register_forward_hook(self._root_at_embeddings))
            if self.head is not None:
                handles.append(self.head.register_forward_pre_hook(self._gather_head_input))
            for module in self.targets:
                handles.append(module.register_forward_hook(self._on_forward, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.inputs.clear()

    def measure(self, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> Tensor:
        """Squared norms of one micro-batch (float64 [b])."""
        batch = input_ids.shape[0]
        squares = torch.zeros(batch, dtype=torch.float64, device=input_ids.device)
        if not loss_mask.any():
            return squares
        columns = attention_mask.any(0).nonzero()
        columns = slice(int(columns[0]), int(columns[-1]) + 1)
        input_ids, attention_mask, loss_mask = (x[:, columns] for x in (input_ids, attention_mask, loss_mask))
        self._start(_Batch.build(input_ids, attention_mask, loss_mask), squares)
        try:
            self._in_forward = True
            log_prob = self._log_prob(input_ids, attention_mask)
            self._in_forward = False
            if log_prob.requires_grad:
                log_prob.backward()
            for key in list(self.records):
                self._finalize(key)
        finally:
            self._in_forward = False
            self.records.clear()
            self.inputs.clear()
        self._warn_uncalled()
        return squares

    def _log_prob(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Σ over the batch of the counted tokens' log-probabilities (rows are independent, so its gradient w.r.t.
        a row's activations is that row's own)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask.long()}
        if _accepts(self.model, "position_ids"):
            kwargs["position_ids"] = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        if _accepts(self.model, "use_cache"):
            kwargs["use_cache"] = False
        output = self.model(**kwargs)
        logits = output.logits if hasattr(output, "logits") else output[0]
        if not self.head_gathered:
            logits = logits.gather(1, self.batch.head_index[..., None].expand(-1, -1, logits.shape[-1]))
        targets = self.batch.targets
        if logits.shape[:2] != targets.shape:
            raise RuntimeError(f"logits of shape {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
        logits = logits.flatten(0, 1).to(_compute_dtype(logits))
        return -nn.functional.cross_entropy(logits, targets.flatten(), ignore_index=-100, reduction="sum")

    def _root_at_embeddings(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """Cut autograd below the embeddings (and other hooks' ``requires_grad_``); start it there only when
        checkpointed layers need a grad-requiring input. Measured embeddings become a root in ``_on_forward``."""
        if not self._in_forward or not isinstance(output, Tensor):
            return None
        output = output.detach()
        return output.requires_grad_() if self.checkpointed_layers else output

    def _gather_head_input(self, module: nn.Module, args: tuple) -> tuple | None:
        """Feed the head only the positions whose next token counts: [B, L, d] instead of [B, T, d]."""
        hidden = args[0] if args else None
        if not self._in_forward or self.head_gathered or not isinstance(hidden, Tensor):
            return None
        if hidden.ndim != 3 or hidden.shape[:2] != self.batch.valid.shape:
            return None
        self.head_gathered = True
        index = self.batch.head_index[..., None].expand(-1, -1, hidden.shape[-1])
        return (torch.where(self.batch.head_valid[..., None], hidden.gather(1, index), 0), *args[1:])

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
        """Hook the output gradient of each measured call; an output that needs no grad yet becomes a root."""
        if self._in_forward:
            self.calls[module] += 1
        elif self.registered[module] >= self.calls[module]:
            return None  # checkpoint recompute of a call already hooked in the forward
        if not torch.is_grad_enabled():
            return None  # first pass of a reentrant checkpoint: hooked when recomputed
        if output.shape[0] != self.batch.valid.shape[0]:
            raise RuntimeError(
                f"{type(module).__name__} output of shape {tuple(output.shape)} does not lead with the batch "
                "dimension: its per-sample gradients cannot be told apart"
            )
        replaced = None
        if not output.requires_grad:
            if not self._in_forward:
                return None
            output = replaced = output.detach().requires_grad_()
        self.registered[module] += 1
        captured = self._capture(module, args, kwargs, output)
        output.register_hook(functools.partial(self._on_grad, module, captured))
        return replaced

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> dict:
        """What the gradient hook needs besides the output gradient."""
        valid = self.batch.valid
        captured: dict = {"valid": valid if output.ndim == 3 and output.shape[:2] == valid.shape else None}
        kinds = {t.kind for t in self.targets[module] if t.attr != "bias"}
        inputs = args[0] if args else next(iter(kwargs.values()))
        if _EMBEDDING in kinds:
            captured["ids"] = inputs
            if module.padding_idx is not None:
                captured["valid"] = _and(captured["valid"], inputs != module.padding_idx)
        if kinds & {_LINEAR, _CONV1D}:
            captured["key"], captured["input"] = self.inputs.capture(inputs)
        if _CHANNELWISE in kinds:
            captured["sensitivity"] = {
                t.attr: _channel_sensitivity(module, t.attr, args, kwargs)
                for t in self.targets[module]
                if t.kind == _CHANNELWISE and t.attr != "bias"
            }
        return captured

    def _on_grad(self, module: nn.Module, captured: dict, grad: Tensor) -> None:
        with torch.no_grad():
            for target in self.targets[module]:
                key = id(target.param)
                self.records[key].append(_record(target, captured, grad))
                if len(self.records[key]) >= sum(self.calls[m] for m in self.owners[key]):
                    self._finalize(key)

    def _finalize(self, key: int) -> None:
        """Add ‖Σ_k G_k‖² = Σ_k ‖G_k‖² + 2Σ_{k<l}⟨G_k, G_l⟩ of one parameter to the squares."""
        records = self.records.pop(key)
        with torch.no_grad():
            for i, rec in enumerate(records):
                self.squares += _self_square(rec, self.method, self.inputs)
                for other in records[i + 1 :]:
                    self.squares += 2 * _cross(rec, other, self.method)
        for rec in records:
            if isinstance(rec, _Outer):
                self.inputs.release(rec.left_key)
                self.inputs.release(rec.right_key)

    def _warn_uncalled(self) -> None:
        uncalled = [t.name for m, ts in self.targets.items() if self.calls[m] == 0 for t in ts]
        if uncalled:
            warnings.warn(
                f"the modules of {uncalled[:5]} (of {len(uncalled)}) were not called in the forward pass: their "
                "per-sample gradient counts as 0 (a parameter used outside its module's forward is not measured)",
                stacklevel=4,
            )


def _channel_sensitivity(module: nn.Module, attr: str, args: tuple, kwargs: dict) -> Tensor:
    """u = ∂y/∂p for a channel-wise parameter p (y_i depends on p_i only): forward-mode AD with tangent 1.

    ``module.forward`` is called with p swapped for a dual tensor, bypassing hooks (the module's and ours)."""
    param = module._parameters[attr]
    args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
    with torch.no_grad(), forward_ad.dual_level():
        module._parameters[attr] = forward_ad.make_dual(param.detach(), torch.ones_like(param))
        try:
            output = module.forward(*args, **kwargs)
        finally:
            module._parameters[attr] = param
        sensitivity = forward_ad.unpack_dual(output).tangent
    if sensitivity is None or sensitivity.shape[-1] != param.shape[0]:
        raise NotImplementedError(f"{type(module).__name__}.{attr} is not channel-wise over the last dimension")
    return sensitivity


def _record(target: _Target, captured: dict, grad: Tensor) -> _Record:
    """The per-sample gradient of ``target`` from one call, given its output gradient."""
    batch, valid, dtype = grad.shape[0], captured["valid"], _compute_dtype(grad)
    if target.attr == "bias":
        return _Dense(_masked(grad, valid, dtype).reshape(batch, -1, grad.shape[-1]).sum(1))
    if target.kind == _CHANNELWISE:
        product = _masked(captured["sensitivity"][target.attr], valid, dtype) * _masked(grad, valid, dtype)
        return _Dense(product.reshape(batch, -1, product.shape[-1]).sum(1))
    if target.kind == _EMBEDDING:
        return _Outer(captured["ids"], grad, target.param.shape[0], valid)
    inputs, key = captured["input"], captured["key"]
    activations = inputs.reshape(batch, -1, inputs.shape[-1])
    grad = grad.reshape(batch, -1, grad.shape[-1])
    if target.kind == _LINEAR:
        return _Outer(grad, activations, grad.shape[-1], valid, right_key=key)
    return _Outer(activations, grad, activations.shape[-1], valid, left_key=key)


def _and(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    return a & b
