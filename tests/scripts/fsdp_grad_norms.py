"""Per-sample gradient norms of an FSDP2-sharded model against the unsharded one; run under `torchrun`.

Each process measures its own rows (a different number of accepted tokens per process) on a tiny Llama whose
decoder layers and root are sharded with `fully_shard`, and compares with the same rows on an unsharded copy.
Writes `result-{rank}.json`: the largest relative error, whether parameters are still sharded, and any `.grad` left.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import make_char_tokenizer, make_tiny_llama  # noqa: E402

from gvm_trl.grad_norms import per_sample_grad_norms  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--params", default="trainable")
    options = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    tokenizer = make_char_tokenizer()
    reference = make_tiny_llama(tokenizer, seed=0)
    sharded = make_tiny_llama(tokenizer, seed=0)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)

    generator = torch.Generator().manual_seed(rank)
    rows, length = 3 + rank, 12
    input_ids = torch.randint(3, reference.config.vocab_size, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # one left-padded row
    loss_mask = torch.zeros_like(input_ids)
    loss_mask[:, 6 + rank :] = 1

    expected = per_sample_grad_norms(reference, input_ids, attention_mask, loss_mask, params=options.params)
    measured = per_sample_grad_norms(sharded, input_ids, attention_mask, loss_mask, params=options.params)
    still_sharded = all(
        isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in sharded.parameters() if p.numel() > 1
    )
    result = {
        "world_size": dist.get_world_size(),
        "expected": expected.tolist(),
        "max_rel_error": ((measured - expected).abs() / expected).max().item(),
        "still_sharded": still_sharded,
        "grads": sum(p.grad is not None for p in sharded.parameters()),
    }
    with open(os.path.join(options.output_dir, f"result-{rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
