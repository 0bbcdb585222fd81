r"""Per-sample gradient norms ‖∇_θ ln P(y | x)‖₂ for a batch of completions, in one forward and one backward.

GVM weights each prompt by the mean norm of the per-sample gradient of ln P(y|x) = Σ_t log p_θ(y_t | ·) (a
*sum* over completion tokens) over its accepted completions. Autograd only gives the gradient of a sum over the
batch; looping over samples costs a backward each, and ``torch.func`` per-sample gradients need B×|θ| memory.
This module instead hooks the modules that use the measured parameters and rebuilds per-sample squared norms from
what each layer sees — its inputs and the gradients g_t of its output — with the parameters frozen, so no weight
gradient is ever formed.

**Rules.** Each use of a measured parameter is measured by the first rule of a table (:data:`.rules.RULES`, one
small class per layer kind, as Opacus registers one function per layer type) whose condition holds — matched by
what the module computes, so subclasses are covered — and otherwise by the generic rule:

* ``linear``: ``nn.Linear`` and subclasses keeping its ``forward`` (W: out×in), G = Σ_t g_t a_tᵀ; ``conv1d``:
  transformers' ``Conv1D`` (W transposed), G = Σ_t a_t g_tᵀ. Either materialise G (cost ∝ T·d_in·d_out), or use
  the Gram ("ghost norm") identity ‖G‖²_F = Σ_{t,s} (a_t·a_s)(g_t·g_s) (cost ∝ T²·(d_in + d_out));
  :func:`.products._choose_method` picks per layer and length whichever costs less (mixed ghost norm, as in the
  book-keeping method of Bu et al. 2022). Layers reading one input (q/k/v, gate/up: the same memory, whichever
  view each gets) share its Gram, and their output gradients side by side make one more. Biases: G = Σ_t g_t.
* ``embedding``: any ``nn.Embedding`` whose output is c·W[ids] for one scalar c (c = 1 for the base class;
  subclasses such as Gemma's scaled embedding are checked on a probe at planning, and c is fitted and checked on
  the device on each call; a call failing the check is measured again with the module on the generic rule):
  G = c Σ_t e_{id_t} g_tᵀ, so ‖G‖² = c² Σ_{t,s} [id_t = id_s](g_t·g_s) (token-equality ghost norm,
  ``method="ghost"``), or — otherwise — sum the g_t of equal ids per sample (a segment sum over unique (sample, id)
  pairs) and square, O(T·d).
* ``channelwise``: 1-D parameters of leaf modules (norm weights and biases, whatever the class is called) where
  output channel i depends on p_i only: G = Σ_t u_t ⊙ g_t with u = ∂y/∂p by forward-mode AD of the module, so
  RMSNorm, LayerNorm and variants such as Gemma's (1 + w) are exact without per-class formulas. Checked once per
  module (at planning, on a probe input) with a second forward-mode pass along a random tangent; norms whose u does
  not depend on their weights share one forward-mode pass over their stacked inputs.
* ``generic`` (:func:`.rules.generic_records`): everything else — fused MoE expert weights and routers, Mamba's
  ``A_log``/``D``/``dt_bias``, ``nn.Conv1d``, subclasses that override ``forward``, and calls where a checked rule's
  assumption fails. The forward hook keeps the module's inputs, the gradient hook its output gradients; then for
  every sample the module is re-run on that sample's slice of its inputs (those leading with the batch, or with the
  flattened batch × positions as MoE experts see tokens) and the VJP w.r.t. just its generic parameters is taken,
  with ``torch.func.vmap`` over samples where the module allows it and a loop where it has data-dependent control
  flow (MoE routing), in the autocast the call ran under. Re-run outputs must equal the recorded ones at real
  positions (else the module mixes samples: an error, never a guess). Exact for any module that treats samples
  independently; it costs one extra forward and backward of the module per sample (batched under vmap) and each
  sample's dense gradient of its generic parameters, so it grows with batch × their size. Measured on CPU
  (``benchmarks/grad_norms.py --generic``, 1 thread, batch 8): every decoder-layer parameter of a Llama forced onto
  it costs 1.03× (hidden 64) and 1.12× (hidden 256, 4 layers) the fast pass, as vmap batches the re-runs; a
  Qwen3-MoE's experts and routers (26% and 49% of its parameters) make the pass 1.2× and 2.6× slower than leaving
  them out, routing forcing a per-sample loop.

Parameters read outside their own module's forward (a Mamba mixer calling ``causal_conv1d_fn(x,
self.conv1d.weight, ...)`` without calling ``self.conv1d``) are seen by a ``TorchFunctionMode`` during the forward
and measured by the generic rule at the module that read them. :func:`plan_per_sample_grad_norms` reports which
rule measures which parameter before any batch and warns when the generic rule is needed.

A parameter reached by several uses k (tied ``embed_tokens``/``lm_head``, a module called twice) has per-sample
gradient Σ_k G_k and ‖Σ_k G_k‖² = Σ_k ‖G_k‖² + 2 Σ_{k<l} ⟨G_k, G_l⟩. Uses are grouped by parameter identity and
the cross terms computed from the same factors, e.g. for a tied head (a_s, g_s at loss positions s) and embedding
(ids id_t, gradients e_t): ⟨G_head, G_emb⟩ = Σ_{t,s} g_s[id_t] (a_s·e_t). Dropping it is wrong (measured: 2e-3
relative error at random init, more on trained models).

**Cost on a GPU** (issues 18, 26): every ATen op is a kernel launch paid on the host, and every read of a device
value a host sync. The hooks therefore only keep references; after the backward, the single-use matrices are
reduced in a few stacked kernels across layers (:func:`.products.batched_self_squares`: layers reading one input
share its Gram, layers of equal shapes are stacked), 1-D parameters likewise; every check needing a host value and
every rule choice is made once per module (at planning), and the checks each call must still make (the generic
rule's re-run outputs, a scaled embedding's c) are computed on the device and read together at the end. So a call
reads the device at most twice: the input checks and micro-batch spans before the forward, those checks after
it (only where there are any). A transformers model using SDPA gets a prepared mask (per layer kind for hybrid
models) where that gives the same logits: transformers' own mask preparation reads the mask on the host. Counted
on Qwen2-0.5B's structure: ``benchmarks/grad_norms.py --count``. Memory: :func:`rows_that_fit`. A model split by
``device_map`` reduces each layer's records on its own device and moves only [B] sums.

Autograd never reaches further down than needed: all parameters are frozen during the call and gradients start
from detached, grad-requiring copies of the outputs of the lowest measured modules, so ``params="lm_head"`` costs a
forward plus a backward through the head only. The head is fed only the positions whose next token counts (its
input is gathered to B×L×d, L = most counted tokens in a row), never B×T×V logits. With HF gradient checkpointing
on layers that hold measured parameters, checkpointing stays on and the backward starts at the input embeddings
(checkpointed layers need a grad-requiring input); forward hooks re-run by the recompute are not counted twice.

Limits: checkpointing other than HF's ``GradientCheckpointingLayer`` must be off; under non-reentrant checkpointing
(HF's default) the inputs of measured layers are kept from the forward, as without checkpointing; a parameter used
by the model's own top-level forward (not inside a submodule) is refused; under FSDP2, a parameter read outside its
module is seen only when the reading module is its parent (Mamba's mixers).

Why hand-written: Opacus' ghost clipping and private-transformers use the same identities, but around DP-SGD's
clipped update and their own model wrappers, without a per-layer choice of method, and they refuse (or ignore the
cross terms of) shared parameters and unknown layer types; ``torch.func`` per-sample gradients over the whole
model need B×|θ| memory. Here any Hugging Face causal LM, PEFT-wrapped or not, is measured in place and left
exactly as it was, and ``torch.func`` is used only for the few parameters no fast rule covers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .memory import MEMORY_SHARE, budget, memory_model
from .planning import GradNormPlan, ParameterRule, ParamSelection, embeddings, resolve, warn_generic
from .products import Method
from .recorder import Recorder, measurement_mode

__all__ = [
    "MEMORY_SHARE",
    "GradNormPlan",
    "ParameterRule",
    "per_sample_grad_norms",
    "per_sample_grad_norms_and_log_probs",
    "plan_per_sample_grad_norms",
    "rows_that_fit",
]

_METHODS = ("auto", "ghost", "materialize")


def plan_per_sample_grad_norms(
    model: nn.Module, params: ParamSelection = "trainable", *, setting: str = "params"
) -> GradNormPlan:
    """Which rule :func:`per_sample_grad_norms` will use for each selected parameter, resolved without a batch.

    Call it once where the selection is configured (a trainer's construction). ``setting`` is the name the user
    gave ``params`` under (e.g. ``"gvm_grad_params"``); error and warning messages name it.

    Raises:
        ValueError: ``params`` selects nothing, or names a missing embedding, or is an invalid regex.
        TypeError: ``params`` is neither a string nor a predicate.

    Warns (``UserWarning``, once): when some parameters need the generic rule, naming a few, their count and cost.
    """
    plan = resolve(model, params, setting).plan
    warn_generic(plan, stacklevel=2)
    return plan


def per_sample_grad_norms(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    loss_mask: Tensor,
    *,
    params: ParamSelection = "trainable",
    micro_batch_size: int | None = None,
    method: Method = "auto",
    setting: str = "params",
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
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
        micro_batch_size: rows per forward/backward (``None``: all at once on a CPU; on a GPU as many as
            :func:`rows_that_fit` finds room for, so one micro-batch where the batch fits; processes of a sharded
            model must pass one number they agreed on).
        method: ``"auto"`` chooses ghost or materialised norms per layer and length
            (:func:`.products._choose_method`); ``"ghost"``/``"materialize"`` force one (for embeddings:
            token-equality Gram / segment sums).
        setting: the name ``params`` has in the caller's configuration, for error messages.
        forward_context: a context manager factory entered around the model's forward only (e.g. the trainer's
            ``accelerator.autocast``, as the training forward runs); the backward and the norm products run
            outside it, and modules re-run after the forward (checks, the generic rule) in the autocast their
            call ran under.

    The model runs in eval mode (no dropout), with position ids counted over real tokens as in generation, so
    padding does not change a row's norm. It is left as found: no hooks, the same ``.grad`` (none is created),
    ``requires_grad`` flags and per-module train/eval modes. HF gradient checkpointing, if enabled on layers that
    hold measured parameters, stays on. Rows are measured in micro-batches of similar lengths.

    Every selected parameter is measured exactly: by a fast rule where one applies, by the slower generic rule
    otherwise (see the module docstring; :func:`plan_per_sample_grad_norms` says which, and warns).
    """
    norms, _ = _measure(model, input_ids, attention_mask, loss_mask, None, forward_context=forward_context,
                        params=params, micro_batch_size=micro_batch_size, method=method, setting=setting)
    return norms


def per_sample_grad_norms_and_log_probs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    loss_mask: Tensor,
    score_mask: Tensor,
    *,
    temperature: float = 1.0,
    position_ids: Tensor | None = None,
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    params: ParamSelection = "trainable",
    micro_batch_size: int | None = None,
    method: Method = "auto",
    setting: str = "params",
) -> tuple[Tensor, Tensor]:
    """:func:`per_sample_grad_norms` and, from the same forward, the log-probabilities of the ``score_mask`` tokens
    under the softmax of the logits divided by ``temperature``, detached: (float32 [B], float32 [B, T]).

    ``log_probs[b, t]`` = log softmax(logits[b, t-1] / temperature)[input_ids[b, t]] where ``score_mask[b, t]``
    (same rules as ``loss_mask``: never position 0 nor padding), NaN elsewhere; computed as TRL's fused head does
    (fp32 logits times 1/temperature, minus their logsumexp). A row may be scored without counting (an all-zero
    ``loss_mask`` row: norm 0) or count without being scored. ``temperature`` applies to the log-probabilities
    only; the norms are those of the untempered ln P(y|x), as :func:`per_sample_grad_norms` measures them.

    ``position_ids`` ([B, T]; None: counted over real tokens, as :func:`per_sample_grad_norms` uses) are passed to
    the model as given, so a caller that must reproduce another forward's numbers can use its positions — e.g.
    ``torch.arange(T)`` for every row, as a transformers model chooses when given none (TRL's forward). The norms
    are then those at these positions: the same up to rounding for rotary models (relative positions), not for
    absolute position embeddings, whose outputs then depend on padding. ``forward_context``: a context manager
    factory entered around the model's forward only (e.g. the trainer's ``accelerator.autocast``); the backward and
    the norm products run outside it.
    """
    return _measure(model, input_ids, attention_mask, loss_mask, score_mask, temperature=temperature,
                    position_ids=position_ids, forward_context=forward_context, params=params,
                    micro_batch_size=micro_batch_size, method=method, setting=setting)


def _measure(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    loss_mask: Tensor,
    score_mask: Tensor | None,
    *,
    temperature: float = 1.0,
    position_ids: Tensor | None = None,
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    params: ParamSelection,
    micro_batch_size: int | None,
    method: Method,
    setting: str,
) -> tuple[Tensor, Tensor | None]:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    while True:  # again only after a module failed a fast rule's per-call check: then it is on the generic rule
        measured = _measure_once(model, input_ids, attention_mask, loss_mask, score_mask, temperature, position_ids,
                                 forward_context, params, micro_batch_size, method, setting)
        if measured is not None:
            return measured


def _measure_once(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    loss_mask: Tensor,
    score_mask: Tensor | None,
    temperature: float,
    position_ids: Tensor | None,
    forward_context: Callable[[], contextlib.AbstractContextManager] | None,
    params: ParamSelection,
    micro_batch_size: int | None,
    method: Method,
    setting: str,
) -> tuple[Tensor, Tensor | None] | None:
    resolved = resolve(model, params, setting)
    device, out_device = _model_device(model), input_ids.device
    recorder = Recorder(model, resolved.targets, method, setting, temperature, forward_context)
    # Callers may hold no_grad or inference mode (e.g. around generation); the measurement needs autograd.
    with torch.inference_mode(False), torch.enable_grad():
        input_ids, attention_mask, loss_mask, score_mask, position_ids = _check_inputs(
            input_ids, attention_mask, loss_mask, device, score_mask, position_ids
        )
        batch = input_ids.shape[0]
        step = micro_batch_size
        if step is None:
            step = batch if device.type == "cpu" else rows_that_fit(
                model, params, input_ids.shape, device, method=method, forward_context=forward_context,
                setting=setting)
        # Micro-batches of similar lengths carry less padding.
        order = torch.argsort(attention_mask.sum(1), descending=True, stable=True)
        spans = _micro_batch_spans(attention_mask[order], loss_mask[order], step,
                                   None if score_mask is None else score_mask[order])  # the pass's one host sync
        squares = torch.zeros(batch, dtype=torch.float64, device=device)
        scores = None if score_mask is None else torch.empty(input_ids.shape, dtype=torch.float32, device=device)
        with measurement_mode(model, recorder.checkpointed_layers), recorder.attached():
            for start, (first, stop, head_length) in zip(range(0, batch, step), spans):
                rows = order[start : start + step]
                squares[rows], scored = recorder.measure(
                    input_ids[rows], attention_mask[rows], loss_mask[rows], slice(first, stop), head_length,
                    None if score_mask is None else score_mask[rows],
                    None if position_ids is None else position_ids[rows],
                )
                if scores is not None:
                    scores[rows] = scored
            if recorder.settle_checks():  # where per-call checks were made: the pass's second host sync
                return None
    norms = squares.clamp(min=0).sqrt().to(device=out_device, dtype=torch.float32)
    return norms, None if scores is None else scores.to(out_device)


def rows_that_fit(
    model: nn.Module,
    params: ParamSelection,
    shape: tuple[int, int],
    device: torch.device | str | None = None,
    *,
    free_bytes: int | None = None,
    processes_on_device: int = 1,
    method: Method = "auto",
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    setting: str = "params",
) -> int:
    """Rows of a ``shape`` = (rows, width) batch that one micro-batch of :func:`per_sample_grad_norms` with these
    ``params`` (``method``, ``forward_context``) can measure in the free memory of ``device``: between 1 and rows.

    What a micro-batch keeps is fitted once per selection on four small probe passes of the pass itself
    (:mod:`.memory`: activations every layer above the lowest measured parameter saves, measured or not, the
    head's logits and their gradient, what the hooks keep); it may fill ``MEMORY_SHARE`` (0.6) of this process's
    part of the free memory. ``free_bytes`` None reads it on a CUDA device: ``torch.cuda.mem_get_info``'s free
    memory divided among the ``processes_on_device`` processes sharing the device, plus this process's
    reserved-but-unallocated cache (PyTorch's, which ``mem_get_info`` counts as used). Given, ``free_bytes`` is
    the device's free memory as this process sees it (also divided among ``processes_on_device``), which lets the
    sizing run anywhere, e.g. with a fake figure per rank in a test. On a CPU without ``free_bytes``: all rows.

    Processes must agree on the micro-batch when the model is sharded (FSDP, ZeRO-3: its forwards are collectives,
    and unequal numbers of them deadlock): take the minimum of every process's answer. The first call for a
    selection runs the probe passes, collectives too there, so every process calls it at the same point.
    """
    rows, width = shape
    device = _model_device(model) if device is None else torch.device(device)
    if rows <= 1 or (free_bytes is None and device.type != "cuda"):
        return max(rows, 1)
    if processes_on_device < 1:
        raise ValueError(f"processes_on_device must be positive, got {processes_on_device}")
    memory = memory_model(model, params, method=method, setting=setting, forward_context=forward_context)
    return max(1, min(rows, memory.rows(budget(device, free_bytes, processes_on_device), width)))


def _micro_batch_spans(
    attention_mask: Tensor, loss_mask: Tensor, step: int, score_mask: Tensor | None = None
) -> list[tuple[int, int, int]]:
    """(first real column, last + 1, most counted or scored tokens in a row) of each micro-batch of ``step`` rows,
    and the input checks, read from the device in one transfer: the only host sync of the pass.

    Raises:
        ValueError: ``loss_mask`` (or ``score_mask``) counts position 0 or padding.
    """
    read = loss_mask if score_mask is None else loss_mask | score_mask
    batch, width = attention_mask.shape
    groups = -(-batch // step)
    pad = groups * step - batch
    real = torch.nn.functional.pad(attention_mask, (0, 0, 0, pad)).reshape(groups, step, width).any(1)
    counted = torch.nn.functional.pad(read[:, 1:].sum(1), (0, pad)).reshape(groups, step).amax(1)
    positions = torch.arange(width, device=attention_mask.device)
    first = torch.where(real, positions, width).amin(1)
    stop = torch.where(real, positions + 1, 0).amax(1)
    checks = torch.stack([read[:, :1].any(), (read & ~attention_mask).any()]).long()
    values = torch.cat([torch.stack([first, stop, counted], 1).flatten(), checks]).tolist()
    names = "loss_mask" if score_mask is None else "loss_mask or score_mask"
    if values[-2]:
        raise ValueError(f"{names}[:, 0] must be 0: the first token has no log-probability")
    if values[-1]:
        raise ValueError(f"{names} marks padding tokens (attention_mask == 0)")
    return [tuple(values[3 * g : 3 * g + 3]) for g in range(groups)]


def _check_inputs(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    loss_mask: Tensor,
    device: torch.device,
    score_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Copies on ``device`` of shape-checked inputs (copies: inputs made under inference mode cannot enter
    autograd); the masks' values are checked by :func:`_micro_batch_spans`."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    named = (("attention_mask", attention_mask), ("loss_mask", loss_mask), ("score_mask", score_mask),
             ("position_ids", position_ids))
    for name, mask in named:
        if mask is not None and mask.shape != input_ids.shape:
            raise ValueError(f"{name} must have the shape {tuple(input_ids.shape)} of input_ids, got {tuple(mask.shape)}")
    input_ids = input_ids.to(device).clone()
    attention_mask, loss_mask = attention_mask.to(device) != 0, loss_mask.to(device) != 0
    if score_mask is not None:
        score_mask = score_mask.to(device) != 0
    if position_ids is not None:
        position_ids = position_ids.to(device=device, dtype=torch.long)
    return input_ids, attention_mask, loss_mask, score_mask, position_ids


def _model_device(model: nn.Module) -> torch.device:
    weight = getattr(embeddings(model, output=False), "weight", None)
    if isinstance(weight, Tensor):
        return weight.device
    return next(model.parameters()).device
