"""The two passes a GVM trainer runs on its probes besides TRL's own: the gradient-norm pass (G_i, Algorithm 2
line 4) and, when probes are drawn a generation batch before they train, their old log-probabilities.

Both run on the trainer's model under its accelerator (ZeRO-3, FSDP and several processes included).
"""

from __future__ import annotations

import torch
from accelerate.utils import gather
from trl.models.utils import disable_gradient_checkpointing, unwrap_model_for_generation

from .batching import select_rows, trim_padding_columns
from .grad_norms import per_sample_grad_norms
from .rollout import Rollout
from .trl_compat import GRPO, mirrors

__all__ = ["attach_sampling_logps", "probe_grad_norms"]


def probe_grad_norms(trainer, probes: Rollout, accepted: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖∇ ln P(y|x)‖ of the accepted probes, over all processes (0 for the others).

    Every process measures the same number of rows, so sharded models run the same forwards and backwards
    everywhere (ZeRO-3's forward hook and FSDP's unshard are collectives). Short processes fill up with copies
    of a real probe, loss mask included, and discard their norms: a fully masked micro-batch would skip its
    forward and leave the other processes waiting. Parameters are gathered as for TRL's generation.
    """
    index = accepted[probes.local_rows(trainer.accelerator.process_index)].nonzero().flatten()
    norms = torch.zeros(probes.rows_per_process)
    count = rows = len(index)
    if trainer.accelerator.num_processes > 1:
        rows = int(gather(torch.tensor([count], device=trainer.accelerator.device)).max())
    if rows:
        padded = torch.cat([index, index.new_full((rows - count,), int(index[0]) if count else 0)])
        batch = trim_padding_columns(select_rows(probes.batch, padded))
        gathered = unwrap_model_for_generation(
            trainer.model_wrapped, trainer.accelerator, gather_deepspeed3_params=trainer.args.ds3_gather_for_generation
        )
        with gathered as model, trainer._dist.summon_full_params(trainer.model_wrapped, recurse=False):
            measured = per_sample_grad_norms(
                model,
                torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
                torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
                torch.cat([torch.zeros_like(batch["prompt_mask"]), batch["completion_mask"]], dim=1),
                params=trainer.args.gvm_grad_params,
                micro_batch_size=grad_micro_batch_size(trainer),
                setting="gvm_grad_params",
            )
        norms[index] = measured[:count].float().cpu()
    if trainer.accelerator.num_processes > 1:
        norms = gather(norms.to(trainer.accelerator.device)).cpu()
    return norms


@mirrors(f"{GRPO}._generate_and_score_completions", "2634-2655 of 2324-2936", "1fa48922792dcd5c",
         "old log-probabilities of rows trained a generation batch after they were drawn")
def attach_sampling_logps(trainer, probes: Rollout) -> None:
    """Log-probabilities of the probes under the weights that drew them, for the importance ratio when they are
    trained a generation batch later. TRL computes these itself when the steps are misaligned or vLLM's
    correction is on; otherwise here, for the rows that will train (the others get NaN, never read)."""
    batch = probes.batch
    if "old_per_token_logps" in batch:
        return
    trains = trainer._trains(probes)[probes.local_rows(trainer.accelerator.process_index)]
    if trainer._dist.is_zero3 or trainer.is_fsdp_enabled:
        trains = torch.ones_like(trains)  # sharded forwards are collectives: every process scores all its rows
    rows = trains.nonzero().flatten()
    logps = torch.full(batch["completion_ids"].shape, float("nan"), device=batch["completion_ids"].device)
    if len(rows):
        part = select_rows(batch, rows)
        with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
            logps[rows.to(logps.device)], _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model,
                torch.cat([part["prompt_ids"], part["completion_ids"]], dim=1),
                torch.cat([part["prompt_mask"], part["completion_mask"]], dim=1),
                part["completion_ids"].size(1),
                batch_size=trainer.args.per_device_train_batch_size,
            )
    batch["old_per_token_logps"] = logps


def grad_micro_batch_size(trainer) -> int | None:
    """`gvm_grad_batch_size`, else on a GPU as many rows as fit in its free memory (None: the pass decides), else
    `per_device_train_batch_size` (a CPU has no free-memory figure to size by)."""
    if trainer.args.gvm_grad_batch_size is not None:
        return trainer.args.gvm_grad_batch_size
    return None if trainer.accelerator.device.type == "cuda" else trainer.args.per_device_train_batch_size
