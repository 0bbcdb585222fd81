"""Sample efficiency: the training objective and held-out accuracy against completions generated, GVM vs uniform.

What is measured
----------------
Methods from `gvm_trl.methods.METHODS` (default: gvm-raft, raft, gvm-grpo, grpo) train the same warm-started policy
on the same prompts, one run per method and seed, with the same rollout budget per generation batch of m prompts:
m·(N′ + B) completions (``--num-probes N′``, ``--budget-per-prompt B``). The x axis is what the trainer reports
generating (`trainer.rollout_totals`, probes included). A variant of a method is one more run with extra config
fields: ``--variant LABEL=BASE:field=value[,field=value]``, e.g. ``--variant gvm-raft-mean=gvm-raft:gvm_weighting=mean``
(any field of the installed trainer's config; a field it lacks is refused before anything trains).

Tasks (``--task``):

- ``facts`` (default; `facts.py`): 48 independent facts warm-started at accept rates from never (6 facts) through
  0.02 to 0.98, two-token completions (a rationale, then the answer). The metric is the EM objective of Theorem 4,
  L(θ) = −(1/m) Σ_i ln P(z_i | x_i, θ) over the training prompts, computed exactly by enumerating completions, and
  the held-out accuracy (also exact) on the same facts asked in a phrasing RL never sees.
- ``facts-many``: the few-revisit regime of issue 17, 1,024 facts (``--train-prompts``) with two-character keys:
  the first character fixes answer and rationale, the last the starting level (same levels as ``facts``), so facts
  share parameters and p_i drifts between a prompt's visits. 16 prompts a step visit each prompt once per 64 steps:
  the default 128 steps visit each twice (``--max-steps 64``/``192``: once/three times). Measured on this CPU (seed
  0): warm start 140 CPU s per seed (shared by the runs of one process), GVM-GRPO 0.14 CPU s a step, one evaluation
  (both phrasings, 1,024 facts) 18 CPU s, so evaluations dominate an arm: ``--eval-every`` sets the cost. The
  sharing is strong: in 32 GVM-GRPO steps (seed 0) the 448 solvable prompts not yet visited rose from their start by
  a median factor 2.6 in p, the 437 visited ones by 2.9.
- ``facts-many-independent``: the same 1,024 two-character keys, each fact's answer, rationale and level drawn on
  its own (no factorisation): few revisits without a systematic drift between them.
- ``letters`` (`letters.py`, also ``--tiny``): copy a letter of the prompt; held-out reward by sampling. Learning
  there is one shared jump whose timing varies by seed.
- ``arithmetic``: SmolLM2-135M-Instruct (LoRA on CPU) on arithmetic prompts, held-out accuracy by sampling; a CPU
  step costs about a minute, so on CPU this only shows the mechanics.

Each curve point also records the training's cost so far, evaluations left out: ``train_seconds`` (wall) and
``train_cpu_seconds`` (process CPU time, which a shared machine's load distorts least); every comparison reports,
per target at ``--target-fractions`` (25/50/75/90 % of the way), the ratio of what each method spends to reach it on
all three axes.

Report, per probing run (GVM, or a history-only peer: dynamic sampling, Knapsack RL) against its fair baseline — the
uniform method of its trainer with the same weighting (`raft-mean`/`grpo-mean` for the default 1/|D_i|), else the
unweighted one (`raft`/`grpo`), named in the report: the target is the start
plus ``--target-fraction`` (0.75) of the improvement the uniform method's seed-mean curve makes by its last
evaluation; the completions each seed-mean curve needs to first reach it (linear interpolation between evaluations),
and their ratio GVM / uniform (< 1: GVM needs fewer); the area under the curve as the mean improvement over the
start across the completions both runs reach; each with a 95 % bootstrap interval over seeds, resampled in pairs
(runs of one seed share the data order and the initial weights). The facts task also reports, per starting band of
accept rate, the share of completions each method spent there and the final P(z | x).

    python benchmarks/convergence.py --quick                          # smoke test, facts task, ~20 s
    bash benchmarks/fair_evidence.sh        # issue 17's whole report (--factorial, --levers, few revisits), --resume
    python benchmarks/convergence.py --seeds $(seq 0 7) --methods gvm-raft raft gvm-grpo grpo \
        --variant gvm-raft-no-history=gvm-raft:gvm_history_decay=0.0 \
        --variant gvm-grpo-no-history=gvm-grpo:gvm_history_decay=0.0 \
        --variant gvm-raft-no-history-sequential=gvm-raft:gvm_history_decay=0.0,gvm_probe_ahead=False \
        --variant gvm-grpo-no-history-sequential=gvm-grpo:gvm_history_decay=0.0,gvm_probe_ahead=False \
        --variant gvm-grpo-lemma1=gvm-grpo:gvm_weighting=lemma1 \
        --variant gvm-grpo-history-0.9=gvm-grpo:gvm_history_decay=0.9 \
        --variant gvm-grpo-history-0.5=gvm-grpo:gvm_history_decay=0.5 \
        --against gvm-raft-no-history=gvm-raft-no-history-sequential \
        --against gvm-grpo-no-history=gvm-grpo-no-history-sequential \
        --against gvm-grpo-no-history=gvm-grpo-lemma1 \
        --against gvm-raft=gvm-raft-no-history --against gvm-grpo=gvm-grpo-no-history
                 # results/convergence_facts.*: 11 runs x 8 seeds, ~30 min on two cores (two processes of four
                 # seeds each, each with its own --output, then joined with --merge)
    python benchmarks/convergence.py --seeds $(seq 0 7) --lowest-rate 0.1 --methods gvm-raft raft gvm-grpo grpo \
        --variant gvm-raft-mean=gvm-raft:gvm_weighting=mean --variant gvm-grpo-mean=gvm-grpo:gvm_weighting=mean \
        --output benchmarks/results/convergence_facts_from0.1.json          # no fact starts below p = 0.1
    python benchmarks/convergence.py --task letters --seeds $(seq 0 7)   # results/convergence_tiny.*
    python benchmarks/convergence.py --task arithmetic --device cuda --seeds 0 1 2 --max-steps 200 \
        --prompts-per-step 32 --num-probes 8 --budget-per-prompt 8 --max-completion-length 256 --heldout 256

The JSON is rewritten after every finished run, so an interrupted run keeps its finished curves; ``--resume`` adds the
missing (method, seed) runs to it, refusing a file written with other settings.
"""

from __future__ import annotations

from common import (  # noqa: I001  (common sets the environment before torch is imported)
    RESULTS_DIR,
    MethodRun,
    completions_generated,
    format_interval,
    limit_threads,
    load_policy,
    method_runs,
    paired_bootstrap,
    paired_bootstrap_many,
    pyplot,
    reward_function,
    save_figure,
    trainer_arguments,
    uniform_baseline,
    write_json,
)

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

import facts
import letters

HELDOUT_SEED = 10_000
DEFAULT_METHODS = ["gvm-raft", "raft-mean", "raft", "gvm-grpo", "grpo-mean", "grpo"]
# Issue 17's factorial: {uniform, GVM without history, GVM with history} x {none, 1/|D_i|} for both trainers, and
# issue 27's Reinforce-Ada (unweighted, its published loss), against the unweighted uniform baseline.
FACTORIAL = (
    ["gvm-grpo", "gvm-grpo-unweighted", "grpo-mean", "grpo", "gvm-raft", "gvm-raft-unweighted", "raft-mean", "raft",
     "reinforce-ada-grpo", "reinforce-ada-raft"],
    ["gvm-grpo-no-history=gvm-grpo:gvm_history_decay=0.0",
     "gvm-grpo-unweighted-no-history=gvm-grpo-unweighted:gvm_history_decay=0.0",
     "gvm-raft-no-history=gvm-raft:gvm_history_decay=0.0",
     "gvm-raft-unweighted-no-history=gvm-raft-unweighted:gvm_history_decay=0.0"],
)
# Issue 17's levers, each one change to the default GVM-GRPO, against the fair baseline.
LEVERS = (
    ["gvm-grpo", "grpo-mean"],
    ["gvm-grpo-constant-g=gvm-grpo:gvm_grad_norms=constant",
     "gvm-grpo-floor=gvm-grpo:gvm_rate_floor_quantile=0.5",
     "gvm-grpo-alpha1e-5=gvm-grpo:gvm_alpha=1e-05",
     "gvm-grpo-probes2=gvm-grpo:gvm_num_probes=2,gvm_budget_per_prompt=6"],
)
FACT_BANDS = {"never": (0.0, 0.0), "rare (< 0.1)": (1e-9, 0.1), "middle (0.1-0.5)": (0.1, 0.5),
              "easy (≥ 0.5)": (0.5, 1.0)}


# The regime report's bands (issue 27): the easy band split where the nearly-solved facts (--solved-share) start.
REGIME_BANDS = {"never": (0.0, 0.0), "rare (< 0.1)": (1e-9, 0.1), "middle (0.1-0.5)": (0.1, 0.5),
                "easy (0.5-0.95)": (0.5, 0.95), "nearly solved (≥ 0.95)": (0.95, 1.0)}


def fact_band(start_rate: float, bands: dict = FACT_BANDS) -> str:
    """The band of a fact's starting accept rate: [low, high), except that "never" is exactly 0 and the last band
    ends at 1 inclusive."""
    return next(name for name, (low, high) in bands.items()
                if start_rate == low == high or low <= start_rate < high or start_rate == high == 1.0)


# -- tasks ------------------------------------------------------------------------------------------------------------


class FactsTask:
    """The facts task (facts.py): exact EM objective on the training prompts, exact held-out accuracy.

    Each seed draws its own facts (keys, digits, rationales, which level goes to which fact) and warm start, shared
    by every method run with that seed, unless --data-seed fixes one set for all seeds.
    """

    name = "facts"
    last_logits_only = False  # the evaluation's full forward, as when results/convergence_facts.* were measured
    metrics = {"objective": -1, "heldout_accuracy": +1, "train_accuracy": +1}  # +1: higher is better
    primary = "objective"
    labels = {"objective": "EM objective L(θ), solvable facts (exact)",
              "heldout_accuracy": "held-out phrasing accuracy (exact)", "train_accuracy": "training accuracy (exact)"}
    preset = dict(prompts_per_step=16, num_probes=4, budget_per_prompt=4, max_completion_length=2, max_steps=200,
                  eval_every=10, learning_rate=1e-4, train_prompts=48, warm_start_steps=800, lora=False)
    quick = dict(prompts_per_step=4, num_probes=2, budget_per_prompt=2, max_steps=2, eval_every=1, train_prompts=12,
                 warm_start_steps=100)

    def __init__(self, args):
        self.args = args

    def facts_for(self, seed: int) -> list:
        data_seed = seed if self.args.data_seed is None else self.args.data_seed
        return facts.make_facts(self.args.train_prompts, seed=data_seed, never_share=self.args.never_share,
                                low=self.args.lowest_rate, high=self.args.highest_rate,
                                solved_share=self.args.solved_share)

    def policy(self, seed):
        return facts.warm_started_policy(self.facts_for(seed), steps=self.args.warm_start_steps, seed=seed)

    def dataset(self, seed):
        return facts.facts_dataset(self.facts_for(seed))

    reward = staticmethod(facts.fact_reward)

    def evaluator(self, tokenizer, seed):
        task_facts = self.facts_for(seed)
        # ln P(z | x) of a never-solved fact is −∞ in principle (held near −12 here): it stays out of L
        solvable = torch.tensor([f.start_rate > 0 for f in task_facts])

        def evaluate(model) -> dict:
            fast = {"last_logits_only": True} if self.last_logits_only else {}
            train = facts.accept_probabilities(model, tokenizer, task_facts, **fast)
            heldout = facts.accept_probabilities(model, tokenizer, task_facts, facts.HELDOUT_PHRASING, **fast)
            return {"objective": facts.em_objective(train[solvable]), "train_accuracy": float(train.mean()),
                    "heldout_accuracy": float(heldout.mean()), "rates": [round(float(p), 6) for p in train]}

        return evaluate

    def prompt_bands(self, seed) -> list[str]:
        return [fact_band(f.start_rate) for f in self.facts_for(seed)]

    def setup(self) -> str:
        never = round(self.args.never_share * self.args.train_prompts)
        solved = round(self.args.solved_share * self.args.train_prompts)
        nearly = (f", {solved} nearly solved ({facts.SOLVED_LOW:g}-{facts.SOLVED_HIGH:g})" if solved else "")
        return (f"facts task: {self.args.train_prompts} facts, {never} never solved{nearly}, the others warm-started "
                f"log-uniformly at {self.args.lowest_rate:g}-{self.args.highest_rate:g}, tiny Llama (hidden 64)")


class LettersTask:
    """The letter task (letters.py): held-out reward by sampling."""

    name = "letters"
    metrics = {"reward": +1}
    primary = "reward"
    labels = {"reward": "held-out reward"}
    preset = dict(prompts_per_step=8, num_probes=4, budget_per_prompt=4, max_completion_length=2, max_steps=800,
                  eval_every=50, heldout=128, eval_samples=4, learning_rate=2e-3, train_prompts=4096,
                  warm_start_steps=300, lora=False)
    quick = dict(prompts_per_step=2, num_probes=2, budget_per_prompt=2, max_steps=2, eval_every=1, heldout=4,
                 eval_samples=2, train_prompts=8, warm_start_steps=5)

    def __init__(self, args):
        self.args = args

    def policy(self, seed):
        return letters.warm_started_policy(steps=self.args.warm_start_steps)

    def dataset(self, seed):
        return letters.letters_dataset(self.args.train_prompts, self.args.data_seed or 0)

    reward = staticmethod(letters.letter_reward)

    def evaluator(self, tokenizer, seed):
        from gvm_trl.evaluation import generate_completions

        args = self.args
        sets = letters.letter_sets(args.heldout, seed=HELDOUT_SEED)
        prompts = [tokenizer.apply_chat_template(letters.conversation(x), add_generation_prompt=True, tokenize=False)
                   for x in sets]

        def evaluate(model) -> dict:
            with torch.random.fork_rng():  # one sampling seed for every evaluation: common random numbers
                torch.manual_seed(args.eval_seed)
                texts = generate_completions(model, tokenizer, prompts, num_samples=args.eval_samples,
                                             temperature=1.0, max_new_tokens=args.max_completion_length,
                                             batch_size=48)  # as when results/convergence_tiny.* were measured
            rewards = [r for x, samples in zip(sets, texts) for r in letters.letter_reward([x] * len(samples), samples)]
            return {"reward": statistics.fmean(rewards)}

        return evaluate

    def prompt_bands(self, seed):
        return None

    def setup(self) -> str:
        return "letter task, tiny Llama (hidden 64)"


class ArithmeticTask:
    """SmolLM2 (or --model) on arithmetic prompts: held-out accuracy by sampling with the math verifier."""

    name = "arithmetic"
    metrics = {"accuracy": +1}
    primary = "accuracy"
    labels = {"accuracy": "held-out accuracy"}
    preset = dict(prompts_per_step=4, num_probes=4, budget_per_prompt=4, max_completion_length=24, max_steps=12,
                  eval_every=3, heldout=24, eval_samples=2, learning_rate=1e-4, train_prompts=256, lora=True)

    def __init__(self, args):
        self.args = args

    def policy(self, seed):
        return load_policy(self.args.model, False, self.args.device)

    def dataset(self, seed):
        from gvm_trl.data import make_arithmetic_dataset

        return make_arithmetic_dataset(self.args.train_prompts, seed=self.args.data_seed or 0)

    reward = staticmethod(reward_function("math"))

    def evaluator(self, tokenizer, seed):
        from gvm_trl.data import make_arithmetic_dataset
        from gvm_trl.evaluation import dataset_accuracy

        args = self.args
        heldout = make_arithmetic_dataset(args.heldout, seed=HELDOUT_SEED)
        return lambda model: {"accuracy": dataset_accuracy(
            model, tokenizer, heldout, seed=args.eval_seed, num_samples=args.eval_samples, temperature=1.0,
            max_new_tokens=args.max_completion_length, batch_size=48)}

    def prompt_bands(self, seed):
        return None

    def setup(self) -> str:
        return f"arithmetic task, {self.args.model} ({'LoRA' if self.args.lora else 'full fine-tune'})"


class FactsManyTask(FactsTask):
    """The few-revisit regime (issue 17): 1,024 facts with two-character keys, so that a run of a few hundred steps
    visits each prompt only a few times (each epoch visits every prompt once: prompts-per-step × steps / facts
    visits), as real RL-for-math runs visit MATH's 7.5k prompts. The facts are factorised (`facts.make_facts` with
    ``families``): the key's first character fixes the answer and right rationale, its last the starting level, so
    what RL teaches one fact moves every fact sharing a character with it and p_i drifts between a prompt's visits.
    The objective L and the accuracies stay exact (over all 1,024 facts)."""

    name = "facts-many"
    last_logits_only = True
    warm_start_batch = 128
    preset = {**FactsTask.preset, "train_prompts": 1024, "max_steps": 128, "eval_every": 16, "warm_start_steps": 1500}
    quick = {**FactsTask.quick, "train_prompts": 64, "warm_start_steps": 20}

    def facts_for(self, seed: int) -> list:
        data_seed = seed if self.args.data_seed is None else self.args.data_seed
        return facts.make_facts(self.args.train_prompts, seed=data_seed, never_share=self.args.never_share,
                                low=self.args.lowest_rate, high=self.args.highest_rate, key_length=2, families=True,
                                solved_share=self.args.solved_share)

    def policy(self, seed):
        return facts.warm_started_policy(self.facts_for(seed), steps=self.args.warm_start_steps, seed=seed,
                                         batch_size=self.warm_start_batch)

    def setup(self) -> str:
        visits = self.args.prompts_per_step * self.args.max_steps / self.args.train_prompts
        never = round(self.args.never_share * len(facts.KEYS))
        return (f"facts-many task: {self.args.train_prompts} facts with two-character keys, the first fixing answer "
                f"and rationale, the last the starting level ({never} of {len(facts.KEYS)} characters never solved, "
                f"the others log-uniform at {self.args.lowest_rate:g}-{self.args.highest_rate:g}), tiny Llama "
                f"(hidden 64); {visits:.2g} visits per prompt")


class FactsManyIndependentTask(FactsManyTask):
    """The few-revisit regime without the factorisation: the same 1,024 two-character keys, but each fact's answer,
    right rationale and starting level drawn on its own (`facts.make_facts` without ``families``), so nothing RL
    teaches one fact carries a systematic drift to another (they still share the key characters' embeddings and the
    rest of the network)."""

    name = "facts-many-independent"

    def facts_for(self, seed: int) -> list:
        data_seed = seed if self.args.data_seed is None else self.args.data_seed
        return facts.make_facts(self.args.train_prompts, seed=data_seed, never_share=self.args.never_share,
                                low=self.args.lowest_rate, high=self.args.highest_rate, key_length=2,
                                solved_share=self.args.solved_share)

    def setup(self) -> str:
        visits = self.args.prompts_per_step * self.args.max_steps / self.args.train_prompts
        return (f"facts-many-independent task: {self.args.train_prompts} facts with two-character keys, each fact's "
                f"answer, rationale and level drawn on its own ({self.args.never_share:g} never solved, the others "
                f"log-uniform at {self.args.lowest_rate:g}-{self.args.highest_rate:g}), tiny Llama (hidden 64); "
                f"{visits:.2g} visits per prompt")


TASKS = {task.name: task for task in (FactsTask, FactsManyTask, FactsManyIndependentTask, LettersTask, ArithmeticTask)}


# -- one run ----------------------------------------------------------------------------------------------------------


class CurveRecorder(TrainerCallback):
    """The task's metrics before training and every `every` steps (and after the last), with completions so far."""

    def __init__(self, every: int, evaluate, start_cache: dict):
        self.every, self.evaluate, self.start_cache = every, evaluate, start_cache
        self.trainer, self.curve = None, []
        self.cost = {"train_seconds": 0.0, "train_cpu_seconds": 0.0}  # training so far, evaluations left out
        self._clocks = None

    @staticmethod
    def _now() -> dict:
        return {"train_seconds": time.perf_counter(), "train_cpu_seconds": time.process_time()}

    def _record(self, step: int) -> None:
        if self._clocks is not None:  # the training since the last evaluation
            now = self._now()
            for key in self.cost:
                self.cost[key] += now[key] - self._clocks[key]
        if step == 0 and self.start_cache:  # every run of one seed starts from the same weights
            metrics = dict(self.start_cache)
        else:
            metrics = self.evaluate(self.trainer.model)
        if step == 0:
            self.start_cache.update(metrics)
        completions = completions_generated(self.trainer.rollout_totals)
        self.curve.append({"step": step, "completions": completions, **self.cost, **metrics})
        self._clocks = self._now()

    def on_train_begin(self, args, state, control, **kwargs):
        self._record(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._record(state.global_step)


def learning_rate(args, label: str) -> float:
    """The run's learning rate: its ``--method-lr LABEL=LR`` if given, else ``--learning-rate``."""
    return dict(getattr(args, "method_lr", None) or {}).get(label, args.learning_rate)


def build_trainer(run: MethodRun, seed: int, args, task, output_dir: str, recorder: CurveRecorder):
    model, tokenizer = task.policy(seed)
    group = max(args.num_probes, 2)  # num_generations only fixes m = generation batch / num_generations here
    # Reinforce-Ada draws its own rounds (gvm_ada_*) instead of N′ probes and a budget; its update group is
    # num_generations rows: 4 at the default N′, the paper's n.
    budget = {} if run.settings.get("gvm_allocation") == "reinforce-ada" else dict(
        gvm_num_probes=args.num_probes, gvm_budget_per_prompt=args.budget_per_prompt)
    config = run.config(**trainer_arguments(
        args.device, output_dir, seed,
        per_device_train_batch_size=args.prompts_per_step * group,
        num_generations=group,
        max_completion_length=args.max_completion_length,
        max_steps=args.max_steps,
        learning_rate=learning_rate(args, run.label),
        **budget,
    ))
    recorder.evaluate = task.evaluator(tokenizer, seed)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    trainer = run.trainer_cls(model=model, reward_funcs=task.reward, args=config, train_dataset=task.dataset(seed),
                              processing_class=tokenizer, callbacks=[recorder], peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)
    recorder.trainer = trainer
    return trainer


def completions_per_prompt(output_dir: str, total: int) -> dict[int, float] | None:
    """Completions spent on each dataset index, from the trainer's allocation log: its allocated samples, plus an
    equal share per visit of whatever else the run generated (the probes), so that the parts add up to `total`."""
    from gvm_trl.metrics import ALLOCATIONS_FILE, read_allocation_log

    if not (Path(output_dir) / ALLOCATIONS_FILE).exists():
        return None
    visits = [prompt for line in read_allocation_log(output_dir) for prompt in line["prompts"]]
    if not visits:
        return None
    unlogged = (total - sum(v["num_samples"] for v in visits)) / len(visits)
    spent: dict[int, float] = {}
    for visit in visits:
        spent[visit["index"]] = spent.get(visit["index"], 0.0) + visit["num_samples"] + unlogged
    return spent


GROUP_OUTCOME_FIELDS = ("step", "prompts", "all_wrong", "all_correct", "completions", "zero_variance_completions")


def group_outcomes(output_dir: str, num_probes: int) -> list[list[int]] | None:
    """Per generation batch, from the trainer's allocation log: [step, prompts, all-wrong groups, all-correct groups,
    completions, completions in those zero-variance groups] (`GROUP_OUTCOME_FIELDS`).

    A prompt's group is every completion scored for it in that batch: the N′ + B of a uniform method (its log has no
    probe count), the N′ probes plus the allocated samples of a probing method (a prompt given no budget is judged on
    its probes alone). All-wrong: no accepted completion; all-correct: every one accepted. For GRPO these are the
    groups whose advantages are all zero (no gradient); the counts are those the run actually drew.
    """
    from gvm_trl.metrics import ALLOCATIONS_FILE, read_allocation_log

    if not (Path(output_dir) / ALLOCATIONS_FILE).exists():
        return None
    rows = []
    for line in read_allocation_log(output_dir):
        wrong = correct = completions = zero = 0
        for prompt in line["prompts"]:
            probed = prompt["probes_accepted"] is not None
            size = prompt["num_samples"] + (num_probes if probed else 0)
            accepted = prompt["num_accepted"] + (prompt["probes_accepted"] or 0)
            completions += size
            if size and accepted in (0, size):
                wrong, correct = wrong + (accepted == 0), correct + (accepted == size)
                zero += size
        rows.append([line["step"], len(line["prompts"]), wrong, correct, completions, zero])
    return rows


def run_one(run: MethodRun, seed: int, args, task, start_cache: dict) -> dict:
    """Train one method with one seed: its curve, completions per prompt, logged GVM diagnostics and wall time."""
    started = time.perf_counter()
    recorder = CurveRecorder(args.eval_every, None, start_cache.setdefault(seed, {}))
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(run, seed, args, task, output_dir, recorder)
        trainer.train()
        spent = completions_per_prompt(output_dir, completions_generated(trainer.rollout_totals))
        outcomes = group_outcomes(output_dir, args.num_probes)
    logs = trainer.state.log_history
    for point in recorder.curve[1:-1]:  # per-prompt rates only at the start and the end: the JSON stays small
        point.pop("rates", None)
    return {
        "method": run.label,
        "base": run.base,
        "fields": run.fields,
        "seed": seed,
        "learning_rate": learning_rate(args, run.label),
        "curve": recorder.curve,
        "rollout_totals": dict(trainer.rollout_totals),
        "completions_per_prompt": spent,
        "prompt_bands": task.prompt_bands(seed),
        "train_accept_rate": [log["gvm/accept_rate"] for log in logs if "gvm/accept_rate" in log],
        "variance_bound_ratio": [log["gvm/variance_bound_ratio"] for log in logs if "gvm/variance_bound_ratio" in log],
        "prompts_zero_budget": [log["gvm/prompts_zero_budget"] for log in logs if "gvm/prompts_zero_budget" in log],
        "group_outcomes": outcomes,
        "wall_seconds": time.perf_counter() - started,
    }


# -- analysis ---------------------------------------------------------------------------------------------------------


# The x axes a curve is read against: completions generated (probes included), and the training's own cost — wall
# and process CPU seconds, evaluations left out (CPU seconds are what a shared machine's load distorts least).
COST_AXES = ("completions", "train_cpu_seconds", "train_seconds")
TARGET_FRACTIONS = (0.25, 0.5, 0.75, 0.9)


def mean_curve(curves: list[list[dict]], metric: str) -> dict:
    """Seed-averaged curve over the evaluations every seed has (same schedule: the same steps), with the seed-mean
    of every cost axis the runs recorded."""
    length = min(len(c) for c in curves)
    values = np.array([[c[i][metric] for i in range(length)] for c in curves])
    curve = {"mean": values.mean(0).tolist(), "min": values.min(0).tolist(), "max": values.max(0).tolist()}
    for axis in COST_AXES:
        if all(axis in c[i] for c in curves for i in range(length)):
            curve[axis] = np.array([[c[i][axis] for i in range(length)] for c in curves]).mean(0).tolist()
    return curve


def completions_to_reach(curve: dict, target: float, direction: int, axis: str = "completions") -> float:
    """First x where the curve reaches `target` (linear interpolation between evaluations); inf if it never does."""
    xs, ys = curve[axis], [direction * y for y in curve["mean"]]
    goal = direction * target
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y >= goal:
            return float(x) if i == 0 else xs[i - 1] + (goal - ys[i - 1]) / (y - ys[i - 1]) * (x - xs[i - 1])
    return math.inf


def mean_improvement(curve: dict, direction: int, budget: float) -> float:
    """Area under direction·(y − y₀) over completions 0..budget, divided by the budget (trapezoids)."""
    xs = np.array(curve["completions"], dtype=float)
    ys = direction * (np.array(curve["mean"]) - curve["mean"][0])
    keep = xs <= budget
    xs_, ys_ = list(xs[keep]), list(ys[keep])
    if xs_[-1] < budget and keep.sum() < len(xs):
        following = int(keep.sum())
        xs_.append(budget)
        ys_.append(float(np.interp(budget, xs[following - 1 : following + 1], ys[following - 1 : following + 1])))
    return float(np.trapezoid(ys_, xs_) / budget) if budget > 0 else 0.0


def compare(gvm_curves: list, uniform_curves: list, metric: str, direction: int, fraction: float,
            resamples: int, fractions=TARGET_FRACTIONS) -> dict:
    """Target, completions to it, ratio and mean improvement for a GVM run and its uniform baseline, with paired
    bootstrap intervals over seeds."""

    def statistics_of(sample: dict) -> dict:
        gvm, uniform = mean_curve(sample["gvm"], metric), mean_curve(sample["uniform"], metric)
        start = uniform["mean"][0]
        target = start + fraction * (uniform["mean"][-1] - start)
        budget = min(gvm["completions"][-1], uniform["completions"][-1])
        reach = {"gvm": completions_to_reach(gvm, target, direction),
                 "uniform": completions_to_reach(uniform, target, direction)}
        area = {"gvm": mean_improvement(gvm, direction, budget),
                "uniform": mean_improvement(uniform, direction, budget)}
        return {"target": target, "reach": reach, "area": area, "budget": budget,
                "uniform_improves": direction * (uniform["mean"][-1] - start) > 0}

    per_seed = {"gvm": gvm_curves, "uniform": uniform_curves}
    point = statistics_of(per_seed)
    if not point["uniform_improves"]:
        return {**point, "target": None, "note": "the uniform method did not improve: no target"}

    def ratio(sample):
        s = statistics_of(sample)
        return s["reach"]["gvm"] / s["reach"]["uniform"] if s["reach"]["uniform"] > 0 else math.inf

    def area_ratio(sample):
        s = statistics_of(sample)
        return s["area"]["gvm"] / s["area"]["uniform"] if s["area"]["uniform"] > 0 else math.nan

    intervals = {
        "completions_to_target_gvm": paired_bootstrap(per_seed, lambda s: statistics_of(s)["reach"]["gvm"], resamples),
        "completions_to_target_uniform": paired_bootstrap(
            per_seed, lambda s: statistics_of(s)["reach"]["uniform"], resamples),
        "ratio_completions_to_target": paired_bootstrap(per_seed, ratio, resamples),
        "mean_improvement_gvm": paired_bootstrap(per_seed, lambda s: statistics_of(s)["area"]["gvm"], resamples),
        "mean_improvement_uniform": paired_bootstrap(
            per_seed, lambda s: statistics_of(s)["area"]["uniform"], resamples),
        "ratio_mean_improvement": paired_bootstrap(per_seed, area_ratio, resamples),
    }
    return {**point, "intervals": intervals,
            "targets": targets_table(per_seed, metric, direction, fractions,
                                     resamples)}


def targets_table(per_seed: dict, metric: str, direction: int, fractions, resamples: int) -> dict:
    """Per target (the start plus each fraction of the uniform method's final improvement): the ratio GVM / uniform
    of what each seed-mean curve spends to first reach it, on every cost axis both recorded, with paired bootstrap
    intervals over seeds (> 1: GVM spends more; ∞: GVM never reaches it)."""
    axes = [axis for axis in COST_AXES
            if all(axis in point for curves in per_seed.values() for curve in curves for point in curve)]

    def ratios(sample: dict) -> list[float]:
        gvm, uniform = mean_curve(sample["gvm"], metric), mean_curve(sample["uniform"], metric)
        start, end = uniform["mean"][0], uniform["mean"][-1]
        out = []
        for fraction in fractions:
            target = start + fraction * (end - start)
            for axis in axes:
                mine, theirs = (completions_to_reach(c, target, direction, axis) for c in (gvm, uniform))
                out.append(mine / theirs if 0 < theirs < math.inf else math.nan if mine == theirs else math.inf)
        return out

    uniform = mean_curve(per_seed["uniform"], metric)
    cells = iter(paired_bootstrap_many(per_seed, ratios, resamples))
    return {f"{fraction:g}": {"target": uniform["mean"][0] + fraction * (uniform["mean"][-1] - uniform["mean"][0]),
                              **{axis: next(cells) for axis in axes}}
            for fraction in fractions}


def fact_bands(runs: list[dict], bands: dict | None = None, levels: dict | None = None) -> dict:
    """Per starting band of the facts task: prompts, share of completions spent there, final P(z | x), per method.

    By default the bands are the runs' own (`prompt_bands`, FACT_BANDS); with `bands` and `levels` (seed → each
    prompt's intended starting level, e.g. from `facts.make_facts`) the prompts are banded anew (`REGIME_BANDS`)."""
    names = list(bands or FACT_BANDS)
    out = {}
    for name in names:
        row = {"prompts": None, "start_rate": None, "methods": {}}
        for label in dict.fromkeys(r["method"] for r in runs):
            shares, finals = [], []
            for r in (r for r in runs if r["method"] == label):
                prompt_bands = (r["prompt_bands"] if bands is None
                                else [fact_band(level, bands) for level in levels[r["seed"]]])
                members = [i for i, band in enumerate(prompt_bands) if band == name]
                row["prompts"] = len(members)
                if not members:
                    continue
                spent = {int(k): v for k, v in (r["completions_per_prompt"] or {}).items()}
                if spent:
                    shares.append(sum(spent.get(i, 0) for i in members) / sum(spent.values()))
                finals.append(statistics.fmean(r["curve"][-1]["rates"][i] for i in members))
                row["start_rate"] = statistics.fmean(r["curve"][0]["rates"][i] for i in members)
            row["methods"][label] = {"completion_share": statistics.fmean(shares) if shares else None,
                                     "final_rate": statistics.fmean(finals) if finals else None}
        out[name] = row
    return out


def group_outcome_shares(runs: list[dict]) -> dict | None:
    """Per generation step, the seed-mean share of a run's prompt groups that were all wrong and all correct (the
    zero-variance groups: no GRPO gradient), and the share of its completions spent in them; None without logs."""
    logged = [r["group_outcomes"] for r in runs if r.get("group_outcomes")]
    if not logged:
        return None
    length = min(len(rows) for rows in logged)
    field = {name: index for index, name in enumerate(GROUP_OUTCOME_FIELDS)}

    def mean_share(numerator: str, denominator: str) -> list[float]:
        return [statistics.fmean(rows[i][field[numerator]] / max(rows[i][field[denominator]], 1) for rows in logged)
                for i in range(length)]

    return {"steps": [logged[0][i][0] for i in range(length)], "seeds": len(logged),
            "all_wrong": mean_share("all_wrong", "prompts"), "all_correct": mean_share("all_correct", "prompts"),
            "zero_variance_completions": mean_share("zero_variance_completions", "completions")}


def analyse(runs: list[dict], task, args) -> dict:
    labels = list(dict.fromkeys(r["method"] for r in runs))
    by_label = {label: sorted((r for r in runs if r["method"] == label), key=lambda r: r["seed"]) for label in labels}
    summary = {"curves": {}, "comparisons": {}, "final": {}, "seeds": {}}
    for label in labels:
        summary["seeds"][label] = [r["seed"] for r in by_label[label]]
    for metric in task.metrics:
        summary["curves"][metric] = {label: mean_curve([r["curve"] for r in by_label[label]], metric)
                                     for label in labels}
        summary["final"][metric] = {label: paired_bootstrap({"x": [r["curve"][-1][metric] for r in by_label[label]]},
                                                            lambda s: statistics.fmean(s["x"]), args.bootstrap)
                                    for label in labels}
    runs_by_label = {label: run for label, run in zip(labels, _method_runs_of(runs))}
    for label in labels:
        baseline = uniform_baseline(runs_by_label[label], list(runs_by_label.values()))
        if baseline is None:
            continue
        comparison = compare_runs(by_label, label, baseline.label, task, args)
        if comparison is not None:
            summary["comparisons"][label] = comparison
    for label, baseline in (pair.split("=", 1) for pair in getattr(args, "against", [])):
        # main() checks that both are runs of the invocation; a file written part-way may not have them yet.
        comparison = compare_runs(by_label, label, baseline, task, args) if {label, baseline} <= set(by_label) else None
        if comparison is not None:
            summary["comparisons"][f"{label} vs {baseline}"] = comparison
    if all(r.get("prompt_bands") for r in runs):
        summary["bands"] = fact_bands(runs)
    outcomes = {label: group_outcome_shares(by_label[label]) for label in labels}
    if any(outcomes.values()):
        summary["group_outcomes"] = {label: value for label, value in outcomes.items() if value}
    return summary


def compare_runs(by_label: dict, label: str, baseline: str, task, args) -> dict | None:
    """`compare` of run `label` against run `baseline` (its uniform method, or any other, e.g. another schedule) on
    their shared seeds only (runs of one seed are paired); None when they share none."""
    shared = sorted({r["seed"] for r in by_label[label]} & {r["seed"] for r in by_label[baseline]})
    if not shared:
        return None
    mine = [r["curve"] for r in by_label[label] if r["seed"] in shared]
    theirs = [r["curve"] for r in by_label[baseline] if r["seed"] in shared]
    return {"baseline": baseline, "seeds": shared, **{
        metric: compare(mine, theirs, metric, direction, args.target_fraction, args.bootstrap,
                        getattr(args, "target_fractions", TARGET_FRACTIONS))
        for metric, direction in task.metrics.items()}}


def _method_runs_of(runs: list[dict]) -> list[MethodRun]:
    seen = {}
    for r in runs:
        seen.setdefault(r["method"], MethodRun(r["method"], r["base"], r["fields"]))
    return list(seen.values())


# -- the learning-rate sweep (issue 27) -------------------------------------------------------------------------------

DIVERGENCE_GIVE_BACK = 0.5  # a run diverged if its final L gave back more than this share of its best improvement ...
DIVERGENCE_MIN_RISE = 0.05  # ... and more than this many nats


def divergence(curve: list[dict], metric: str = "objective", direction: int = -1) -> str | None:
    """Why a run diverged, or None. A run of the sweep diverged when, on its evaluated curve of `metric` (L by
    default, lower is better):

    - ``non-finite``: some evaluation is NaN or ±inf (the weights blew up);
    - ``ended worse than start``: its final value is worse than its starting one;
    - ``gave back``: its final value is worse than its best one by more than DIVERGENCE_GIVE_BACK (half) of its best
      improvement over the start and by more than DIVERGENCE_MIN_RISE (0.05 nats of L): it reached somewhere and then
      lost most of it.

    Checked in that order; the first that holds is the reason.
    """
    values = [direction * point[metric] for point in curve]  # higher is better from here on
    if not all(math.isfinite(v) for v in values):
        return "non-finite"
    start, final, best = values[0], values[-1], max(values)
    if final < start:
        return "ended worse than start"
    if best - final > max(DIVERGENCE_GIVE_BACK * (best - start), DIVERGENCE_MIN_RISE):
        return "gave back"
    return None


def load_sweep(paths: list[Path]) -> dict[float, list[dict]]:
    """The runs of a learning-rate sweep: one convergence JSON per learning rate (same settings but the rate)."""
    sweep: dict[float, list[dict]] = {}
    for path in paths:
        payload = json.loads(Path(path).read_text())
        rate = float(payload["arguments"]["learning_rate"])
        if payload["arguments"].get("method_lr"):
            raise SystemExit(f"--lr-sweep: {path} gives some runs their own learning rate; a sweep file has one rate")
        if rate in sweep:
            raise SystemExit(f"--lr-sweep: two files at learning rate {rate:g}")
        sweep[rate] = payload["runs"]
    return dict(sorted(sweep.items()))


def analyse_sweep(sweep: dict[float, list[dict]], metric: str = "objective", direction: int = -1,
                  fraction: float = 0.75) -> dict:
    """Each method's best learning rate on the sweep's (tuning) seeds, and the divergence rate per rate.

    The target is shared by a fair baseline and the probing methods measured against it (`uniform_baseline`): the
    seed-mean start plus `fraction` of the largest improvement the baseline's seed-mean curve makes by its last
    evaluation at any learning rate of the sweep at which no seed of it diverged — the existing protocol's target
    (start + 75 % of the baseline's final improvement), taken at the baseline's best final point so that it does not
    depend on the rate being judged. Per method and rate: the completions its seed-mean curve needs to first reach it
    (∞ if it never does) and the divergence count (`divergence`). The best rate is the one needing the fewest
    completions among the rates at which no seed diverged; if it reaches the target at none of them, the one with the
    best final seed-mean value (marked ``reached: false``); a rate where the method never reaches the target loses
    to any where it does. The curves of one seed start from the same weights at every rate, so the start is one.
    """
    labels = list(dict.fromkeys(r["method"] for runs in sweep.values() for r in runs))
    every_run = [r for runs in sweep.values() for r in runs]
    method_of = {label: run for label, run in zip(labels, _method_runs_of(every_run))}
    per = {label: {} for label in labels}
    for rate, runs in sweep.items():
        for label in labels:
            mine = sorted((r for r in runs if r["method"] == label), key=lambda r: r["seed"])
            if not mine:
                continue
            reasons = [divergence(r["curve"], metric, direction) for r in mine]
            finite = [r for r, why in zip(mine, reasons) if why != "non-finite"]
            curve = mean_curve([r["curve"] for r in finite], metric) if finite else None
            per[label][rate] = {
                "seeds": [r["seed"] for r in mine], "diverged": sum(why is not None for why in reasons),
                "reasons": [why for why in reasons if why], "curve": curve,
                "start": curve["mean"][0] if curve else math.nan,
                "final": curve["mean"][-1] if curve else math.nan,
                "final_train_accuracy": statistics.fmean(r["curve"][-1].get("train_accuracy", math.nan) for r in mine),
                "train_cpu_seconds": statistics.fmean(r["curve"][-1].get("train_cpu_seconds", math.nan) for r in mine),
            }
    families: dict[str, list[str]] = {}
    for label in labels:
        baseline = uniform_baseline(method_of[label], list(method_of.values()))
        families.setdefault(label if baseline is None else baseline.label, []).append(label)
    result = {"metric": metric, "fraction": fraction, "rates": list(sweep), "families": {}, "methods": {}}
    for baseline, members in families.items():
        cells = per[baseline]
        eligible = {rate: c for rate, c in cells.items() if c["curve"] and not c["diverged"]} or {
            rate: c for rate, c in cells.items() if c["curve"]}
        starts = [c["start"] for c in cells.values() if c["curve"]]
        start = statistics.fmean(starts)
        best_rate = max(eligible, key=lambda rate: direction * (eligible[rate]["final"] - start))
        target = start + fraction * (eligible[best_rate]["final"] - start)
        result["families"][baseline] = {"members": members, "start": start, "target": target,
                                        "target_from_rate": best_rate,
                                        "start_spread": max(starts) - min(starts)}
        for label in members:
            rows = {}
            for rate, c in per[label].items():
                reach = completions_to_reach(c["curve"], target, direction) if c["curve"] else math.inf
                cpu = (completions_to_reach(c["curve"], target, direction, "train_cpu_seconds")
                       if c["curve"] and "train_cpu_seconds" in c["curve"] else math.nan)
                rows[rate] = {"completions_to_target": reach, "cpu_seconds_to_target": cpu,
                              **{k: v for k, v in c.items() if k != "curve"}}
            result["methods"][label] = {"baseline": baseline, "rates": rows, **pick_best_rate(rows, direction)}
    return result


def pick_best_rate(rows: dict[float, dict], direction: int = -1) -> dict:
    """The best of a method's rates (`analyse_sweep`'s rule): fewest completions to the target among the rates with
    no diverged seed; if none reaches it, the best final value among them; if every rate diverged somewhere, the
    same among the rates with the fewest diverged seeds."""
    fewest = min(row["diverged"] for row in rows.values())
    candidates = {rate: row for rate, row in rows.items() if row["diverged"] == fewest}
    reached = {rate: row for rate, row in candidates.items() if math.isfinite(row["completions_to_target"])}
    if reached:
        best = min(reached, key=lambda rate: reached[rate]["completions_to_target"])
    else:
        best = max(candidates, key=lambda rate: direction * candidates[rate]["final"]
                   if math.isfinite(candidates[rate]["final"]) else -math.inf)
    return {"best_rate": best, "reached": bool(reached), "best_diverged": fewest}


def format_sweep(result: dict) -> str:
    """The sweep as markdown: per family its target, then per method and rate the completions to the target, the
    final L and training accuracy, the divergence count; the best rate in bold."""
    rates = result["rates"]
    lines = []
    for baseline, family in result["families"].items():
        lines.append(f"\n{baseline} family: start L {family['start']:.3f}, target {family['target']:.3f} (75 % of "
                     f"{baseline}'s improvement at lr {family['target_from_rate']:g})\n")
        lines.append("| method | " + " | ".join(f"lr {rate:g}" for rate in rates) + " | best lr |")
        lines.append("| --- |" + " ---: |" * (len(rates) + 1))
        for label in family["members"]:
            method = result["methods"][label]
            cells = []
            for rate in rates:
                row = method["rates"].get(rate)
                if row is None:
                    cells.append("-")
                    continue
                reach = row["completions_to_target"]
                text = (f"{'never' if math.isinf(reach) else format(reach, ',.0f')}; L {row['final']:.3f}, acc "
                        f"{row['final_train_accuracy']:.3f}; div {row['diverged']}/{len(row['seeds'])}")
                cells.append(f"**{text}**" if rate == method["best_rate"] else text)
            lines.append(f"| `{label}` | " + " | ".join(cells) + f" | {method['best_rate']:g}"
                         + ("" if method["reached"] else " (target not reached)") + " |")
    return "\n".join(lines)


def sweep_main(args) -> dict:
    result = analyse_sweep(load_sweep(args.lr_sweep), fraction=args.target_fraction)
    payload = {"files": [str(p) for p in args.lr_sweep], "divergence_rule": divergence.__doc__, **result}
    write_json(args.output, payload)
    print(format_sweep(result))
    picks = [f"--method-lr {label}={m['best_rate']:g}" for label, m in result["methods"].items()]
    print("\n" + " ".join(picks))
    print(f"wrote {args.output}")
    return payload


def format_summary(summary: dict, runs: list[dict], task) -> str:
    primary = task.primary
    lines = [f"{'method':24s} {'completions':>11s} " + " ".join(f"{m + ' (final)':>26s}" for m in task.metrics)
             + f" {'zero-budget prompts':>19s} {'eq5 vs uniform':>14s} {'minutes':>8s} {'train CPU s':>11s}"]
    for label in summary["final"][primary]:
        mine = [r for r in runs if r["method"] == label]
        completions = statistics.fmean(r["curve"][-1]["completions"] for r in mine)
        cells = " ".join(f"{format_interval(*summary['final'][m][label], '.3f'):>26s}" for m in task.metrics)
        zero = [x for r in mine for x in r.get("prompts_zero_budget", [])]
        bound = [x for r in mine for x in r.get("variance_bound_ratio", [])]
        lines.append(f"{label:24s} {completions:11.0f} {cells} {statistics.fmean(zero) if zero else 0:19.2f} "
                     f"{statistics.fmean(bound) if bound else math.nan:14.2f} "
                     f"{statistics.fmean(r['wall_seconds'] for r in mine) / 60:8.1f} "
                     f"{statistics.fmean(r['curve'][-1].get('train_cpu_seconds', math.nan) for r in mine):11.1f}")
    for label, comparison in summary["comparisons"].items():
        label = label.split(" vs ")[0]
        for metric in task.metrics:
            c = comparison[metric]
            if c.get("target") is None:
                lines.append(f"{label} vs {comparison['baseline']}, {metric}: {c.get('note')}")
                continue
            i = c["intervals"]
            lines.append(
                f"{label} vs {comparison['baseline']}, {metric}: target {c['target']:.3f}; completions to it "
                f"{format_interval(*i['completions_to_target_gvm'], '.0f')} vs "
                f"{format_interval(*i['completions_to_target_uniform'], '.0f')}, ratio "
                f"{format_interval(*i['ratio_completions_to_target'])}; mean improvement ratio "
                f"{format_interval(*i['ratio_mean_improvement'])}")
            for fraction, cell in c.get("targets", {}).items():
                costs = "; ".join(f"{axis} {format_interval(*cell[axis])}" for axis in COST_AXES if axis in cell)
                lines.append(f"    {float(fraction):.0%} of the way (target {cell['target']:.3f}), ratio to reach: {costs}")
    if "bands" in summary:
        labels = list(summary["final"][primary])
        lines.append("band (prompts, start p): "
                     + " | ".join(f"{label}: share of completions, final p" for label in labels))
        for name, band in summary["bands"].items():
            cells = []
            for label in labels:
                m = band["methods"][label]
                share = "-" if m["completion_share"] is None else f"{m['completion_share']:.2f}"
                cells.append(f"{share}, {'-' if m['final_rate'] is None else format(m['final_rate'], '.3f')}")
            start = "-" if band["start_rate"] is None else f"{band['start_rate']:.3f}"
            lines.append(f"{name} ({band['prompts']}, {start}): " + " | ".join(cells))
    for label, shares in summary.get("group_outcomes", {}).items():
        def window(key: str, part: slice) -> str:
            values = shares[key][part]
            return f"{statistics.fmean(values):.2f}" if values else "-"

        lines.append(f"{label}: groups all wrong / all correct (share of prompts per step, seed mean): first 10 steps "
                     f"{window('all_wrong', slice(0, 10))} / {window('all_correct', slice(0, 10))}, whole run "
                     f"{window('all_wrong', slice(None))} / {window('all_correct', slice(None))}, last 10 steps "
                     f"{window('all_wrong', slice(-10, None))} / {window('all_correct', slice(-10, None))}; "
                     f"completions in them {window('zero_variance_completions', slice(None))}")
    return "\n".join(lines)


def plot(summary: dict, path: Path, task, title: str) -> None:
    plt = pyplot()
    metrics = [m for m in task.metrics if m != "train_accuracy"]
    curves = summary["curves"]
    labels = list(curves[task.primary])
    families = {}
    for label in labels:
        baseline = summary["comparisons"].get(label, {}).get("baseline")
        families.setdefault(baseline or label, []).append(label)
    families = {base: members for base, members in families.items() if base in labels}
    figure, axes = plt.subplots(len(metrics), len(families), figsize=(5.5 * len(families), 3.8 * len(metrics)),
                                squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for column, (base, members) in enumerate(families.items()):
        for row, metric in enumerate(metrics):
            axis = axes[row][column]
            for index, label in enumerate(sorted(members, key=lambda x: x != base)):
                curve = curves[metric][label]
                color = "black" if label == base else colors[index % len(colors)]
                axis.plot(curve["completions"], curve["mean"], color=color, label=label, linewidth=1.5)
                axis.fill_between(curve["completions"], curve["min"], curve["max"], color=color, alpha=0.12)
                target = summary["comparisons"].get(label, {}).get(metric, {}).get("target")
                if target is not None and index == 1:
                    axis.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
            axis.set_xlabel("completions generated (probes included)")
            axis.set_ylabel(task.labels[metric])
            axis.set_title(f"{base} and its GVM runs")
            axis.legend(fontsize=7)
    save_figure(figure, path, title)


# -- command line -----------------------------------------------------------------------------------------------------


def _method_lr(text: str) -> tuple[str, float]:
    label, equals, value = text.partition("=")
    try:
        rate = float(value)
    except ValueError:
        rate = math.nan
    if not equals or not label or not rate > 0:
        raise argparse.ArgumentTypeError(f"--method-lr {text!r}: expected LABEL=LR with LR > 0")
    return label, rate


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(TASKS), default="facts")
    parser.add_argument("--tiny", action="store_true", help="the letter task (same as --task letters)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 steps per method, tiny sizes")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="arithmetic task: path, Hub id or demo model")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--methods", nargs="*", default=None,
                        help=f"names in gvm_trl.methods (default {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=BASE:field=value[,field=value]",
                        help="one more run: method BASE with extra config fields (repeatable)")
    parser.add_argument("--factorial", action="store_true",
                        help="issue 17's factorial: uniform / GVM without / with history x none / 1/|D_i|, both trainers")
    parser.add_argument("--levers", action="store_true",
                        help="issue 17's levers: GVM-GRPO with G = 1, the posterior floor, alpha 1e-5, N' = 2; and "
                             "grpo-mean")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--prompts-per-step", type=int, help="m: prompts per generation batch")
    parser.add_argument("--num-probes", type=int, help="N′: probes per prompt")
    parser.add_argument("--budget-per-prompt", type=int, help="B = N/m: allocated completions per prompt on average")
    parser.add_argument("--max-completion-length", type=int)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--method-lr", action="append", default=[], metavar="LABEL=LR", type=_method_lr,
                        help="this run's own learning rate (repeatable; e.g. each method at its best lr from "
                             "--lr-sweep); the others train at --learning-rate")
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, help="LoRA adapters (arithmetic on CPU)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--train-prompts", type=int)
    parser.add_argument("--never-share", type=float, default=0.125, help="facts: share of never-solved facts")
    parser.add_argument("--solved-share", type=float, default=0.0,
                        help="facts: share of nearly-solved facts (warm-started at p 0.95-0.99; default none)")
    parser.add_argument("--lowest-rate", type=float, default=0.02, help="facts: lowest starting accept rate")
    parser.add_argument("--highest-rate", type=float, default=0.98, help="facts: highest starting accept rate")
    parser.add_argument("--warm-start-steps", type=int, help="facts/letters: supervised steps before RL")
    parser.add_argument("--data-seed", type=int, help="seed of the training prompts (facts: default the run's seed; "
                        "letters, arithmetic: default 0)")
    parser.add_argument("--eval-every", type=int, help="evaluate every E steps")
    parser.add_argument("--heldout", type=int, help="letters/arithmetic: held-out prompts")
    parser.add_argument("--eval-samples", type=int, help="letters/arithmetic: completions per held-out prompt")
    parser.add_argument("--eval-seed", type=int, default=1234)
    parser.add_argument("--target-fraction", type=float, default=0.75,
                        help="target = start + this × the uniform method's final improvement")
    parser.add_argument("--target-fractions", type=float, nargs="+", default=list(TARGET_FRACTIONS),
                        help="the targets of the per-target table (each: start + this × the uniform improvement)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples over seeds")
    parser.add_argument("--output", type=Path, help="JSON path (the PNG goes next to it)")
    parser.add_argument("--against", action="append", default=[], metavar="LABEL=BASELINE",
                        help="also compare run LABEL with run BASELINE, paired over seeds (e.g. two schedules)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --output (same settings) and add only the missing ones")
    parser.add_argument("--lr-sweep", nargs="+", type=Path, default=[], metavar="JSON",
                        help="analyse a learning-rate sweep instead of training: one result file per rate (same "
                             "settings but --learning-rate); writes each method's best rate and the divergence rate "
                             "per rate to --output (default results/lr_sweep_<task>.json)")
    parser.add_argument("--merge", nargs="+", type=Path, default=[], metavar="JSON",
                        help="also take the finished runs of these files (same settings; e.g. the seeds another "
                             "process ran) before running the missing ones")
    args = parser.parse_args(argv)
    if args.tiny:
        args.task = "letters"
    task_cls = TASKS[args.task]
    for flag, (methods, variants) in (("factorial", FACTORIAL), ("levers", LEVERS)):
        if getattr(args, flag):
            if args.methods is not None or args.variant:
                raise SystemExit(f"--{flag} names its own methods and variants: drop --methods/--variant")
            args.methods, args.variant = list(methods), list(variants)
    if args.methods is None:
        args.methods = DEFAULT_METHODS
    if args.quick:
        args.seeds = args.seeds if args.seeds != [0, 1] else [0]
        args.bootstrap = min(args.bootstrap, 50)
    preset = {**task_cls.preset, **(getattr(task_cls, "quick", {}) if args.quick else {})}
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    tag = {"letters": "tiny"}.get(args.task, args.task)
    if args.lr_sweep:
        args.output = args.output or RESULTS_DIR / f"lr_sweep_{tag}.json"
    args.output = args.output or RESULTS_DIR / f"convergence_{'quick' if args.quick else tag}.json"
    return args


def setup_line(args, task) -> str:
    own = "".join(f", {label} at {rate:g}" for label, rate in getattr(args, "method_lr", None) or [])
    return (f"{task.setup()}; m = {args.prompts_per_step}, N′ = {args.num_probes}, B = {args.budget_per_prompt} "
            f"({args.prompts_per_step * (args.num_probes + args.budget_per_prompt)} completions per step), "
            f"≤ {args.max_completion_length} tokens, lr {args.learning_rate:g}{own}, {args.max_steps} steps, "
            f"seeds {args.seeds}")


SETTINGS_IGNORED_ON_RESUME = ("seeds", "methods", "variant", "output", "bootstrap", "resume", "target_fraction",
                              "target_fractions", "against", "merge", "factorial", "levers", "lr_sweep")


def finished_runs(args, task, runs_to_do: list[MethodRun], path: Path | None = None) -> list[dict]:
    """The runs already in `path` (default `args.output`) that this invocation would repeat: same settings (seeds,
    method list and report options aside), same method label, base and fields. Refuses a file written with other
    settings."""
    path = path or args.output
    if not path.exists():
        if path != args.output:
            raise SystemExit(f"--merge: no file {path}")
        return []
    previous = json.loads(path.read_text())
    now = {k: v for k, v in json.loads(json.dumps(vars(args), default=str)).items()
           if k not in SETTINGS_IGNORED_ON_RESUME}
    then = {k: v for k, v in previous["arguments"].items() if k not in SETTINGS_IGNORED_ON_RESUME}
    defaults = json.loads(json.dumps(vars(parse_args(["--task", args.task] + ["--quick"] * args.quick)), default=str))
    for key in set(now) - set(then):  # a setting added since that file was written counts at its default
        then[key] = defaults[key]
    if now != then:
        differing = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
        raise SystemExit(f"--resume/--merge: {path} was written with other settings ({', '.join(differing)})")
    wanted = {(r.label, r.base, json.dumps(r.fields, sort_keys=True)) for r in runs_to_do}
    return [r for r in previous["runs"] if (r["method"], r["base"], json.dumps(r["fields"], sort_keys=True)) in wanted
            and r["seed"] in args.seeds]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.lr_sweep:
        return sweep_main(args)
    limit_threads(args.device)
    task = TASKS[args.task](args)
    runs_to_do = method_runs(args.methods, args.variant)
    unknown = sorted({label for label, _ in args.method_lr} - {r.label for r in runs_to_do})
    if unknown:
        raise SystemExit(f"--method-lr names no run of this invocation: {', '.join(unknown)}")
    for pair in args.against:  # before any run: the comparison is made after every run, from the runs so far
        missing = [name for name in pair.split("=", 1) if name not in {r.label for r in runs_to_do}]
        if missing:
            raise SystemExit(f"--against {pair}: no runs of {', '.join(missing)} in this invocation (--methods, "
                             "--variant)")
    started, runs, start_cache = time.perf_counter(), [], {}
    if args.resume:
        runs = finished_runs(args, task, runs_to_do)
        print(f"[convergence] resuming: {len(runs)} finished runs in {args.output}", flush=True)
    for part in args.merge:  # e.g. the seeds another process ran
        new = [r for r in finished_runs(args, task, runs_to_do, part)
               if not any(r["method"] == mine["method"] and r["seed"] == mine["seed"] for mine in runs)]
        runs += new
        print(f"[convergence] merged {len(new)} runs from {part}", flush=True)
    print(f"[convergence] {setup_line(args, task)}; runs: {', '.join(r.label for r in runs_to_do)}", flush=True)

    def report(final: bool) -> dict:
        summary = analyse(runs, task, args)
        payload = {"setup": setup_line(args, task), "complete": final, "arguments": vars(args),
                   "methods": {r.label: r.describe() for r in runs_to_do}, "load_average": os.getloadavg(),
                   "summary": summary, "runs": runs, "wall_time_s": time.perf_counter() - started}
        write_json(args.output, payload)
        plot(summary, args.output.with_suffix(".png"), task, setup_line(args, task))
        return payload

    for seed in args.seeds:  # seeds outermost: a cut-short run still has every method for the first seeds
        for run in runs_to_do:
            if any(r["method"] == run.label and r["seed"] == seed for r in runs):
                continue
            runs.append(run_one(run, seed, args, task, start_cache))
            last = runs[-1]["curve"][-1]
            print(f"[convergence] {run.label} seed {seed}: {task.primary} {last[task.primary]:.4f} after "
                  f"{last['completions']} completions ({runs[-1]['wall_seconds']:.0f} s)", flush=True)
            report(final=False)
    payload = report(final=True)
    print(f"\n== convergence: {payload['setup']} ==")
    print(format_summary(payload["summary"], runs, task))
    print(f"wrote {args.output} and {args.output.with_suffix('.png')} ({payload['wall_time_s'] / 60:.1f} min)")
    return payload


if __name__ == "__main__":
    main()
