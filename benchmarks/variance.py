"""Gradient error at equal total completions: GVM's allocation and estimates against the uniform split.

What is measured
----------------
For m prompts with accept rates p_i, the EM gradient is g* = Σ_i E_{Q_i} ∇ ln P(y | x_i) (Theorem 4's objective; a
never-solved prompt contributes 0). Each method spends the same number of completions per step, m·(N′ + B):

- ``uniform``: N′ + B draws per prompt, Algorithm 1's 1/|D_i| (= Lemma 1 with p̂ from the same draws): the practical
  baseline every ratio refers to;
- ``gvm[N'=.., lemma1|mean, explore=k, history=Vx,decay=λ]``: N′ probes per prompt, the estimates (p̂, Ĝ) —
  combined with V earlier visits by `PromptHistory(λ)` when a history is kept — `allocate_budget(p̂, Ĝ, B·m,
  explore_samples=k)`, the probes reused, Lemma 1's weight with the estimate the allocation used (``lemma1``) or
  with the pooled one (``mean`` = 1/|D_i|) (see `allocation_sim.py`);
- references with the true p_i (Lemma 1 unbiased, exact MSE): ``uniform-true-p``, ``oracle`` (Theorem 3 from the
  true p_i, G_i), ``optimal`` (the exact minimiser of Lemma 1's variance).

The error is E‖ĝ − g*‖² (variance + bias²: a prompt left without an accepted draw is missing from ĝ), by Monte
Carlo over `--replicates` replicates, reported as a ratio to ``uniform`` (< 1: GVM better; the issue's goal is
≤ 0.7) and against ‖g*‖² (the error of ĝ = 0).

Populations (``--population``):

- ``real`` (default): a pool of `--pool-size` SmolLM2-135M-Instruct completions for each of `--num-prompts`
  arithmetic prompts (`gradient_pool.py`: exact per-sample gradients of the last MLP's down-projection, CountSketched),
  cached at `--pool`; the pool is the true distribution. Also: how the result depends on the share of rare-success
  prompts (subsets of the pool with a given number of prompts with 0 < p ≤ `--rare-below`).
- ``gradlogp``: softmax policies whose mean accepted gradient is ∇ ln p_i (it shrinks as p_i → 1), with a share
  `--never-share` of never-solved prompts; also the dependence on that share.
- ``gaussian``: accepted gradients μ_i + σ_i ε whose size does not depend on p_i; checks of the machinery (Monte
  Carlo against the exact MSE, Lemma 2's bound) and the probe sweep (the probe allocation → the oracle's as N′
  grows).

§3 of the issue, at B = `--option-budget`: the exploration floor, the prompt history (V earlier visits of the same
prompts, decay λ; the population does not drift between visits, so this is the stationary case) and the weighting.

    python benchmarks/variance.py --quick                       # smoke test: tiny random model, toy verifier
    python benchmarks/variance.py                               # real: 48 SmolLM2 prompts (~40 min to build the pool)
    python benchmarks/variance.py --population gradlogp
    python benchmarks/variance.py --population gaussian
    python benchmarks/variance.py --population gradlogp --levers --option-probes 4   # issue 17's levers only
"""

from __future__ import annotations

from common import RESULTS_DIR, limit_threads, pyplot, save_figure, write_json  # noqa: I001 (sets the environment)

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import allocation_sim as sim
from gradient_pool import GradientPool, build_pool
from gvm_trl.allocation import variance_bound
from gvm_trl.models import DEMO_MODEL

ALPHA, BETA = 1e-3, 2.0
ALPHA_TO_ZERO = 1e-12  # stands in for α → 0 (Lemma 2's bound)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the experiments --------------------------------------------------------------------------------------------------


def practical_comparison(population, probes: int, budget_per_prompt: float, settings, replicates: int, rng) -> dict:
    """Uniform (1/|D_i|) and the given GVM settings at m·(N′ + B) completions each, with the true-p references."""
    m = population.size
    phase2, total = int(budget_per_prompt * m), int((budget_per_prompt + probes) * m)
    uniform = sim.fixed_estimators(population, sim.uniform_sizes(population, total, replicates), rng)
    methods = {"uniform": sim.error_summary(population, uniform["mean"]),
               "uniform-true-p": sim.error_summary(population, uniform["true-p"])}
    for name, sizes in (("oracle", sim.oracle_sizes(population, total, ALPHA, BETA)),
                        ("optimal", sim.optimal_sizes(population, total))):
        methods[name] = sim.error_summary(population, sim.fixed_estimators(
            population, np.broadcast_to(sizes, (replicates, m)), rng)["true-p"])
        methods[name]["exact_mse"] = population.exact_mse(sizes)
    methods["uniform-true-p"]["exact_mse"] = population.exact_mse(sim.uniform_sizes(population, total, 1)[0])
    starved = {}
    for setting in settings:
        outcome = sim.simulate_gvm(population, phase2, setting, replicates, rng, ALPHA, BETA)
        methods[setting.label] = {**sim.error_summary(population, outcome.coefficients), "uniform_fallbacks": outcome.fallbacks}
        solvable = population.rates > 0
        starved[setting.label] = float(((outcome.sizes == 0) & solvable).sum(1).mean())  # solvable prompts with n_i = 0
    baseline, unbiased = methods["uniform"]["mse"], methods["uniform-true-p"]["exact_mse"]
    target = population.target()
    zero = float(target @ population.gram @ target)
    for entry in methods.values():
        entry["ratio_to_uniform"] = entry["mse"] / baseline
        entry["over_target_norm_sq"] = entry["mse"] / zero if zero > 0 else math.nan
        if "exact_mse" in entry:  # the unbiased references against each other: Theorem 3's claim
            entry["exact_ratio_to_uniform_true_p"] = entry["exact_mse"] / unbiased
    return {"probes": probes, "budget_per_prompt": budget_per_prompt, "completions": total, "methods": methods,
            "solvable_prompts_starved": starved}


def budget_table(population, args, rng) -> list[dict]:
    rows = []
    for budget in args.budgets_per_prompt:
        for probes in args.probes:
            settings = [sim.GVMSetting(probes, weighting) for weighting in ("lemma1", "mean")]
            rows.append(practical_comparison(population, probes, budget, settings, args.replicates, rng))
            log(f"B = {budget}, N′ = {probes}: done")
    return rows


def option_settings(probes: int) -> list[sim.GVMSetting]:
    """The §3 options, one at a time and combined, each with both weightings."""
    base = [dict(), dict(explore=1), dict(explore=2), dict(decay=1.0, history_visits=3),
            dict(decay=0.5, history_visits=3), dict(decay=1.0, history_visits=7),
            dict(decay=1.0, history_visits=3, explore=1)]
    return [sim.GVMSetting(probes, weighting, **options) for options in base for weighting in ("lemma1", "mean")]


def lever_settings(probes: int) -> list[sim.GVMSetting]:
    """Issue 17's levers against the starvation bias, with 1/|D_i| (the default weighting): the posterior floor on p
    (median, and a 0.9 upper bound), the prior fitted to the batch, Theorem 3 with G ≡ 1, G ≡ 1 with the floor, and
    the exploration floor for comparison."""
    base = [dict(), dict(rate_floor=0.5), dict(rate_floor=0.9), dict(rate_prior="batch"), dict(grad_norms="constant"),
            dict(grad_norms="constant", rate_floor=0.5), dict(explore=1)]
    return [sim.GVMSetting(probes, "mean", **options) for options in base]


def options_table(population, args, rng) -> list[dict]:
    rows = []
    for probes in args.option_probes:
        rows.append(practical_comparison(population, probes, args.option_budget, option_settings(probes),
                                         args.replicates, rng))
        log(f"options at N′ = {probes}: done")
    return rows


def rare_share_sweep(population, args, rng) -> dict:
    """GVM / uniform on subsets of `--subset-size` prompts holding k rare-success prompts (0 < p ≤ rare_below), the
    rest drawn from the others (never-solved ones included, at their share), `--subsets` subsets per k."""
    rates = population.rates
    rare = np.flatnonzero((rates > 0) & (rates <= args.rare_below))
    others = np.flatnonzero((rates == 0) | (rates > args.rare_below))
    size = min(args.subset_size, population.size)
    settings = [sim.GVMSetting(args.option_probes[0], w) for w in ("lemma1", "mean")]
    rows = []
    for count in sorted({k for k in args.rare_counts if k <= len(rare) and size - k <= len(others)}):
        ratios = {s.label: [] for s in settings}
        shares = []
        for _ in range(args.subsets):
            chosen = np.concatenate([rng.choice(rare, count, replace=False),
                                     rng.choice(others, size - count, replace=False)])
            subset = population.subset(chosen.tolist())
            result = practical_comparison(subset, args.option_probes[0], args.option_budget, settings,
                                          max(args.replicates // 4, 50), rng)
            shares.append(count / size)
            for s in settings:
                ratios[s.label].append(result["methods"][s.label]["ratio_to_uniform"])
        rows.append({"rare_prompts": count, "share": count / size,
                     "ratio_to_uniform": {k: {"mean": float(np.mean(v)), "min": float(np.min(v)),
                                              "max": float(np.max(v))} for k, v in ratios.items()}})
        log(f"rare share {count}/{size}: done")
    return {"subset_size": size, "rare_below": args.rare_below, "available_rare": int(len(rare)), "rows": rows}


def never_share_sweep(args, rng) -> list[dict]:
    """gradlogp populations with more and more never-solved prompts: GVM / uniform at the option budget."""
    rows = []
    for share in args.never_shares:
        population = sim.gradlogp_population(args.num_prompts, args.seed, never_share=share)
        settings = [sim.GVMSetting(args.option_probes[0], w) for w in ("lemma1", "mean")]
        result = practical_comparison(population, args.option_probes[0], args.option_budget, settings,
                                      args.replicates, rng)
        rows.append({"never_share": share, "ratio_to_uniform": {
            s.label: result["methods"][s.label]["ratio_to_uniform"] for s in settings},
            "oracle_exact_ratio_to_uniform_true_p": result["methods"]["oracle"]["exact_ratio_to_uniform_true_p"]})
        log(f"never share {share}: done")
    return rows


def drift_sweep(args, rng) -> list[dict]:
    """History under a policy that learns between visits: gradlogp prompts whose accept logit rises by δ per visit
    (the last visit is the measured one), V = `--drift-visits` earlier visits kept with decay λ, against no history
    and against uniform, at the option budget."""
    rows = []
    probes, visits = args.option_probes[0], args.drift_visits
    for step in args.drift_steps:
        populations = [sim.gradlogp_population(args.num_prompts, args.seed, never_share=args.never_share,
                                               logit_shift=step * (visit - visits)) for visit in range(visits + 1)]
        settings = [sim.GVMSetting(probes, w) for w in ("lemma1", "mean")] + [
            sim.GVMSetting(probes, w, decay=decay, history_visits=visits) for w in ("lemma1", "mean")
            for decay in args.drift_decays]
        result = practical_comparison(populations[-1], probes, args.option_budget, [], args.replicates, rng)
        uniform = result["methods"]["uniform"]["mse"]
        ratios = {}
        for setting in settings:
            outcome = sim.simulate_gvm(populations[-1], int(args.option_budget * args.num_prompts), setting,
                                       args.replicates, rng, ALPHA, BETA, earlier=populations[:-1])
            ratios[setting.label] = sim.error_summary(populations[-1], outcome.coefficients)["mse"] / uniform
        rows.append({"logit_step_per_visit": step, "ratio_to_uniform": ratios,
                     "mean_rate_first_visit": float(populations[0].rates.mean()),
                     "mean_rate_measured_visit": float(populations[-1].rates.mean())})
        log(f"drift {step}: done")
    return rows


def machinery_checks(population, args, rng) -> dict:
    """Monte Carlo vs exact MSE and the exact MSE under Lemma 2's bound (uniform and oracle sizes, α → 0 too), and
    how far the allocation from N′ probes is from the oracle's as N′ grows."""
    m, replicates = population.size, args.replicates
    rms = population.moments()["rms_norm"]
    checks = {"mc_over_exact": [], "exact_over_lemma2": []}
    for budget in args.budgets_per_prompt:
        total = int(budget * m)
        for sizes in (sim.uniform_sizes(population, total, 1)[0], sim.oracle_sizes(population, total, ALPHA_TO_ZERO)):
            mc = sim.error_summary(population, sim.fixed_estimators(
                population, np.broadcast_to(sizes, (replicates, m)), rng)["true-p"])["mse"]
            exact = population.exact_mse(sizes)
            bound = variance_bound(population.rates, rms, sizes, alpha=ALPHA_TO_ZERO, beta=BETA)
            checks["mc_over_exact"].append(round(mc / exact, 3))
            checks["exact_over_lemma2"].append(round(exact / bound, 3) if math.isfinite(bound) else None)
    sweep = []
    for probes in (p for p in args.sweep_probes if p < args.sweep_budget):
        phase2 = int((args.sweep_budget - probes) * m)
        oracle = sim.oracle_sizes(population, phase2, ALPHA, BETA)
        outcome = sim.simulate_gvm(population, phase2, sim.GVMSetting(probes), max(replicates // 4, 50), rng,
                                   ALPHA, BETA)
        shares = outcome.sizes / np.maximum(outcome.sizes.sum(1, keepdims=True), 1)
        distance = 0.5 * np.abs(shares - oracle / oracle.sum()).sum(1).mean()
        sweep.append({"probes": probes, "tv_to_oracle": float(distance),
                      "starved_fraction": float(((outcome.sizes == 0) & (population.rates > 0)).any(1).mean())})
    checks["probe_sweep"] = sweep
    checks["tv_to_oracle_decreases"] = bool(sweep[-1]["tv_to_oracle"] < sweep[0]["tv_to_oracle"])
    return checks


# -- populations ------------------------------------------------------------------------------------------------------


def real_population(args) -> sim.Population:
    if args.pool.exists():
        pool = GradientPool.load(args.pool)
        log(f"loaded the pool {args.pool} ({len(pool.accepted)} prompts)")
    else:
        pool = build_pool(model_name=args.model, dataset_name=args.dataset, num_prompts=args.num_prompts,
                          pool_size=args.pool_size, screen_samples=args.screen_samples,
                          screen_candidates=args.screen_candidates, max_unsolved=args.max_unsolved,
                          max_new_tokens=args.max_new_tokens, layer=args.layer, sketch_dim=args.sketch_dim,
                          seed=args.seed, quick=args.quick)
        pool.save(args.pool)
        log(f"saved the pool to {args.pool}")
    if len(pool.gram) == 0:
        raise SystemExit("no completion of any prompt was accepted: nothing to estimate")
    return sim.Population.from_pool(pool)


def make_population(args) -> sim.Population:
    if args.population == "real":
        return real_population(args)
    if args.population == "gradlogp":
        return sim.gradlogp_population(args.num_prompts, args.seed, never_share=args.never_share)
    return sim.gaussian_population(args.num_prompts, args.dim, args.seed)


# -- report -----------------------------------------------------------------------------------------------------------


def fmt(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x:.4g}"


def print_comparison(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    for row in rows:
        print(f"N′ = {row['probes']}, B = {row['budget_per_prompt']:g} ({row['completions']} completions):")
        for name, entry in row["methods"].items():
            extra = (f", exact {fmt(entry['exact_mse'])} = {entry['exact_ratio_to_uniform_true_p']:.3f}× "
                     "uniform-true-p's" if "exact_mse" in entry else "")
            starved = row["solvable_prompts_starved"].get(name)
            starved = f", solvable prompts with n_i = 0: {starved:.2f}" if starved is not None else ""
            print(f"  {name:44s} MSE {fmt(entry['mse'])} ± {fmt(entry['mse_se'])} ({entry['ratio_to_uniform']:.3f}× "
                  f"uniform, {entry['over_target_norm_sq']:.2f}× ‖g*‖²; var {fmt(entry['variance'])} + bias² "
                  f"{fmt(entry['bias2'])}{extra}){starved}")


def print_report(results: dict) -> None:
    population = results["population"]
    print(f"population: {population['description']}")
    print(f"accept rates p_i: {population['accept_rates']}")
    print(f"‖g*‖² = {fmt(results['target_norm_sq'])} (the MSE of ĝ = 0); "
          f"{results['config']['replicates']} replicates")
    print_comparison(results["budget_table"],
                     "E‖ĝ − g*‖² at equal total completions m·(N′ + B), ratio to uniform (1/|D_i|)")
    print_comparison(results["options"], "§3 options (exploration floor, history, weighting)")
    if results.get("rare_share"):
        sweep = results["rare_share"]
        print(f"\nrare-success share (0 < p ≤ {sweep['rare_below']}; {sweep['available_rare']} such prompts), "
              f"subsets of {sweep['subset_size']}: GVM / uniform, mean [min, max] over subsets")
        for row in sweep["rows"]:
            cells = "  ".join(f"{k}: {v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]"
                              for k, v in row["ratio_to_uniform"].items())
            print(f"  {row['rare_prompts']:2d} rare ({row['share']:.2f}): {cells}")
    if results.get("never_share"):
        print("\nnever-solved share: GVM / uniform")
        for row in results["never_share"]:
            cells = "  ".join(f"{k}: {v:.3f}" for k, v in row["ratio_to_uniform"].items())
            print(f"  {row['never_share']:.3f}: {cells}  (oracle / uniform-true-p, exact: "
                  f"{row['oracle_exact_ratio_to_uniform_true_p']:.3f})")
    if results.get("drift"):
        print(f"\nhistory while the policy learns (accept logit +δ per visit, {results['config']['drift_visits']} "
              "earlier visits): GVM / uniform at the measured visit")
        for row in results["drift"]:
            cells = "  ".join(f"{k[4:-1]}: {v:.3f}" for k, v in row["ratio_to_uniform"].items())
            print(f"  δ = {row['logit_step_per_visit']:g} (mean p {row['mean_rate_first_visit']:.2f} → "
                  f"{row['mean_rate_measured_visit']:.2f}): {cells}")
    if results.get("checks"):
        print(f"\nchecks: {results['checks']}")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    panels = ["budget", "options"] + [k for k in ("rare_share", "never_share") if results.get(k)]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    axis = axes[0][0]
    table = results["budget_table"]
    probes = sorted({row["probes"] for row in table})
    reference_probes = probes[len(probes) // 2]
    names = list(dict.fromkeys(name for row in table for name in row["methods"]))
    for name in (n for n in names if n not in ("uniform", "uniform-true-p")):
        is_gvm = name.startswith("gvm")
        rows = [row for row in table if name in row["methods"] and (is_gvm or row["probes"] == reference_probes)]
        label = name if is_gvm else f"{name} (true p, N′ + B = {reference_probes} + B)"
        axis.plot([row["budget_per_prompt"] for row in rows],
                  [row["methods"][name]["ratio_to_uniform"] for row in rows],
                  marker="o", linestyle="-" if is_gvm else ":", label=label)
    budgets = sorted({row["budget_per_prompt"] for row in table})
    axis.set_xscale("log")
    axis.set_xticks(budgets, [f"{b:g}" for b in budgets])
    axis.tick_params(axis="x", which="minor", labelbottom=False)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.axhline(0.7, color="grey", linestyle="--", linewidth=0.8, label="goal 0.7")
    axis.set(yscale="log", xlabel="allocated completions per prompt B (plus N′ probes; uniform: N′ + B)",
             ylabel="E‖ĝ − g*‖² / uniform's", title="equal total completions")
    axis.legend(fontsize=6)
    axis = axes[0][1]
    row = results["options"][0]
    names = [n for n in row["methods"] if n.startswith("gvm")]
    axis.barh(range(len(names)), [row["methods"][n]["ratio_to_uniform"] for n in names], color="tab:blue")
    axis.set_yticks(range(len(names)), [n[4:-1] for n in names], fontsize=6)
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.axvline(0.7, color="grey", linestyle="--", linewidth=0.8)
    axis.set(xlabel="E‖ĝ − g*‖² / uniform's",
             title=f"options, N′ = {row['probes']}, B = {row['budget_per_prompt']:g}")
    column = 2
    if results.get("rare_share"):
        axis = axes[0][column]
        column += 1
        rows = results["rare_share"]["rows"]
        for name in rows[0]["ratio_to_uniform"]:
            ratio = [r["ratio_to_uniform"][name] for r in rows]
            axis.errorbar([r["share"] for r in rows], [x["mean"] for x in ratio],
                          yerr=[[x["mean"] - x["min"] for x in ratio], [x["max"] - x["mean"] for x in ratio]],
                          marker="o", capsize=3, label=name)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set(xlabel="share of rare-success prompts", ylabel="GVM / uniform", title="rare-success share")
        axis.legend(fontsize=7)
    if results.get("never_share"):
        axis = axes[0][column]
        rows = results["never_share"]
        for name in rows[0]["ratio_to_uniform"]:
            axis.plot([r["never_share"] for r in rows], [r["ratio_to_uniform"][name] for r in rows], marker="o",
                      label=name)
        axis.plot([r["never_share"] for r in rows], [r["oracle_exact_ratio_to_uniform_true_p"] for r in rows],
                  marker="s", linestyle=":", label="oracle / uniform, true p (exact)")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set(xlabel="share of never-solved prompts", ylabel="GVM / uniform", title="never-solved share")
        axis.legend(fontsize=7)
    save_figure(figure, path, results["population"]["description"])


# -- command line -----------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--population", choices=("real", "gradlogp", "gaussian"), default="real")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--model", default=DEMO_MODEL, help="real: the embedded demo model, a local path or a Hub id")
    parser.add_argument("--dataset", default="arithmetic", choices=["arithmetic", "gsm8k", "math"])
    parser.add_argument("--num-prompts", type=int, help="m (default 48; quick 6)")
    parser.add_argument("--pool", type=Path, help="real: the pool's cache (.npz), built there if missing")
    parser.add_argument("--pool-size", type=int, help="real: completions per prompt (default 128; quick 16)")
    parser.add_argument("--screen-samples", type=int, help="real: screening draws per candidate (default 8; quick 4)")
    parser.add_argument("--screen-candidates", type=int, help="real: candidate prompts at most (default 5m)")
    parser.add_argument("--max-unsolved", type=int, help="real: prompts kept without an accepted screening draw (m/3)")
    parser.add_argument("--max-new-tokens", type=int, help="real: default 28 for arithmetic, 256 otherwise; quick 12")
    parser.add_argument("--layer", type=int, default=-1, help="real: the decoder layer whose mlp.down_proj is used")
    parser.add_argument("--sketch-dim", type=int, default=2**16, help="real: CountSketch size (0: exact gradients)")
    parser.add_argument("--budgets-per-prompt", type=float, nargs="+", help="B values (default 2 4 8 16 32)")
    parser.add_argument("--probes", type=int, nargs="+", help="N′ values (default 2 4 8)")
    parser.add_argument("--option-budget", type=float, default=4, help="B of the §3 options table")
    parser.add_argument("--option-probes", type=int, nargs="+", help="N′ of the §3 options table (default 4 8)")
    parser.add_argument("--replicates", type=int, help="replicates per cell (default 2000; quick 60)")
    parser.add_argument("--rare-below", type=float, default=0.05, help="real: rare success means 0 < p ≤ this")
    parser.add_argument("--rare-counts", type=int, nargs="+", default=[0, 2, 4, 6, 8, 12])
    parser.add_argument("--subset-size", type=int, default=24)
    parser.add_argument("--subsets", type=int, help="subsets per rare count (default 8; quick 2)")
    parser.add_argument("--never-share", type=float, default=0.125, help="gradlogp: share of never-solved prompts")
    parser.add_argument("--never-shares", type=float, nargs="+", default=[0.0, 0.125, 0.25, 0.5])
    parser.add_argument("--drift-steps", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0],
                        help="gradlogp: rise of each prompt's accept logit per visit")
    parser.add_argument("--drift-decays", type=float, nargs="+", default=[1.0, 0.7, 0.5, 0.3])
    parser.add_argument("--drift-visits", type=int, default=4, help="gradlogp: earlier visits in the drift sweep")
    parser.add_argument("--dim", type=int, default=256, help="gaussian: gradient dimension")
    parser.add_argument("--sweep-budget", type=float, default=16, help="gaussian: N′ + B of the probe sweep")
    parser.add_argument("--sweep-probes", type=int, nargs="+", help="gaussian: N′ of the probe sweep (2 4 8 12)")
    parser.add_argument("--levers", action="store_true",
                        help="only the table of issue 17's levers (posterior floor, G ≡ 1) at --option-budget and "
                             "--option-probes; writes variance_levers[_population].json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="JSON path; the plot goes next to it as .png")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "num_prompts": 6 if quick else 48,
        "pool_size": 16 if quick else 128,
        "max_new_tokens": 12 if quick else (28 if args.dataset == "arithmetic" else 256),
        "budgets_per_prompt": [2, 4] if quick else [2, 4, 8, 16, 32],
        "probes": [2] if quick else [2, 4, 8],
        "option_probes": [2] if quick else [4, 8],
        "replicates": 60 if quick else 2000,
        "subsets": 2 if quick else 8,
        "sweep_probes": [2, 8] if quick else [2, 4, 8, 12],
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.screen_samples = args.screen_samples or min(4 if quick else 8, args.pool_size)
    args.screen_candidates = args.screen_candidates or 5 * args.num_prompts
    args.max_unsolved = args.num_prompts // 3 if args.max_unsolved is None else args.max_unsolved
    if quick:
        args.dim = min(args.dim, 32)
        args.rare_counts = [0, 1]
        args.subset_size = 4
        args.never_shares = [0.0, 0.5]
        args.drift_steps, args.drift_decays, args.drift_visits = [0.0, 1.0], [0.5], 2
    suffix = "" if args.population == "real" else f"_{args.population}"
    name = "variance_levers" if args.levers else "variance"
    args.output = args.output or RESULTS_DIR / f"{name}{suffix}{'_quick' if quick else ''}.json"
    if args.pool is None:
        name = "quick" if quick else f"{Path(str(args.model)).name}_m{args.num_prompts}_n{args.pool_size}_s{args.seed}"
        args.pool = Path("/tmp/gvm_trl_bench") / f"variance_pool_{name}.npz"
    return args


def describe(population: sim.Population, args) -> str:
    if args.population == "real":
        info = population.info
        return (f"{info.get('model', '?')}, {population.size} {info.get('dataset', '')} prompts, pool of "
                f"{args.pool_size} each; gradients of {info.get('parameter_subset', '?')}")
    if args.population == "gradlogp":
        return (f"gradlogp: {population.size} softmax prompts, mean accepted gradient ∇ ln p_i, "
                f"{args.never_share:.3f} never solved, p log-uniform in [0.02, 0.98]")
    return f"gaussian: {population.size} prompts, g = μ_i + σ_i ε in {args.dim} dimensions, p geometric in [0.03, 1]"


def main(argv=None) -> dict:
    args = parse_args(argv)
    limit_threads("cpu")
    started = time.perf_counter()
    population = make_population(args)
    rng = np.random.default_rng(args.seed + 1)
    target = population.target()
    results = {
        "population": {"description": describe(population, args), "accept_rates": population.rates.round(4).tolist(),
                       "moments": {k: v.round(4).tolist() for k, v in population.moments().items()},
                       "info": population.info},
        "target_norm_sq": float(target @ population.gram @ target),
    }
    if args.levers:
        results["levers"] = [practical_comparison(population, probes, args.option_budget, lever_settings(probes),
                                                  args.replicates, rng) for probes in args.option_probes]
        results["config"] = vars(args)
        results["runtime_s"] = round(time.perf_counter() - started, 1)
        print_comparison(results["levers"], "issue 17's levers, 1/|D_i| weights: variance + bias² against uniform's")
        write_json(args.output, results)
        print(f"\nwrote {args.output} ({results['runtime_s']} s)")
        return results
    results["budget_table"] = budget_table(population, args, rng)
    results["options"] = options_table(population, args, rng)
    if args.population == "real":
        results["rare_share"] = rare_share_sweep(population, args, rng)
    if args.population == "gradlogp":
        results["rare_share"] = rare_share_sweep(population, args, rng)
        results["never_share"] = never_share_sweep(args, rng)
        results["drift"] = drift_sweep(args, rng)
    if args.population == "gaussian":
        results["checks"] = machinery_checks(population, args, rng)
    results["config"] = vars(args)
    results["runtime_s"] = round(time.perf_counter() - started, 1)
    results["platform"] = {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads()}
    print_report(results)
    write_json(args.output, results)
    plot(results, args.output.with_suffix(".png"))
    print(f"\nwrote {args.output} and {args.output.with_suffix('.png')} ({results['runtime_s']} s)")
    return results


if __name__ == "__main__":
    main()
