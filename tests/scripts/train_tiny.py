"""Train a GVM trainer for a few steps on a tiny model; run under `torchrun` or plain `python`.

Writes `result-{rank}.json` into the output directory: the number of processes accelerate saw, the losses, the
allocation records every process computed, and a checksum of the trained weights. tests/test_distributed.py compares a
two-process run with a single-process one.

`--runs RUNS.json` ({name: [options]}) trains each named run in turn in this one launch, into `OUTPUT_DIR/name`, with
the launch's other options before its own: a launch costs seconds of imports, a run of this size under one.
"""

import argparse
import json
import os
import sys
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS, os.path.join(os.path.dirname(TESTS), "examples")]
from conftest import make_char_tokenizer, make_tiny_llama  # noqa: E402
from train import leave_distributed_run  # noqa: E402

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from gvm_trl import GVMGRPOConfig, GVMGRPOTrainer, GVMRAFTConfig, GVMRAFTTrainer  # noqa: E402

TRAINERS = {
    "raft": (GVMRAFTTrainer, GVMRAFTConfig),
    "grpo": (GVMGRPOTrainer, GVMGRPOConfig),
    "trl": (GRPOTrainer, GRPOConfig),  # plain trl.GRPOTrainer, for parity
}


def reward(prompts, completions, **kwargs):
    """Deterministic per prompt: prompts 0 mod 3 are rejected, the others accepted (greedy decoding)."""
    return [0.0 if int(p[-1]["content"].split(":")[0][1:]) % 3 == 0 else 1.0 for p in prompts]


def sampled_reward(prompts, completions, **kwargs):
    """For sampled completions: a reward that differs within each group (parity of the characters' codes, plus a
    length term), so GRPO's advantages are not all zero."""
    texts = [c[-1]["content"] for c in completions]
    return [float(sum(map(ord, t)) % 2) + 0.1 * len(t) for t in texts]


def weights_checksum(trainer) -> float:
    """Σ|w| over the full (unsharded) weights, gathered under ZeRO-3 and FSDP."""
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective: every process calls it
    return sum(value.double().abs().sum().item() for value in state.values()) if state else float("nan")


def count_gathered_shards(model) -> int:
    """ZeRO-3 parameters still holding their full data (0 when nothing is sharded)."""
    return sum(getattr(p, "ds_status", None) is not None and p.ds_status.name != "NOT_AVAILABLE" for p in model.parameters())


class PauseAfterCheckpoint(TrainerCallback):
    """Every process waits after the checkpoint of `step` is written, so a kill lands between steps, not after the
    run (a tiny run's steps take well under a second)."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            time.sleep(120)


class GatherCountingPort:
    """The trainer's port, counting after each gradient-norm pass the parameter shards it left gathered."""

    def __init__(self, trainer, counts: list):
        self.trainer, self.counts = trainer, counts

    def __getattr__(self, name):
        return getattr(self.trainer, name)

    def probe_grad_norms(self, *args, **kwargs):
        norms = self.trainer.probe_grad_norms(*args, **kwargs)
        self.counts.append(count_gathered_shards(self.trainer.model))
        return norms


class RecordingSchedule:
    """The trainer's schedule, recording every generation batch's plan."""

    def __init__(self, schedule, records: list):
        self.schedule, self.records = schedule, records

    def __getattr__(self, name):
        return getattr(self.schedule, name)

    def rollouts(self, *args):
        rollouts = self.schedule.rollouts(*args)
        allocation = rollouts.allocation
        self.records.append({"sizes": allocation.sizes, "accept_rates": allocation.accept_rates,
                             "grad_norms": allocation.grad_norms, "probe_step": allocation.probe_step,
                             "fallback": allocation.fallback})
        return rollouts


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trainer", choices=sorted(TRAINERS), default="raft")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--runs", help="a JSON file {name: [options]}: train each in turn, into OUTPUT_DIR/name")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--save_steps", type=int, default=0, help="checkpoint every N steps (0: never)")
    parser.add_argument("--resume", help="the checkpoint to resume from")
    parser.add_argument("--pause_after_checkpoint", type=int,
                        help="wait 120 s after saving this step's checkpoint (a window for a test to kill the run)")
    parser.add_argument("--deepspeed", help="a DeepSpeed config file (e.g. ZeRO-3)")
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP (full_shard; needs --cuda)")
    parser.add_argument("--cuda", action="store_true", help="train on the GPU (default: the CPU, gloo)")
    parser.add_argument("--no_ds3_gather", action="store_true", help="ds3_gather_for_generation=False")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--steps_per_generation", type=int, help="default: gradient_accumulation_steps")
    parser.add_argument("--schedule", choices=["probe-ahead", "sequential"], default="sequential")
    parser.add_argument("--history_decay", type=float, help="gvm_history_decay (default: the config's automatic choice)")
    parser.add_argument("--explore_samples", type=int, default=0, help="gvm_explore_samples")
    parser.add_argument("--grad_norms", choices=["measured", "constant"], default="measured", help="gvm_grad_norms")
    parser.add_argument("--rate_floor_quantile", type=float, help="gvm_rate_floor_quantile")
    parser.add_argument("--rate_prior", choices=["none", "batch"], default="none", help="gvm_rate_prior")
    parser.add_argument("--allocation", choices=["gvm", "dynamic", "knapsack", "reinforce-ada"], default="gvm",
                        help="gvm_allocation (reinforce-ada trains unweighted, as it must)")
    parser.add_argument("--sample", action="store_true", help="sample completions (default: greedy) and score them "
                        "with a reward that varies within each group")
    parser.add_argument("--gvm_off", action="store_true",
                        help="uniform allocation, no weights, N′ + B = num_generations: what trl.GRPOTrainer computes")
    return parser


def train(options: argparse.Namespace) -> None:
    os.makedirs(options.output_dir, exist_ok=True)

    tokenizer = make_char_tokenizer()
    model = make_tiny_llama(tokenizer, seed=0)
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"Q{i}: {i}+1?"}], "answer": str(i + 1)} for i in range(48)]
    )
    trainer_cls, config_cls = TRAINERS[options.trainer]
    settings = dict(
        output_dir=options.output_dir,
        per_device_train_batch_size=options.per_device_train_batch_size,
        num_generations=4,
        max_completion_length=5,
        max_steps=options.steps,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=not options.cuda,
        save_strategy="steps" if options.save_steps else "no",
        save_steps=options.save_steps or 500,
        seed=0,
        beta=0.0,
        generation_kwargs={"do_sample": options.sample},
        shuffle_dataset=False,
        deepspeed=options.deepspeed,
        fsdp="full_shard" if options.fsdp else None,
        ds3_gather_for_generation=not options.no_ds3_gather,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        steps_per_generation=options.steps_per_generation,
    )
    if options.trainer != "trl":
        settings.update(
            gvm_probe_ahead=options.schedule == "probe-ahead",
            gvm_history_decay=options.history_decay,
            gvm_explore_samples=options.explore_samples,
            gvm_allocation=options.allocation,
            gvm_grad_norms=options.grad_norms,
            gvm_rate_floor_quantile=options.rate_floor_quantile,
            gvm_rate_prior=options.rate_prior,
        )
        if options.allocation == "reinforce-ada":
            settings.update(gvm_weighting="none")
        if options.gvm_off:
            settings.update(gvm_allocation="uniform", gvm_weighting="none", gvm_num_probes=2, gvm_budget_per_prompt=2,
                            gvm_probe_ahead=None)
    args = config_cls(**settings)
    trainer = trainer_cls(
        model=model, reward_funcs=sampled_reward if options.sample else reward, args=args, train_dataset=dataset,
        processing_class=tokenizer,
    )
    if options.pause_after_checkpoint is not None:
        trainer.add_callback(PauseAfterCheckpoint(options.pause_after_checkpoint))
    records, left_gathered = [], []
    if options.trainer != "trl":
        trainer.schedule.port = GatherCountingPort(trainer, left_gathered)
        trainer.schedule = RecordingSchedule(trainer.schedule, records)
    trainer.train(resume_from_checkpoint=options.resume)
    checksum = weights_checksum(trainer)
    result = {
        "num_processes": trainer.accelerator.num_processes,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "records": records,
        "checksum": checksum,
        "left_gathered": left_gathered,
        "history": None if getattr(trainer, "prompt_history", None) is None else trainer.prompt_history.state_dict(),
    }
    rank = trainer.accelerator.process_index
    with open(os.path.join(options.output_dir, f"result-{rank}.json"), "w") as handle:
        json.dump(result, handle)
    trainer.accelerator.wait_for_everyone()  # every result is written before any rank leaves


def main():
    parser = make_parser()
    options = parser.parse_args()
    if options.runs is None:
        train(options)
        return
    with open(options.runs) as handle:
        runs = json.load(handle)
    launch = argparse.Namespace(**{**vars(options), "runs": None})
    for name, run_options in runs.items():  # parsed over the launch's options: a run's own override them
        run_args = [*run_options, "--output_dir", os.path.join(options.output_dir, name)]
        train(parser.parse_args(run_args, namespace=argparse.Namespace(**vars(launch))))


if __name__ == "__main__":
    main()
    leave_distributed_run()  # gloo's teardown at interpreter exit could abort a finished run: examples/train.py
