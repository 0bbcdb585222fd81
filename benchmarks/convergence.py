"""Sample efficiency: held-out reward against completions generated, GVM allocation vs the uniform split.

What is measured
----------------
Four methods train the same model on the same prompts (per seed) with the same rollout budget per generation
batch of m prompts — N′·m probes plus N = B·m phase-2 completions (``--num-probes N′``,
``--budget-per-prompt B``):

- ``gvm-raft``  ``GVMRAFTTrainer``, ``gvm_allocation="gvm"`` (Theorem 3), Lemma 1 weights (the default);
- ``raft``      ``GVMRAFTTrainer``, ``gvm_allocation="uniform"``, ``gvm_weighting="none"`` (RAFT++);
- ``gvm-grpo``  ``GVMGRPOTrainer``, ``gvm_allocation="gvm"``, Lemma 1 weights;
- ``grpo``      ``GVMGRPOTrainer``, ``gvm_allocation="uniform"``, ``gvm_weighting="none"`` (GRPO);
- ``gvm-raft-unweighted``, ``gvm-grpo-unweighted`` (an ablation, run only when named in ``--methods``): Theorem 3's
                allocation with ``gvm_weighting="none"``, as the official code trains.

The uniform baselines run their probes through the same code path (and train on them, as GVM does), so every
method generates m·(N′ + B) completions per step; the x axis is the count the trainer itself reports
(``trainer.rollout_totals``: probe + budget completions). Every ``--eval-every`` steps (and before training) a
``TrainerCallback`` measures the held-out reward: ``gvm_trl.evaluation.dataset_accuracy`` on
``make_arithmetic_dataset(--heldout, seed=10_000)`` (prompts never trained on; with ``--tiny`` the letter task's
reward on letter sets drawn with that seed), ``--eval-samples`` completions per prompt at ``--eval-temperature``, with one fixed sampling seed for every evaluation (common random numbers: the
curves of different methods differ by the model, not by the evaluation's draws).

Summary: the target reward is the midpoint between the starting reward and the best seed-averaged reward any
method reaches; for each method the completions needed to first reach it (seed-averaged curve, linear
interpolation between evaluations; ``null`` if never reached) and the GVM/uniform ratio of those counts per
family (< 1: GVM needs fewer completions). Curves (mean ± min/max over seeds) go to a PNG, everything to JSON.
The KL penalty is off (``beta = 0``) for all four methods: no reference model, half the forward passes. On CPU
the default trains LoRA adapters (r = 16 on every linear layer, lr 1e-4): a step costs about a quarter less than
a full fine-tune (no weight gradients or Adam state for the 135M base weights, a cheaper gradient-norm pass);
``--no-lora --learning-rate 2e-5`` trains the full model. A CPU step of SmolLM2 costs about a minute or more
(the few-shot prompts are ~150 tokens), so the CPU presets only show the mechanics; the GPU command below is the
configuration whose curves can separate the methods.

    python benchmarks/convergence.py --quick              # smoke test: tiny random model, 2 steps per method
    python benchmarks/convergence.py --tiny --seeds 0 1 2 3 4 5 6 7   # the letter task (letters.py), ~32 min
    python benchmarks/convergence.py                      # CPU: SmolLM2-135M-Instruct, LoRA r=16, fp32, 2 seeds
    python benchmarks/convergence.py --seeds 0 --max-steps 8 --eval-every 4 --methods gvm-raft raft \
        --num-probes 2 --budget-per-prompt 2 --heldout 16      # the reduced CPU run of results/convergence_cpu.*
    python benchmarks/convergence.py --device cuda --seeds 0 1 2 --max-steps 200 --prompts-per-step 32 \\
        --num-probes 8 --budget-per-prompt 8 --max-completion-length 256 --heldout 256 --eval-every 10

Results: ``benchmarks/results/convergence_<tag>.json`` and ``.png`` (tag: cpu, cuda, tiny or quick); the JSON is
rewritten after every finished run, so a long run interrupted part-way still leaves its finished curves.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # the evaluation's generate progress bars

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import (  # noqa: E402
    RESULTS_DIR,
    limit_threads,
    load_policy,
    reward_function,
    trainer_arguments,
)
from letters import conversation, letter_reward, letter_sets, letters_dataset, warm_started_policy  # noqa: E402

HELDOUT_SEED = 10_000
METHODS = {  # name: (trainer, allocation, weighting)
    "gvm-raft": ("raft", "gvm", "lemma1"),
    "raft": ("raft", "uniform", "none"),
    "gvm-grpo": ("grpo", "gvm", "lemma1"),
    "grpo": ("grpo", "uniform", "none"),
    # Ablation: Theorem 3's allocation without Lemma 1's reweighting, as the official code trains.
    "gvm-raft-unweighted": ("raft", "gvm", "none"),
    "gvm-grpo-unweighted": ("grpo", "gvm", "none"),
}
DEFAULT_METHODS = ["gvm-raft", "raft", "gvm-grpo", "grpo"]
FAMILIES = {
    "RAFT++": ("gvm-raft", "raft"),
    "GRPO": ("gvm-grpo", "grpo"),
    "RAFT++, allocation only": ("gvm-raft-unweighted", "raft"),
    "GRPO, allocation only": ("gvm-grpo-unweighted", "grpo"),
}
PRESETS = {
    "cpu": dict(prompts_per_step=4, num_probes=4, budget_per_prompt=4, max_completion_length=24, max_steps=12,
                eval_every=3, heldout=24, eval_samples=2, learning_rate=1e-4, train_prompts=256, lora=True),
    "cuda": dict(prompts_per_step=32, num_probes=8, budget_per_prompt=8, max_completion_length=256, max_steps=200,
                 eval_every=10, heldout=256, eval_samples=4, learning_rate=1e-6, train_prompts=4096, lora=False),
    "tiny": dict(prompts_per_step=8, num_probes=4, budget_per_prompt=4, max_completion_length=2, max_steps=800,
                 eval_every=50, heldout=128, eval_samples=4, learning_rate=2e-3, train_prompts=4096, lora=False,
                 warm_start_steps=300),
    "quick": dict(prompts_per_step=2, num_probes=2, budget_per_prompt=2, max_completion_length=2, max_steps=2,
                  eval_every=1, heldout=4, eval_samples=2, learning_rate=2e-3, train_prompts=8, lora=False,
                  warm_start_steps=5),
}


class HeldoutEvaluator(TrainerCallback):
    """Held-out reward before training and every `every` steps (and after the last), with completions so far."""

    def __init__(self, every: int, evaluate, start_cache: dict | None = None):
        self.every, self.evaluate, self.trainer, self.curve = every, evaluate, None, []
        self.start_cache = {} if start_cache is None else start_cache

    def _record(self, step: int) -> None:
        totals = self.trainer.rollout_totals
        started = time.perf_counter()
        if step == 0 and "reward" in self.start_cache:  # the untrained model is the same in every run
            reward = self.start_cache["reward"]
        else:
            reward = self.evaluate(self.trainer.model)
        if step == 0:
            self.start_cache["reward"] = reward
        self.curve.append({
            "step": step,
            "completions": int(totals["probe_completions"] + totals["budget_completions"]),
            "reward": reward,
            "eval_seconds": time.perf_counter() - started,
        })
        print(f"    step {step:3d}  completions {self.curve[-1]['completions']:5d}  held-out reward {reward:.3f}",
              flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self._record(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._record(state.global_step)


def make_evaluator(tokenizer, args):
    """model -> mean held-out reward (fixed sampling seed: common random numbers across methods).

    Real models: `dataset_accuracy` (the math verifier) on held-out arithmetic prompts. The tiny model: the
    letter task's reward on letter sets drawn with the held-out seed.
    """
    from gvm_trl.data import make_arithmetic_dataset
    from gvm_trl.evaluation import dataset_accuracy, generate_completions

    sampling = dict(num_samples=args.eval_samples, temperature=args.eval_temperature,
                    max_new_tokens=args.max_completion_length, batch_size=args.eval_batch_size)
    if not args.tiny:
        heldout = make_arithmetic_dataset(args.heldout, seed=HELDOUT_SEED)
        return lambda model: dataset_accuracy(model, tokenizer, heldout, seed=args.eval_seed, **sampling)

    letters = letter_sets(args.heldout, seed=HELDOUT_SEED)
    prompts = [tokenizer.apply_chat_template(conversation(x), add_generation_prompt=True, tokenize=False)
               for x in letters]

    def evaluate(model) -> float:
        with torch.random.fork_rng():
            torch.manual_seed(args.eval_seed)
            texts = generate_completions(model, tokenizer, prompts, **sampling)
        return statistics.fmean(r for x, samples in zip(letters, texts) for r in letter_reward([x] * len(samples), samples))

    return evaluate


def build_trainer(method: str, seed: int, args, output_dir: str, evaluator: HeldoutEvaluator):
    from gvm_trl import GVMGRPOConfig, GVMGRPOTrainer, GVMRAFTConfig, GVMRAFTTrainer
    from gvm_trl.data import make_arithmetic_dataset

    family, allocation, weighting = METHODS[method]
    trainer_cls, config_cls = (GVMRAFTTrainer, GVMRAFTConfig) if family == "raft" else (GVMGRPOTrainer, GVMGRPOConfig)
    if args.tiny:
        model, tokenizer = warm_started_policy(steps=args.warm_start_steps)
    else:
        model, tokenizer = load_policy(args.model, False, args.device)
    group = max(args.num_probes, 2)  # num_generations only fixes m = generation batch / num_generations here
    config = config_cls(**trainer_arguments(
        args.device, output_dir, seed,
        per_device_train_batch_size=args.prompts_per_step * group,
        num_generations=group,
        max_completion_length=args.max_completion_length,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        gvm_num_probes=args.num_probes,
        gvm_budget_per_prompt=args.budget_per_prompt,
        gvm_allocation=allocation,
        gvm_weighting=weighting,
    ))
    evaluator.evaluate = make_evaluator(tokenizer, args)
    trainer = trainer_cls(
        model=model,
        reward_funcs=letter_reward if args.tiny else reward_function("math"),
        args=config,
        train_dataset=(letters_dataset if args.tiny else make_arithmetic_dataset)(args.train_prompts, args.data_seed),
        processing_class=tokenizer,
        callbacks=[evaluator],
        peft_config=lora_config(args) if args.lora else None,
    )
    trainer.remove_callback(PrinterCallback)
    evaluator.trainer = trainer
    return trainer


def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def run_one(method: str, seed: int, args, start_cache: dict | None = None) -> dict:
    """Train one method with one seed; its curve, rollout totals and wall time.

    `start_cache` shares the step-0 evaluation between runs: every run starts from the same weights (LoRA's B
    matrices start at zero) and the evaluation's sampling seed is fixed, so it would give the same number.
    """
    started = time.perf_counter()
    evaluator = HeldoutEvaluator(args.eval_every, evaluate=None, start_cache=start_cache)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(method, seed, args, output_dir, evaluator)
        trainer.train()
    logs = trainer.state.log_history
    return {
        "method": method,
        "seed": seed,
        "curve": evaluator.curve,
        "rollout_totals": dict(trainer.rollout_totals),
        "train_accept_rate": [log["gvm/accept_rate"] for log in logs if "gvm/accept_rate" in log],
        "variance_bound_ratio": [log["gvm/variance_bound_ratio"] for log in logs if "gvm/variance_bound_ratio" in log],
        "wall_seconds": time.perf_counter() - started,
    }


# -- analysis -------------------------------------------------------------------------------------------------------


def mean_curve(runs: list[dict]) -> dict:
    """Seed-averaged curve on the evaluation points all seeds share (same schedule, so the same x)."""
    length = min(len(run["curve"]) for run in runs)
    points = [[run["curve"][i] for run in runs] for i in range(length)]
    return {
        "completions": [statistics.fmean(p["completions"] for p in point) for point in points],
        "mean": [statistics.fmean(p["reward"] for p in point) for point in points],
        "min": [min(p["reward"] for p in point) for point in points],
        "max": [max(p["reward"] for p in point) for point in points],
    }


def completions_to_reach(curve: dict, target: float) -> float | None:
    """First x where the mean curve reaches `target`, linearly interpolated between evaluations."""
    xs, ys = curve["completions"], curve["mean"]
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y >= target:
            if i == 0:
                return x
            return xs[i - 1] + (target - ys[i - 1]) / (y - ys[i - 1]) * (x - xs[i - 1])
    return None


def analyse(runs: list[dict]) -> dict:
    """Mean curves, the target reward, completions to reach it and the GVM/uniform ratios."""
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    curves = {m: mean_curve([r for r in runs if r["method"] == m]) for m in methods}
    start = statistics.fmean(c["mean"][0] for c in curves.values())
    best = max(max(c["mean"]) for c in curves.values())
    target = start + 0.5 * (best - start) if best > start else None
    reach = {m: (completions_to_reach(c, target) if target is not None else None) for m, c in curves.items()}
    ratios = {}
    for family, (gvm, uniform) in FAMILIES.items():
        if gvm in reach and uniform in reach:
            ratios[family] = reach[gvm] / reach[uniform] if reach[gvm] and reach[uniform] else None
    final = {m: {"mean": c["mean"][-1], "min": c["min"][-1], "max": c["max"][-1]} for m, c in curves.items()}
    area = {m: _mean_over_points(c) for m, c in curves.items()}
    return {"start_reward": start, "best_reward": best, "target_reward": target, "completions_to_target": reach,
            "gvm_over_uniform_completions": ratios, "final_reward": final, "mean_reward_over_curve": area,
            "curves": curves}


def _mean_over_points(curve: dict) -> float:
    """Average held-out reward over the evaluations after the start (a coarse area under the curve)."""
    later = curve["mean"][1:] or curve["mean"]
    return statistics.fmean(later)


def format_summary(summary: dict, runs: list[dict]) -> str:
    fmt = lambda x, spec=".0f": "never" if x is None else format(x, spec)  # noqa: E731
    target = summary["target_reward"]
    lines = [f"start reward {summary['start_reward']:.3f}, best (seed mean) {summary['best_reward']:.3f}, "
             f"target {fmt(target, '.3f')}",
             f"{'method':10s} {'completions':>11s} {'final reward':>20s} {'mean after start':>16s} "
             f"{'to target':>10s} {'minutes':>8s}"]
    for method, final in summary["final_reward"].items():
        done = [r for r in runs if r["method"] == method]
        completions = statistics.fmean(r["curve"][-1]["completions"] for r in done)
        minutes = statistics.fmean(r["wall_seconds"] for r in done) / 60
        lines.append(f"{method:10s} {completions:11.0f} {final['mean']:8.3f} [{final['min']:.3f}, {final['max']:.3f}] "
                     f"{summary['mean_reward_over_curve'][method]:16.3f} "
                     f"{fmt(summary['completions_to_target'][method]):>10s} {minutes:8.1f}")
    for family, ratio in summary["gvm_over_uniform_completions"].items():
        lines.append(f"{family}: completions to target, GVM / uniform = {fmt(ratio, '.2f')}")
    return "\n".join(lines)


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [(f, [m for m in pair if m in summary["curves"]]) for f, pair in FAMILIES.items()]
    families = [(f, ms) for f, ms in families if ms]
    figure, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), 4), squeeze=False)
    for axis, (family, methods) in zip(axes[0], families):
        for method, color in zip(methods, ("tab:red", "tab:blue")):
            curve = summary["curves"][method]
            axis.plot(curve["completions"], curve["mean"], marker="o", color=color, label=method)
            axis.fill_between(curve["completions"], curve["min"], curve["max"], color=color, alpha=0.15)
        if summary["target_reward"] is not None:
            axis.axhline(summary["target_reward"], color="grey", linestyle="--", linewidth=1, label="target")
        axis.set_xlabel("completions generated (probes included)")
        axis.set_ylabel("held-out reward")
        axis.set_title(family)
        axis.legend(fontsize=8)
    figure.suptitle(textwrap.fill(title, 110), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- command line ---------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="path, Hub id or the embedded demo model")
    parser.add_argument("--tiny", action="store_true", help="tiny Llama on the letter task (benchmarks/letters.py)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, 2 steps per method")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS,
                        help="the *-unweighted ablations (GVM allocation, no Lemma 1 weights) run only when named")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--prompts-per-step", type=int, help="m: prompts per generation batch")
    parser.add_argument("--num-probes", type=int, help="N′: probes per prompt")
    parser.add_argument("--budget-per-prompt", type=int, help="B = N/m: phase-2 completions per prompt on average")
    parser.add_argument("--max-completion-length", type=int)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction,
                        help="LoRA adapters (CPU default) or the full model (--no-lora; CUDA and --quick default)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--train-prompts", type=int)
    parser.add_argument("--warm-start-steps", type=int, help="letter task: supervised steps before RL")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the training prompts")
    parser.add_argument("--eval-every", type=int, help="evaluate every E steps")
    parser.add_argument("--heldout", type=int, help="held-out prompts")
    parser.add_argument("--eval-samples", type=int, help="completions per held-out prompt")
    parser.add_argument("--eval-temperature", type=float, default=1.0)
    parser.add_argument("--eval-seed", type=int, default=1234)
    parser.add_argument("--eval-batch-size", type=int, default=48)
    parser.add_argument("--output", type=Path, help="JSON path (the PNG goes next to it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tiny = True
        if args.seeds == [0, 1]:
            args.seeds = [0]
    preset = PRESETS["quick" if args.quick else "tiny" if args.tiny else args.device]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.tag = "quick" if args.quick else "tiny" if args.tiny else args.device
    return args


def setup_line(args) -> str:
    model = "tiny Llama (hidden 64), letter task" if args.tiny else args.model + (" (LoRA)" if args.lora else " (full fine-tune)")
    return (f"{model} on {args.device}, m = {args.prompts_per_step}, N′ = {args.num_probes}, B = "
            f"{args.budget_per_prompt}, ≤ {args.max_completion_length} tokens, lr {args.learning_rate:g}, "
            f"{args.max_steps} steps, seeds {args.seeds}, held-out {args.heldout}×{args.eval_samples}")


def write_report(runs: list[dict], args, output: Path, started: float, final: bool) -> dict:
    summary = analyse(runs)
    report = {
        "setup": setup_line(args),
        "complete": final,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_average": os.getloadavg(),
        "summary": summary,
        "runs": runs,
        "wall_time_s": time.perf_counter() - started,
    }
    output.write_text(json.dumps(report, indent=2))
    plot(summary, output.with_suffix(".png"), setup_line(args))
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    limit_threads(args.device)
    output = args.output or RESULTS_DIR / f"convergence_{args.tag}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    started, runs, start_cache = time.perf_counter(), [], {}
    print(f"[convergence] {setup_line(args)}", flush=True)
    for seed in args.seeds:  # seeds outermost: a cut-short run still has every method for the first seed
        for method in args.methods:
            print(f"[convergence] {method}, seed {seed}", flush=True)
            runs.append(run_one(method, seed, args, start_cache))
            report = write_report(runs, args, output, started, final=False)
    report = write_report(runs, args, output, started, final=True)
    print(f"\n== convergence: {report['setup']} ==")
    print(format_summary(report["summary"], runs))
    print(f"wrote {output} and {output.with_suffix('.png')} ({report['wall_time_s'] / 60:.1f} min)")
    return report


if __name__ == "__main__":
    main()
