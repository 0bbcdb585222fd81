"""Per-sample gradient norms of FSDP2-sharded models against the unsharded ones; run under `torchrun`.

Each process measures its own rows (a different number of accepted tokens per process) on a tiny Llama (fast rules
only) and a tiny Qwen3-MoE (experts and routers measured by the generic rule, which re-runs modules during the
backward) whose decoder layers and root are sharded with `fully_shard`, and compares with the same rows on
unsharded copies, once per `--params` choice. Writes `result-{rank}.json` with, per choice: the Llama's norms, the
largest relative error over both models, whether parameters are still sharded, and any `.grad` left.
"""

import argparse
import json
import os
import sys

import warnings

import torch
import torch.distributed as dist
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import make_char_tokenizer, make_tiny_llama  # noqa: E402

from gvm_trl.grad_norms import per_sample_grad_norms  # noqa: E402


def make_tiny_moe(vocab_size: int) -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )
    return Qwen3MoeForCausalLM(config)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--params", nargs="+", default=["trainable"], help="the parameter choices to measure, each in turn")
    options = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    tokenizer = make_char_tokenizer()
    reference = make_tiny_llama(tokenizer, seed=0)
    sharded = shard(make_tiny_llama(tokenizer, seed=0))
    moe_reference = make_tiny_moe(len(tokenizer))
    moe_sharded = shard(make_tiny_moe(len(tokenizer)))

    generator = torch.Generator().manual_seed(rank)
    rows, length = 3 + rank, 12
    input_ids = torch.randint(3, reference.config.vocab_size, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # one left-padded row
    loss_mask = torch.zeros_like(input_ids)
    loss_mask[:, 6 + rank :] = 1
    batch = (input_ids, attention_mask, loss_mask)

    def compare(unsharded, model, params):
        expected = per_sample_grad_norms(unsharded, *batch, params=params)
        measured = per_sample_grad_norms(model, *batch, params=params)
        return expected, ((measured - expected).abs() / expected).max().item()

    result = {}
    models = (sharded, moe_sharded)
    for params in options.params:
        expected, error = compare(reference, sharded, params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the notice that the experts need the generic rule
            _, moe_error = compare(moe_reference, moe_sharded, params)
        still_sharded = all(
            isinstance(p, DTensor) and p.to_local().numel() < p.numel()
            for m in models for p in m.parameters() if p.numel() > 1
        )
        result[params] = {
            "world_size": dist.get_world_size(),
            "expected": expected.tolist(),
            "max_rel_error": max(error, moe_error),
            "still_sharded": still_sharded,
            "grads": sum(p.grad is not None for m in models for p in m.parameters()),
        }
    with open(os.path.join(options.output_dir, f"result-{rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
