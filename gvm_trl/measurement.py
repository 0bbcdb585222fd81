"""The two passes a GVM trainer runs on its probes besides TRL's own: the gradient-norm pass (G_i, Algorithm 2
line 4) and, when probes are drawn a generation batch before they train, their old log-probabilities.

Probing ahead, both run on the same rows under the same weights, back to back: where :func:`folds_old_logps` holds,
:func:`grad_norms_and_old_logps` runs them as one forward (and one backward), the log-probabilities computed as
TRL's ``_get_per_token_logps_and_entropies`` computes them (its rows, padded width, position ids, autocast and
temperature); otherwise :func:`grad_norms` and :func:`old_logps` run apart. All run on the trainer's model under its
accelerator (ZeRO-3, FSDP and several processes included), read what they need from a :class:`MeasurementContext`,
and return what they compute: the caller attaches it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import gather, gather_object
from trl.distributed import DistributedBackend
from trl.models.utils import disable_gradient_checkpointing, unwrap_model_for_generation

from .batching import select_rows, trim_padding_columns
from .grad_norms import per_sample_grad_norms, per_sample_grad_norms_and_log_probs, rows_that_fit
from .rollout import Rollout
from .trl_compat import GRPO, UTILS, mirrors

__all__ = [
    "MeasurementContext",
    "folds_old_logps",
    "grad_micro_batch_size",
    "grad_norms",
    "grad_norms_and_old_logps",
    "old_logps",
]


@dataclass(frozen=True)
class MeasurementContext:
    """What the passes read, as plain values (a trainer builds one per call: its wrapped model changes when training
    starts).

    ``model``: the trainer's model, as TRL's forward takes it; ``wrapped_model``: as the accelerator prepared it
    (what DeepSpeed and FSDP gather from); ``temperature``: TRL's sampling temperature; ``grad_params`` and
    ``grad_batch_size``: `gvm_grad_params`/`gvm_grad_batch_size`; ``train_batch_size``: the per-device micro-batch
    (TRL's forward's, and the pass's on a CPU); ``gather_zero3``: `ds3_gather_for_generation`; ``per_token_logps``:
    TRL's ``_get_per_token_logps_and_entropies`` (bound to its trainer); ``free_bytes``: this process's free
    accelerator memory, read on a GPU when None (a test injects a figure per rank to run the sizing on a CPU).
    """

    model: torch.nn.Module
    wrapped_model: torch.nn.Module
    accelerator: Accelerator
    temperature: float
    grad_params: str
    grad_batch_size: int | None
    train_batch_size: int
    gather_zero3: bool
    gradient_checkpointing_kwargs: dict | None
    per_token_logps: Callable[..., tuple[torch.Tensor, Any, Any]]
    free_bytes: Callable[[], int] | None = None

    @classmethod
    def from_config(cls, args: Any, model, wrapped_model, accelerator, temperature: float, per_token_logps):
        """The context of a trainer configured by `args` (a GVM config)."""
        return cls(model, wrapped_model, accelerator, temperature, args.gvm_grad_params, args.gvm_grad_batch_size,
                   args.per_device_train_batch_size, args.ds3_gather_for_generation,
                   args.gradient_checkpointing_kwargs, per_token_logps)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def dist(self) -> DistributedBackend:
        return DistributedBackend(self.accelerator)


def grad_norms(context: MeasurementContext, probes: Rollout) -> torch.Tensor:
    """Per-sample ‖∇ ln P(y|x)‖ of the accepted probes, over all processes (0 for the others).

    Every process measures the same number of rows, so sharded models run the same forwards and backwards
    everywhere (ZeRO-3's forward hook and FSDP's unshard are collectives). Short processes fill up with copies
    of a real probe, loss mask included, and discard their norms: a fully masked micro-batch would skip its
    forward and leave the other processes waiting. Parameters are gathered as for TRL's generation.
    """
    norms, _ = _measure(context, probes, fold=False)
    return norms


@mirrors(f"{GRPO}._get_per_token_logps_and_entropies", "1418-1508", "ea73c3909275851d",
         "the folded old log-probabilities are TRL's: its rows, padded width, arange positions, autocast")
@mirrors(f"{UTILS}:add_fused_lm_head", "1548-1698", "422d009f04b66659",
         "the fused head's log-probabilities: fp32 logits times 1/temperature, minus their logsumexp")
def grad_norms_and_old_logps(context: MeasurementContext, probes: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`grad_norms` and :func:`old_logps` in one forward (call it only where :func:`folds_old_logps` holds):
    the accepted probes' norms and this process's ``old_per_token_logps`` for the probes.

    The measured rows are the accepted probes and the probes that train (RAFT++: the same rows; GRPO: all of
    them); a row that trains but is not accepted takes part with a zero loss mask (norm 0). The forward is TRL's
    (:meth:`~trl.GRPOTrainer._get_per_token_logps_and_entropies` as :func:`old_logps` calls it): the rows at the
    probe batch's padded width, position ids ``arange(width)`` (what a transformers model uses when given none), the
    accelerator's autocast, the log-probabilities at TRL's temperature (the norms stay those of the untempered
    ln P(y|x)). The norms are therefore measured at TRL's positions rather than counted over real tokens: the
    gradient TRL trains through; equal up to rounding for rotary models, padding-dependent for absolute position
    embeddings. The log-probabilities equal TRL's to fp32 rounding, not bitwise (the head's product is blocked
    differently). Rows that train carry 0 at their padding columns, as TRL's fused head returns; the others NaN
    (never read).

    Cost: rows that train but are not accepted (GRPO's rejected probes) ride through the backward with a zero loss.
    Where the step is host-bound (a GPU) one pass instead of two saves a forward's launches; where it is
    compute-bound, with a backward ≈ 2 forwards, it saves a forward over the accepted rows but adds a backward over
    the others. Backward-free micro-batches for those rows would remove that cost; they are not done (a process
    skipping a backward others run must not stall sharded models).
    """
    return _measure(context, probes, fold=True)


def folds_old_logps(context: MeasurementContext, probes: Rollout) -> bool:
    """Whether the gradient-norm pass should also give these probes' old log-probabilities: it can do so exactly as
    TRL would, and one pass costs less than two.

    It cannot when TRL computed them itself (``old_per_token_logps`` already in the batch: misaligned steps, vLLM's
    importance-sampling correction), when the model has active dropout (the pass runs in eval mode, TRL's forward
    in the trainer's mode), or for a model taking extra inputs (multimodal rows: the pass feeds token ids only).
    ZeRO-3, FSDP and several processes are fine: the fused pass pads every process to the same rows, as
    :func:`grad_norms` does.

    Cost, from the global row counts (so every process decides alike): on a GPU the passes are host-bound and one
    pass always saves a forward's launches; elsewhere, with a backward ≈ 2 forwards, the fused pass costs
    3·(a + r) forwards for a accepted rows and r that train unaccepted (GRPO's rejected probes, which ride through
    its backward), the two passes 3·a + (a + r): fold when 2·r ≤ a.
    """
    batch = probes.batch
    if "old_per_token_logps" in batch or any(key in batch for key in ("pixel_values", "token_type_ids")):
        return False
    if _has_dropout(context.model):
        return False
    if context.accelerator.device.type == "cuda":
        return True
    riding = int((probes.trains & ~probes.accepted).sum())
    return 2 * riding <= int(probes.accepted.sum())


@mirrors(f"{GRPO}._generate_and_score_completions", "2634-2655 of 2324-2936", "1fa48922792dcd5c",
         "old log-probabilities of rows trained a generation batch after they were drawn")
def old_logps(context: MeasurementContext, probes: Rollout) -> torch.Tensor | None:
    """Log-probabilities of the probes under the weights that drew them, for the importance ratio when they are
    trained a generation batch later: this process's ``old_per_token_logps``, for the rows that will train (the
    others NaN, never read). None where TRL computed them itself (misaligned steps, vLLM's correction)."""
    batch = probes.batch
    if "old_per_token_logps" in batch:
        return None
    trains = probes.trains[probes.local_rows(context.rank)]
    if context.dist.is_zero3 or context.dist.is_fsdp:
        trains = torch.ones_like(trains)  # sharded forwards are collectives: every process scores all its rows
    rows = trains.nonzero().flatten()
    logps = torch.full(batch["completion_ids"].shape, float("nan"), device=batch["completion_ids"].device)
    if len(rows):
        part = select_rows(batch, rows)
        with torch.no_grad(), disable_gradient_checkpointing(context.model, context.gradient_checkpointing_kwargs):
            logps[rows.to(logps.device)], _, _ = context.per_token_logps(
                context.model,
                torch.cat([part["prompt_ids"], part["completion_ids"]], dim=1),
                torch.cat([part["prompt_mask"], part["completion_mask"]], dim=1),
                part["completion_ids"].size(1),
                batch_size=context.train_batch_size,
            )
    return logps


def grad_micro_batch_size(context: MeasurementContext, model: torch.nn.Module, shape: torch.Size) -> int:
    """Rows per micro-batch of the pass over a `shape` batch: `gvm_grad_batch_size`; else, where the free memory is
    known (a GPU, or a figure injected as `free_bytes`), as many rows as fit this process's share of it
    (:func:`~gvm_trl.grad_norms.rows_that_fit`, the device shared with the other processes on it), the smallest
    over the processes — a sharded forward is a collective, so every process must run as many micro-batches; else
    the per-device train batch size (a CPU reports no free memory). Every process calls it at the same point."""
    if context.grad_batch_size is not None:
        return context.grad_batch_size
    device = context.accelerator.device
    if context.free_bytes is None and device.type != "cuda":
        return context.train_batch_size
    rows = rows_that_fit(
        model, context.grad_params, tuple(shape), device,
        free_bytes=None if context.free_bytes is None else context.free_bytes(),
        processes_on_device=_processes_on_device(context), forward_context=context.accelerator.autocast,
        setting="gvm_grad_params",
    )
    if context.num_processes > 1:
        rows = int(gather(torch.tensor([rows], device=device)).min())
    return rows


def _processes_on_device(context: MeasurementContext) -> int:
    """How many processes of the run share this process's device (same host, same device)."""
    if context.num_processes == 1:
        return 1
    place = (socket.gethostname(), str(context.accelerator.device))
    return sum(other == place for other in gather_object([place]))


def _has_dropout(model: torch.nn.Module) -> bool:
    """Dropout that is active in training mode: a dropout module or a config's ``*dropout*`` rate above 0."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    values = config.to_dict().items() if hasattr(config, "to_dict") else ()
    return any("dropout" in key and isinstance(value, (int, float)) and value > 0 for key, value in values)


def _measure(context: MeasurementContext, probes: Rollout, fold: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pass over this process's measured rows (accepted, and with `fold` also the rows that train), every process
    padded to the same row count: the gathered norms and, with `fold`, this process's old log-probabilities."""
    local = probes.local_rows(context.rank)
    counted = probes.accepted[local]
    scored = probes.trains[local] if fold else torch.zeros_like(counted)
    index = (counted | scored).nonzero().flatten()
    norms = torch.zeros(probes.rows_per_process)
    count = rows = len(index)
    if context.num_processes > 1:
        rows = int(gather(torch.tensor([count], device=context.accelerator.device)).max())
    logps = None
    if rows:
        padded = torch.cat([index, index.new_full((rows - count,), int(index[0]) if count else 0)])
        # Padding copies count (so every micro-batch runs its forward) and are never scored.
        real = torch.arange(rows) < count
        measured, logps = _run_pass(context, select_rows(probes.batch, padded),
                                    torch.where(real, counted[padded], True), real & scored[padded], fold)
        norms[index] = measured[:count].float().cpu()
    old = _old_logps_of_pass(probes.batch, index, scored, logps) if fold else None
    if context.num_processes > 1:
        norms = gather(norms.to(context.accelerator.device)).cpu()
    return norms, old


def _run_pass(
    context: MeasurementContext, batch: dict, counts: torch.Tensor, scores: torch.Tensor, fold: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One gradient-norm pass over `batch`'s rows (`counts`: rows whose norm counts; with `fold`, `scores`: rows whose
    tempered log-probabilities are returned), with the parameters gathered as for TRL's generation."""
    if not fold:
        batch = trim_padding_columns(batch)  # TRL's width is kept when folding: its positions depend on it
    prompt_mask, completion_mask = batch["prompt_mask"], batch["completion_mask"]
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    completion = torch.cat([torch.zeros_like(prompt_mask), completion_mask], dim=1)
    gathered = unwrap_model_for_generation(
        context.wrapped_model, context.accelerator, gather_deepspeed3_params=context.gather_zero3
    )
    with gathered as model, context.dist.summon_full_params(context.wrapped_model, recurse=False):
        # Both passes run the forward in the accelerator's autocast, as TRL's training forward does.
        options = dict(params=context.grad_params, setting="gvm_grad_params",
                       micro_batch_size=grad_micro_batch_size(context, model, input_ids.shape),
                       forward_context=context.accelerator.autocast)
        if not fold:
            return per_sample_grad_norms(model, input_ids, attention_mask, completion, **options), None
        width = input_ids.size(1)
        return per_sample_grad_norms_and_log_probs(
            model,
            input_ids,
            attention_mask,
            completion * counts.to(completion.device)[:, None],
            completion * scores.to(completion.device)[:, None],
            temperature=context.temperature,
            position_ids=torch.arange(width, device=input_ids.device).expand(len(counts), width),
            **options,
        )


def _old_logps_of_pass(
    batch: dict, index: torch.Tensor, scored: torch.Tensor, logps: torch.Tensor | None
) -> torch.Tensor:
    """``old_per_token_logps`` from the fused pass's [rows, T] log-probabilities: the completion columns of the
    rows that train (0 at their padding columns, as TRL's fused head gives), NaN for the others."""
    completion_ids = batch["completion_ids"]
    old = torch.full(completion_ids.shape, float("nan"), device=completion_ids.device)
    measured = scored[index].nonzero().flatten()  # host-side masks: integer indices keep the device unsynced
    if len(measured):
        rows = index[measured].to(old.device)
        picked = logps[measured.to(logps.device), -completion_ids.size(1) :].to(old.device)
        old[rows] = torch.where(batch["completion_mask"][rows].bool(), picked, 0.0)
    return old
