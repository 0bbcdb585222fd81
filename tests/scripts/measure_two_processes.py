"""The gradient-norm pass's micro-batch under unequal free memory (issue 26, B1): two processes (torchrun, gloo,
CPU) each report a different free-memory figure, as two GPUs with different loads would; both must size their
micro-batches alike (the smallest), so that they run as many forwards — a sharded forward is a collective, and
unequal counts deadlock. Each process writes its micro-batch, its forward count and its norms to OUTPUT/rank-R.json.

    torchrun --nproc_per_node 2 tests/scripts/measure_two_processes.py OUTPUT
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

import torch
from accelerate import Accelerator

from gvm_trl.measurement import MeasurementContext, grad_micro_batch_size, grad_norms
from gvm_trl.rollout import Rollout
from gvm_trl.testing import make_char_tokenizer, make_tiny_llama

FREE_BYTES = {0: 1 << 40, 1: 1}  # rank 0: a terabyte free; rank 1: nothing to spare


def probes(rank: int, processes: int, rows: int = 6, width: int = 12) -> Rollout:
    """Each process's `rows` accepted probe rows (the same on every process up to a shift of the token ids)."""
    generator = torch.Generator().manual_seed(rank)
    prompt_ids = torch.randint(5, 60, (rows, 4), generator=generator)
    completion_ids = torch.randint(5, 60, (rows, width), generator=generator)
    lengths = torch.arange(rows) % width + 1
    completion_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    batch = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
             "completion_mask": completion_mask}
    total = rows * processes
    everywhere = torch.ones(total, dtype=torch.bool)
    return Rollout(batch, torch.zeros(total, dtype=torch.long), torch.ones(total, 1), torch.ones(total), everywhere,
                   everywhere, torch.ones(total), torch.zeros(total, dtype=torch.bool), {}, 0, "probe", processes)


def main() -> None:
    output = sys.argv[1]
    accelerator = Accelerator(cpu=True)
    rank, processes = accelerator.process_index, accelerator.num_processes
    model = make_tiny_llama(make_char_tokenizer())
    context = MeasurementContext(model, model, accelerator, 1.0, "all", None, 8, True, None, None,
                                 free_bytes=lambda: FREE_BYTES[rank])
    rollout = probes(rank, processes)
    shape = torch.Size([6, 16])
    micro_batch = grad_micro_batch_size(context, model, shape)
    forwards = []
    hook = model.register_forward_hook(lambda *args: forwards.append(1))
    norms = grad_norms(context, rollout)
    hook.remove()
    reference = grad_norms(replace(context, grad_batch_size=6), rollout)  # every row in one micro-batch
    with open(os.path.join(output, f"rank-{rank}.json"), "w") as handle:
        json.dump({"processes": processes, "micro_batch": micro_batch, "forwards": len(forwards),
                   "norms": norms.tolist(), "reference": reference.tolist()}, handle)
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
