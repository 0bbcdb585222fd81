"""What putting Lemma 1's weights on the advantage changes: the KL term is TRL's, unweighted.

The trainers weight each row's policy term by ω_r through its advantage (TRL's losses are positively homogeneous in
it) and rescale the weights to mean 1 over the batch's loss tokens, so for the token-mean loss (dapo) the policy
term is exactly the weighted objective Σ ω_r a_r / Σ ω_r τ_r. Its KL penalty, inside TRL's loss, stays the plain
token mean β·Σ KL / Σ τ instead of the weighted β·Σ ω_r KL_r / Σ ω_r τ_r that a hand-written weighted loss would
give. This script measures how far apart the two updates are on real GVM batches:

1. Train a tiny Llama with GVM-RAFT++ (Lemma 1 weights, lr 1e-2) for ``--steps`` steps, so that the policy has
   moved away from the reference model and the KL term has a gradient.
2. On the next ``--batches`` generation batches, compute the gradient of TRL's loss on ω·A (the package's) and of
   the weighted-KL loss (the alternative), for each β in ``--betas``, and report ‖g_pkg − g_alt‖ / ‖g_alt‖ and
   their cosine.

    python benchmarks/kl_weighting.py             # ~1 minute on CPU
    python benchmarks/kl_weighting.py --quick     # smoke test

Results: ``benchmarks/results/kl_weighting.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from gvm_trl import GVMRAFTConfig, GVMRAFTTrainer  # noqa: E402
from gvm_trl.testing import make_char_tokenizer, make_tiny_llama, parity_reward  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "kl_weighting.json"


def weighted_kl_loss(trainer, model, batch, beta: float) -> torch.Tensor:
    """The alternative: Σ_r ω_r (policy_r + β KL_r) / Σ_r ω_r τ_r, policy and KL per token as TRL defines them."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attention, batch["completion_ids"].size(1))
    mask = batch["completion_mask"].float()
    weight = batch["gvm_weight"].unsqueeze(1)
    advantage = (batch["advantages"] / batch["gvm_weight"].clamp(min=1e-12)).unsqueeze(1)  # the raw advantage
    old = batch.get("old_per_token_logps", logps.detach())
    ratio = torch.exp(logps - old)
    clipped = ratio.clamp(1 - trainer.epsilon_low, 1 + trainer.epsilon_high)
    policy = -torch.minimum(ratio * advantage, clipped * advantage)
    ref = batch["ref_per_token_logps"]
    kl = (torch.exp(ref - logps) - (ref - logps) - 1) * ratio  # TRL's k3 with its bias correction (default on)
    return (weight * (policy + beta * kl) * mask).sum() / (weight * mask).sum()


def gradient(model, loss) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.001, 0.04, 0.1])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batches, args.betas = 2, 1, [0.04]
    torch.set_num_threads(1)
    tokenizer = make_char_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": f"Q{i}: {i}+1?"}]} for i in range(256)]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        make_tiny_llama(tokenizer).save_pretrained(f"{scratch}/model")
        for beta in args.betas:
            config = GVMRAFTConfig(
                output_dir=f"{scratch}/out", per_device_train_batch_size=16, num_generations=4,
                max_completion_length=8, max_steps=args.steps, learning_rate=1e-2, beta=beta, bf16=False,
                use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=0,
                gradient_checkpointing=False, disable_tqdm=True,
            )
            trainer = GVMRAFTTrainer(model=f"{scratch}/model", reward_funcs=parity_reward, args=config,
                                     train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            model = trainer.model.train()
            trainer.current_gradient_accumulation_steps = 1
            differences, cosines = [], []
            for batch_index in range(args.batches):
                start = args.steps * 4 + batch_index * 4
                keys = list(range(start, start + 4))
                prompts = [trainer.train_dataset[i] for i in keys]
                batch = trainer.build_generation_batch(prompts, keys)
                if batch.get("gvm_skip"):
                    continue
                ours = gradient(model, trainer.compute_loss(model, batch))
                theirs = gradient(model, weighted_kl_loss(trainer, model, batch, beta))
                differences.append(((ours - theirs).norm() / theirs.norm()).item())
                cosines.append(torch.nn.functional.cosine_similarity(ours, theirs, dim=0).item())
            results[str(beta)] = {
                "relative_difference_median": statistics.median(differences),
                "relative_difference_max": max(differences),
                "cosine_min": min(cosines),
                "batches": len(differences),
            }
            print(f"beta={beta}: ‖g_pkg − g_weighted‖/‖g_weighted‖ median {statistics.median(differences):.2e}, "
                  f"max {max(differences):.2e}; cosine ≥ {min(cosines):.6f} ({len(differences)} batches)")
    report = {"setup": f"tiny Llama, GVM-RAFT++ lr 1e-2, {args.steps} steps, m = 4, N′ = 4, B = 4", "results": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
