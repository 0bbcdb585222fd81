"""What a GVM step costs, against a plain `trl.GRPOTrainer` step at equal completions.

What is measured
----------------
Every configuration sees the same model, prompts (same seed, hence the same sampler order), completion length and
sampling settings, and generates the SAME number of completions per generation batch of m prompts, m·G:

- ``grpo``           plain ``trl.GRPOTrainer`` with ``num_generations = G``: one round of m·G completions.
- ``uniform``        ``GVMGRPOTrainer`` with ``gvm_allocation="uniform"``, ``gvm_weighting="none"``, N′ + B = G: one
                     round, no probes, no gradient-norm pass (computes what ``trl.GRPOTrainer`` computes).
- ``gvm-sequential`` ``GVMGRPOTrainer``, the paper's protocol: N′·m probes, the gradient-norm pass, then the
                     (G − N′)·m allocated completions in a second round.
- ``gvm-grpo``       ``GVMGRPOTrainer`` probing ahead: one round per step holding this batch's allocated completions
                     and the next batch's N′·m probes; the gradient-norm pass over those probes, whose forward also
                     gives the reused probes' log-probabilities under the weights that drew them.
- ``gvm-raft``       ``GVMRAFTTrainer`` probing ahead (trains on the accepted rows only).

The configurations run in lockstep: each in its own worker process (so peak-memory numbers are its own), holding its
trainer, and the coordinator lets one worker take one optimizer step at a time, round-robin in a rotating order, so a
change of the machine's load hits every configuration alike. The first ``--warmup`` steps are discarded, and so is
the last (probing ahead, the last batch has no successor to probe, so it is cheaper than a steady-state step); the
median over the rest is reported. A step's wall time runs from its release to ``on_step_end``. It is split into:

- plain GRPO: generation = TRL's ``_generate_and_score_completions`` (generate + score + advantages), update = the
  rest of the step (forward + backward + optimizer);
- GVM: the probe round (sequential only: probing ahead needs one only for the first batch), the gradient-norm pass,
  the allocation, the generation round (allocated rows, with the next batch's probes riding along), the riding
  probes' old log-probabilities (0 where the gradient-norm pass's forward gives them, as for gvm-grpo and gvm-raft
  here; otherwise one no-grad forward; TRL computes them itself under vLLM's importance-sampling correction), the
  rest of the rollout (advantages, weights, rows), and the update.

Targets (not asserted; issue: one generation round per step): probing ahead ≤ 1.15× plain GRPO with 8 completions
per step and ≤ 1.05× with 16; uniform ≤ 1.05×.

Reward: by default a ``parity`` stand-in that accepts about half of all completions (``--reward math`` uses the
real verifier). Cost depends on the accept rate: the gradient-norm pass runs on the accepted probes only.

Memory: on CPU the peak resident set size of the worker process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``,
model load included) and the peak RSS during ``trainer.train()`` above the RSS just before it (psutil, sampled
every 5 ms); on CUDA ``torch.cuda.max_memory_allocated`` during training.

    python benchmarks/step_cost.py                              # CPU: SmolLM2-135M-Instruct, m = 2, G = 4, N′ = 2
    python benchmarks/step_cost.py --num-generations 8 --num-probes 4 --batch-size 16   # 16 completions per step
    python benchmarks/step_cost.py --reward math                # the real verifier instead of the parity stand-in
    python benchmarks/step_cost.py --tiny                       # tiny random model (fast, numbers meaningless)
    python benchmarks/step_cost.py --quick                      # smoke test: tiny model, in-process
    python benchmarks/step_cost.py --device cuda                # GPU: bf16, m·G = 64, 256-token completions
    bash benchmarks/gpu_smoke.sh                                # one GPU, no downloads: random Qwen2-0.5B-shaped model

``--model random-qwen2-0.5b`` builds Qwen2-0.5B's transformer body (24 layers, hidden 896, 14 heads / 2 KV heads,
MLP 4864; 358M parameters) with random weights over the character tokenizer of ``gvm_trl.testing`` (vocabulary
100, so the embeddings are small): the cost of a 0.5B-class step with no download.

Results: ``benchmarks/results/step_cost_<tag>.json`` and ``.png`` (tag: cpu, cuda, tiny or quick; with the number
of completions per step appended when it is not the preset's).
"""

from __future__ import annotations

from common import (  # noqa: I001  (common sets the environment before torch is imported)
    RESULTS_DIR,
    limit_threads,
    load_policy,
    reward_function,
    trainer_arguments,
)

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from gvm_trl.metrics import STAGES as GVM_PHASES

CONFIGS = ("grpo", "gvm-grpo", "uniform", "gvm-sequential", "gvm-raft")
# Each GVM configuration is a method of `gvm_trl.methods.METHODS`, with the settings that pick its schedule.
CONFIG_METHODS = {
    "gvm-grpo": ("gvm-grpo", {"gvm_probe_ahead": True}),
    "uniform": ("grpo", {}),
    "gvm-sequential": ("gvm-grpo", {"gvm_probe_ahead": False}),
    "gvm-raft": ("gvm-raft", {"gvm_probe_ahead": True}),
}
DEFAULT_CONFIGS = CONFIGS
PHASE_LABELS = {
    "generation": "generation (one round)",
    "probe": "probe round",
    "grad_norms": "per-sample gradient pass",
    "allocate": "allocation",
    "phase2": "generation round (allocated + riding probes)",
    "probe_logps": "riding probes' old log-probs (apart from the gradient pass)",
    "bookkeeping": "rollout bookkeeping",
    "update": "update",
    "step": "step total",
}
DEVICE_PRESETS = {
    "cpu": dict(batch_size=8, num_generations=4, num_probes=2, max_completion_length=24, steps=7, warmup=1),
    "cuda": dict(batch_size=64, num_generations=8, num_probes=4, max_completion_length=256, steps=7, warmup=1),
    "quick": dict(batch_size=8, num_generations=4, num_probes=2, max_completion_length=8, steps=3, warmup=1),
}


def device_sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class RSSMonitor:
    """Peak resident set size of this process, sampled every `interval` seconds in a background thread."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._process, self._interval = psutil.Process(), interval
        self._stop = threading.Event()
        self.start_bytes = self.peak_bytes = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# -- timing ---------------------------------------------------------------------------------------------------------


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step from its release, with the step's GVM phase times and rollout time.

    In lockstep mode (`gate` is a readable stream) each step waits for a line from the coordinator before it
    starts, and reports its numbers as one JSON line on `report` when it ends."""

    def __init__(self, device: str, gate=None, report=None):
        self.device, self.steps, self._start = device, [], None
        self.gate, self.report = gate, report
        self.trainer = None  # set after the trainer exists
        self.rollout_seconds = 0.0  # accumulated by the timed trainers' rollout method

    def _totals(self) -> dict:
        return dict(getattr(self.trainer, "rollout_totals", {}))

    def on_step_begin(self, args, state, control, **kwargs):
        if self.gate is not None:
            self.gate.readline()  # the coordinator's turn for this worker
        device_sync(self.device)
        self._start, self._seen = time.perf_counter(), self._totals()

    def on_step_end(self, args, state, control, **kwargs):
        device_sync(self.device)
        now, totals = time.perf_counter(), self._totals()
        step = {"step": now - self._start, "rollout": self.rollout_seconds}
        for key in (*(f"time_{p}" for p in GVM_PHASES), "probe_completions", "budget_completions"):
            step[key] = totals.get(key, 0.0) - self._seen.get(key, 0.0)
        self.steps.append(step)
        self.rollout_seconds = 0.0
        if self.report is not None:
            self.report.write(json.dumps({"step": len(self.steps)}) + "\n")
            self.report.flush()


def timed_trainer_class(base: type, method: str):
    """A subclass of `base` whose `method` (the whole rollout of one generation batch) adds its wall time to the step
    timer; the GVM stages inside it are timed by the package's own stage timer (`trainer.rollout_totals`)."""

    def timed(self, *args, **kwargs):
        device_sync(self.args.device.type)
        start = time.perf_counter()
        result = getattr(base, method)(self, *args, **kwargs)
        device_sync(self.args.device.type)
        self.step_timer.rollout_seconds += time.perf_counter() - start
        return result

    return type(f"Timed{base.__name__}", (base,), {method: timed})


def phase_breakdown(step: dict, config: str) -> dict:
    """One step's seconds per phase (GVM phases from `rollout_totals`, the rest from the timers).

    The generation round's time includes the riding probes' log-probability pass, reported apart."""
    if config in ("grpo", "uniform"):
        phases = {"generation": step["rollout"]}
    else:
        phases = {p: step[f"time_{p}"] for p in GVM_PHASES}
        phases["phase2"] -= phases["probe_logps"]
        phases["bookkeeping"] = step["rollout"] - sum(phases.values())
    phases["update"] = step["step"] - step["rollout"]
    phases["step"] = step["step"]
    return phases


# -- one configuration ----------------------------------------------------------------------------------------------


def build_trainer(config: str, args, output_dir: str, timer: StepTimer):
    from trl import GRPOConfig, GRPOTrainer

    from gvm_trl.data import make_arithmetic_dataset
    from gvm_trl.methods import METHODS

    model, tokenizer = load_policy(args.model, args.tiny, args.device, seed=args.seed)
    options = trainer_arguments(
        args.device, output_dir, args.seed,
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
    )
    if config == "grpo":
        trainer_cls, config_args, method = GRPOTrainer, GRPOConfig(**options), "_generate_and_score_completions"
    else:
        name, settings = CONFIG_METHODS[config]
        options.update(settings, gvm_num_probes=args.num_probes,
                       gvm_budget_per_prompt=args.num_generations - args.num_probes)
        trainer_cls, config_args = METHODS[name].trainer_cls, METHODS[name].config(**options)
        method = "build_generation_batch"
    prompts = args.batch_size // args.num_generations * (args.steps + 1)
    trainer = timed_trainer_class(trainer_cls, method)(
        model=model,
        reward_funcs=reward_function(args.reward),
        args=config_args,
        train_dataset=make_arithmetic_dataset(prompts, seed=args.seed),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.step_timer, timer.trainer = timer, trainer
    trainer.remove_callback(PrinterCallback)  # keep the output to the table
    return trainer


def logged(trainer, key: str) -> list[float]:
    """Every value of `key` in the trainer's log history (one per step with logging_steps=1)."""
    return [log[key] for log in trainer.state.log_history if key in log]


def run_config(config: str, args, gate=None, report=None) -> dict:
    """Train `config` for `args.steps` steps; per-step phase seconds, completions and memory."""
    limit_threads(args.device, threads=2)
    timer = StepTimer(args.device, gate, report)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(config, args, output_dir, timer)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if report is not None:
            report.write(json.dumps({"ready": config}) + "\n")
            report.flush()
        with RSSMonitor() as rss:
            trainer.train()
    steps = [phase_breakdown(step, config) for step in timer.steps]
    completions = [
        int(s.get("probe_completions", 0) + s.get("budget_completions", 0)) or args.batch_size for s in timer.steps
    ]
    memory = {
        "cpu_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "cpu_train_rss_increase_mib": (rss.peak_bytes - rss.start_bytes) / 2**20,
    }
    if args.device == "cuda":
        memory["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return {
        "config": config,
        "steps": steps,
        "completions_per_step": completions,
        "mean_completion_length": statistics.fmean(logged(trainer, "completions/mean_length") or [float("nan")]),
        "reward_mean": logged(trainer, "reward"),
        "probe_accept_rate": logged(trainer, "gvm/accept_rate"),
        "trl_step_time": logged(trainer, "step_time"),  # TRL's own per-step timer, for cross-checking
        "memory": memory,
    }


def run_lockstep(configs: list[str], argv: list[str], steps: int) -> dict[str, dict]:
    """Every configuration in its own worker process, one optimizer step at a time, round-robin in a rotating order
    (so each configuration runs first, last and in between equally often)."""
    workers = {}
    for config in configs:
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", config]
        workers[config] = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    results = {}
    try:
        for config, worker in workers.items():
            _await(worker, "ready")
        for step in range(steps):
            order = configs[step % len(configs) :] + configs[: step % len(configs)]
            for config in order:
                workers[config].stdin.write("go\n")
                workers[config].stdin.flush()
                _await(workers[config], "step")
            print(f"[step_cost] step {step + 1}/{steps} done", flush=True)
        for config, worker in workers.items():
            results[config] = _await(worker, "result")["result"]
            worker.wait(timeout=600)
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                worker.kill()
    return results


def _await(worker: subprocess.Popen, key: str) -> dict:
    """The next JSON line from `worker` that carries `key` (other output is passed through)."""
    for line in worker.stdout:
        if line.startswith("{"):
            message = json.loads(line)
            if key in message:
                return message
        else:
            print(line, end="")
    raise RuntimeError(f"a step_cost worker exited (code {worker.wait()}) before sending {key!r}")


# -- summary, table, plot ---------------------------------------------------------------------------------------------


def summarize(result: dict, warmup: int) -> dict:
    """Median seconds per phase over the steady-state steps: after the warm-up, before the last."""
    timed = result["steps"][warmup:-1] or result["steps"][-1:]
    phases = list(timed[0])
    return {phase: statistics.median(step[phase] for step in timed) for phase in phases}


def generation_total(summary: dict) -> float:
    """All generation-side seconds of a step: one round, or GVM's rounds, log-probs and rollout bookkeeping."""
    if "generation" in summary:
        return summary["generation"]
    return summary["probe"] + summary["phase2"] + summary["probe_logps"] + summary["bookkeeping"]


def overhead(config: dict, plain: dict) -> dict:
    """A configuration's extra cost over the plain step, as fractions of the plain step."""
    parts = {"generation": generation_total(config) - plain["generation"], "update": config["update"] - plain["update"]}
    for name in ("grad_norms", "allocate"):
        if name in config:
            parts[name] = config[name]
    return {
        "ratio_step": config["step"] / plain["step"],
        "overhead_fraction": (config["step"] - plain["step"]) / plain["step"],
        "overhead_parts_fraction": {name: value / plain["step"] for name, value in parts.items()},
        "update_ratio": config["update"] / plain["update"],
    }


def format_table(summaries: dict[str, dict], results: dict[str, dict], baselines: dict[str, str]) -> str:
    """Seconds per phase (median step) for each configuration, with ratios to the plain-GRPO run measured beside it
    where they compare."""
    plain = [n for n in summaries if n.startswith("grpo")]
    names = [n for n in summaries if n not in plain]
    rows = [["phase (s/step, median)", *plain, *names, *(f"{n}/{baselines.get(n, 'grpo')}" for n in names)]]
    totals = {n: {**s, "generation_total": generation_total(s)} for n, s in summaries.items()}
    labels = {**PHASE_LABELS, "generation_total": "all generation"}
    order = ["generation", *GVM_PHASES, "bookkeeping", "generation_total", "update", "step"]
    order = [phase for phase in order if any(phase in totals[n] for n in totals)]
    for phase in order:
        cells = [f"{totals[n][phase]:.2f}" if phase in totals[n] else "-" for n in [*plain, *names]]
        comparable = phase in ("generation_total", "update", "step")
        ratios = [
            f"{totals[n][phase] / totals[baselines.get(n, 'grpo')][phase]:.2f}" if comparable else "" for n in names
        ]
        rows.append([labels[phase], *cells, *ratios])
    everyone = [*plain, *names]
    rows.append(["completions / step", *(str(results[n]["completions_per_step"][-2]) for n in everyone)])
    lengths = [results[n]["mean_completion_length"] for n in everyone]
    rows.append(["mean completion length", *("-" if x is None else f"{x:.1f}" for x in lengths)])
    rewards = [results[n]["reward_mean"] for n in everyone]
    rows.append(["mean reward (accept rate)", *(f"{statistics.fmean(x):.2f}" if x else "-" for x in rewards)])
    for key in results["grpo"]["memory"]:
        rows.append([f"{key}", *(f"{results[n]['memory'][key]:.0f}" for n in everyone)])
    width = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, width)))
        for row in rows
    )


def plot(summaries: dict[str, dict], path: Path, title: str, baselines: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [p for p in PHASE_LABELS if p != "step"]
    colors = dict(zip(phases, plt.get_cmap("tab10").colors))
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for x, (name, summary) in enumerate(summaries.items()):
        bottom = 0.0
        for phase in phases:
            value = max(summary.get(phase, 0.0), 0.0)
            if value:
                axes.bar(x, value, bottom=bottom, color=colors[phase], label=PHASE_LABELS[phase], width=0.6)
                bottom += value
        ratio = summary["step"] / summaries[baselines.get(name, name if name.startswith("grpo") else "grpo")]["step"]
        axes.text(x, bottom, f"{summary['step']:.1f} s\n×{ratio:.2f}", ha="center", va="bottom", fontsize=9)
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left")
    axes.set_xticks(range(len(summaries)), list(summaries))
    axes.set_ylabel("seconds per step (median)")
    axes.set_ylim(top=axes.get_ylim()[1] * 1.15)
    axes.set_title(textwrap.fill(title, 80), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- command line ---------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="path, Hub id or the embedded demo model")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama + parity reward (no real model)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, 2 steps, in-process")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, help="m·G: completions per generation batch (plain GRPO)")
    parser.add_argument("--num-generations", type=int, help="G of plain GRPO")
    parser.add_argument("--num-probes", type=int, help="N′ of the GVM configurations (their budget per prompt is G − N′)")
    parser.add_argument("--max-completion-length", type=int)
    parser.add_argument("--steps", type=int, help="optimizer steps per configuration, warm-up and last included")
    parser.add_argument("--warmup", type=int, help="steps discarded before the median")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--reward", choices=("parity", "math"), default="parity",
                        help="parity (default): accepts ~half of all completions, so every GVM phase runs at a "
                             "mid-range accept rate; math: the real verifier (SmolLM2 solves ~20%% at T=1, and a step "
                             "whose probes are all rejected skips phase 2 and the update)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, help=f"default: {' '.join(DEFAULT_CONFIGS)}")
    parser.add_argument("--max-workers", type=int, default=3,
                        help="models in memory at once in lockstep (each configuration group runs beside its own "
                        "plain-GRPO run); SmolLM2 with Adam holds ~6 GB per worker on CPU")
    parser.add_argument("--in-process", action="store_true",
                        help="run the configurations one after the other in this process (not in lockstep)")
    parser.add_argument("--output", type=Path, help="JSON path (the PNG goes next to it)")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.tiny = args.in_process = True
    preset = DEVICE_PRESETS["quick" if args.quick else args.device]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch_size % args.num_generations:
        parser.error("--batch-size must be a multiple of --num-generations")
    if not 1 <= args.num_probes < args.num_generations:
        parser.error("--num-probes must lie in [1, G): the GVM configurations' budget per prompt is G − N′")
    if args.warmup + 1 >= args.steps:
        parser.error("--steps must exceed --warmup + 1 (the warm-up and the last step are not timed)")
    args.configs = args.configs or list(DEFAULT_CONFIGS)
    if "grpo" not in args.configs:
        parser.error("--configs must include grpo, the baseline every ratio refers to")
    args.tag = "quick" if args.quick else "tiny" if args.tiny else args.device
    if not args.quick and args.batch_size != preset["batch_size"]:
        args.tag += f"_{args.batch_size}"
    return args


def environment(args) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    info["machine"] = platform.processor() or platform.machine()
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    info["load_average"] = os.getloadavg()
    return info


def build_report(results: dict, args, started: float, baselines: dict[str, str] | None = None) -> dict:
    """Summaries, comparisons to plain GRPO and the raw per-step numbers of the configurations that finished.

    `baselines` names, per configuration, the plain-GRPO run it was measured beside (default: "grpo")."""
    done = {c: r for c, r in results.items() if "error" not in r}
    summaries = {c: summarize(r, args.warmup) for c, r in done.items()}
    baselines = baselines or {}
    comparisons = {
        c: overhead(s, summaries[baselines.get(c, "grpo")])
        for c, s in summaries.items()
        if not c.startswith("grpo") and baselines.get(c, "grpo") in summaries
    }
    m = args.batch_size // args.num_generations
    setup = (f"{'tiny random model' if args.tiny else args.model} on {args.device}, m = {m} prompts, G = "
             f"{args.num_generations}, N′ = {args.num_probes}, ≤ {args.max_completion_length} tokens")
    return {
        "setup": setup,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(args),
        "memory_notes": "cpu_peak_rss_mib: ru_maxrss of the worker process (model load included; cumulative if "
                        "--in-process); cpu_train_rss_increase_mib: psutil peak RSS during train() above the RSS "
                        "before it; cuda_max_allocated_mib: torch.cuda.max_memory_allocated during training",
        "summary_seconds_per_step": summaries,
        "baselines": {c: baselines.get(c, "grpo") for c in comparisons},
        "comparison_to_grpo": comparisons,
        "failed": {c: r["error"] for c, r in results.items() if "error" in r},
        "runs": done,
        "wall_time_s": time.perf_counter() - started,
    }


def print_report(report: dict) -> None:
    summaries, comparisons = report["summary_seconds_per_step"], report["comparison_to_grpo"]
    print(f"\n== step cost: {report['setup']} ==")
    if "grpo" in summaries:
        print(format_table(summaries, report["runs"], report["baselines"]))
    for config, comparison in comparisons.items():
        parts = ", ".join(f"{k} {100 * v:+.1f}%" for k, v in comparison["overhead_parts_fraction"].items())
        print(f"{config}: step ×{comparison['ratio_step']:.3f} of plain GRPO ({report['baselines'][config]}) "
              f"(overhead {100 * comparison['overhead_fraction']:+.1f}%: {parts})")
    for config, reason in report["failed"].items():
        print(f"{config}: not measured ({reason})")


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:  # one configuration, stepping when the coordinator says so
        result = run_config(args.worker, args, gate=sys.stdin, report=sys.stdout)
        print(json.dumps({"result": result}), flush=True)
        return {}
    limit_threads(args.device, threads=2)
    output = args.output or RESULTS_DIR / f"step_cost_{args.tag}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"[step_cost] {', '.join(args.configs)}: {args.steps} steps each, "
          f"{'one after the other' if args.in_process else 'in lockstep'} ...", flush=True)
    baselines = {}
    if args.in_process:
        results = {config: run_config(config, args) for config in args.configs}
    else:
        # At most --max-workers models in memory at once: the others run in later groups, each beside a plain-GRPO
        # run of its own, which its ratios refer to (the first group's is "grpo", the next "grpo-2", ...).
        others = [c for c in args.configs if c != "grpo"]
        per_group = max(args.max_workers - 1, 1)
        results = {}
        for number, start in enumerate(range(0, len(others), per_group), start=1):
            group = others[start : start + per_group]
            baseline = "grpo" if number == 1 else f"grpo-{number}"
            measured = run_lockstep(["grpo", *group], argv, args.steps)
            results[baseline] = measured.pop("grpo")
            results.update(measured)
            baselines.update({config: baseline for config in group})
    report = build_report(results, args, started, baselines)
    output.write_text(json.dumps(report, indent=2))
    print_report(report)
    plot(report["summary_seconds_per_step"], output.with_suffix(".png"), f"Seconds per step: {report['setup']}",
         report["baselines"])
    print(f"wrote {output} and {output.with_suffix('.png')} ({report['wall_time_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
