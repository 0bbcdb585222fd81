"""Issue 27's tables in markdown, read from finished result files (nothing trains here).

    python benchmarks/report_tables.py                  # every table of NOTES_issue27.md whose files exist
    python benchmarks/report_tables.py --only sweep     # one section: sweep, heldout, regimes, groups, bands, audit

Sections:

- ``sweep``: the learning-rate sweep on the tuning seeds 0-3 (`results/lr_sweep_facts.json`, written by
  ``convergence.py --lr-sweep``): per method and rate the completions to the shared target, final L and training
  accuracy; then the divergence count per rate (`convergence.divergence`).
- ``heldout``: the existing table (ratio of completions to 25/50/75/90 % of the way on L and on training accuracy,
  paired 95 % bootstrap intervals, CPU-time ratio at 75 %) for each probing run against its fair baseline, each at its
  own best rate (`results/convergence_facts_bestlr.json`, 400 steps, held-out seeds 30-41).
- ``regimes``: the same cells, 75 % and 90 %, for every regime file (`results/convergence_facts_regime_*.json`).
- ``groups``: per regime, the fair baseline's share of all-wrong and all-correct groups at chosen steps (and every
  run's share of completions spent in such groups).
- ``bands``: per regime and starting band (`convergence.REGIME_BANDS`), each method's share of completions and final p.
- ``audit``: the few-revisit tasks' warm starts, intended against measured starting p (issue 27, item 6).
- ``earlier``: the two dynamic-sampling results committed without a command (`convergence_facts_fair.json`,
  `convergence_facts_many.json`), re-analysed with the per-target table.

Bold: the interval excludes 1.
"""

from __future__ import annotations

import common  # noqa: F401,I001  (sets the environment before torch)

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np

import convergence
import facts

RESULTS = Path(__file__).resolve().parent / "results"
SWEEP = RESULTS / "lr_sweep_facts.json"
HELDOUT = RESULTS / "convergence_facts_bestlr.json"
# regime name -> result file (same protocol: each method at its best lr, held-out seeds 42-49, 200 steps)
REGIMES = {
    "never 0.125": RESULTS / "convergence_facts_regime_never0.125.json",
    "never 0.5": RESULTS / "convergence_facts_regime_never0.5.json",
    "never 0.75": RESULTS / "convergence_facts_regime_never0.75.json",
    "nearly solved 0.5": RESULTS / "convergence_facts_regime_solved0.5.json",
}
FEW_REVISIT = [RESULTS / name for name in ("convergence_facts_many.json", "convergence_facts_many_levers.json",
                                            "convergence_facts_many_independent.json")]
METRICS = {"objective": "L", "train_accuracy": "train acc."}
FRACTIONS = ("0.25", "0.5", "0.75", "0.9")


def interval(cell, spec: str = ".2f") -> str:
    """'est [low, high]', bold when the interval excludes 1."""
    estimate, low, high = cell
    text = common.format_interval(estimate, low, high, spec)
    return f"**{text}**" if (low > 1 or high < 1) and not math.isnan(low) else text


def comparison_table(summary: dict, fractions=FRACTIONS, lrs: dict | None = None) -> list[str]:
    """The README's table for every comparison of a result file's summary."""
    head = " | ".join(f"{float(f):.0%}" for f in fractions)
    lines = [f"| run (lr) | fair baseline (lr) | metric | {head} | CPU s to 75 % |",
             "| --- | --- | --- |" + " ---: |" * (len(fractions) + 1)]
    for key, comparison in summary["comparisons"].items():
        label, baseline = key.split(" vs ")[0], comparison["baseline"]
        for metric, name in METRICS.items():
            c = comparison[metric]
            if c.get("target") is None:
                lines.append(f"| `{label}` | `{baseline}` | {name} | {c.get('note')} |")
                continue
            cells = " | ".join(interval(c["targets"][f]["completions"]) for f in fractions)
            cpu = c["targets"].get("0.75", {}).get("train_cpu_seconds")
            lr = (lambda x: f" ({lrs[x]:g})" if lrs and x in lrs else "")
            lines.append(f"| `{label}`{lr(label)} | `{baseline}`{lr(baseline)} | {name} | {cells} | "
                         f"{interval(cpu) if cpu else '-'} |")
    return lines


def finals_line(summary: dict) -> str:
    parts = []
    for label in summary["final"]["objective"]:
        L = summary["final"]["objective"][label]
        acc = summary["final"]["train_accuracy"][label]
        parts.append(f"`{label}` L {common.format_interval(*L, '.3f')}, "
                     f"train acc. {common.format_interval(*acc, '.3f')}")
    return "Final seed means (95 % intervals over seeds): " + "; ".join(parts) + "."


def summary_of(payload: dict, bootstrap: int = 2000) -> dict:
    """The file's summary, recomputed from its runs with this convergence.py when it predates the per-target table."""
    summary = payload["summary"]
    if all("targets" in c.get("objective", {}) for c in summary["comparisons"].values()):
        return summary
    args = convergence.parse_args(["--task", payload["arguments"]["task"], "--bootstrap", str(bootstrap)])
    task = convergence.TASKS[args.task](args)
    return convergence.analyse(payload["runs"], task, args)


AGAINST = ("gvm-grpo", "dynamic-grpo")  # Theorem 3 against skipping the known-dead and known-solved, same probes


def with_against(payload: dict, summary: dict, pair=AGAINST, bootstrap: int = 2000) -> dict:
    """The summary with the paired comparison `pair[0]` vs `pair[1]` added when the file has both and lacks it."""
    key = f"{pair[0]} vs {pair[1]}"
    labels = {r["method"] for r in payload["runs"]}
    if key in summary["comparisons"] or not set(pair) <= labels:
        return summary
    args = convergence.parse_args(["--task", payload["arguments"]["task"], "--bootstrap", str(bootstrap)])
    task = convergence.TASKS[args.task](args)
    by_label = {label: sorted((r for r in payload["runs"] if r["method"] == label), key=lambda r: r["seed"])
                for label in pair}
    comparison = convergence.compare_runs(by_label, pair[0], pair[1], task, args)
    return {**summary, "comparisons": {**summary["comparisons"], key: comparison}}


def run_lrs(payload: dict) -> dict:
    return {r["method"]: r.get("learning_rate", payload["arguments"]["learning_rate"]) for r in payload["runs"]}


def cost_line(payload: dict) -> str:
    by = {}
    for r in payload["runs"]:
        by.setdefault(r["method"], []).append(r["curve"][-1].get("train_cpu_seconds", math.nan))
    return "Training CPU s per run (seed mean): " + ", ".join(f"`{k}` {statistics.fmean(v):.0f}" for k, v in by.items())


# -- sections ---------------------------------------------------------------------------------------------------------


def section_sweep() -> list[str]:
    if not SWEEP.exists():
        return [f"(no {SWEEP.name} yet)"]
    result = json.loads(SWEEP.read_text())
    result["rates"] = [float(r) for r in result["rates"]]
    for method in result["methods"].values():
        method["rates"] = {float(k): v for k, v in method["rates"].items()}
        method["best_rate"] = float(method["best_rate"])
    for family in result["families"].values():
        family["target_from_rate"] = float(family["target_from_rate"])
    lines = ["Completions to the target (seed-mean curve); final L and training accuracy; diverged seeds. **Bold**: "
             "the rate picked.", convergence.format_sweep(result), "",
             "Divergence per rate (diverged seeds of 4; reasons as `convergence.divergence` defines them):", "",
             "| method | " + " | ".join(f"lr {r:g}" for r in result["rates"]) + " |",
             "| --- |" + " --- |" * len(result["rates"])]
    for label, method in result["methods"].items():
        cells = []
        for rate in result["rates"]:
            row = method["rates"].get(rate)
            if row is None:
                cells.append("-")
                continue
            reasons = sorted(set(row["reasons"]))
            cells.append(f"{row['diverged']}/{len(row['seeds'])}" + (f" ({', '.join(reasons)})" if reasons else ""))
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    total = {rate: sum(m["rates"][rate]["diverged"] for m in result["methods"].values() if rate in m["rates"])
             for rate in result["rates"]}
    runs = {rate: sum(len(m["rates"][rate]["seeds"]) for m in result["methods"].values() if rate in m["rates"])
            for rate in result["rates"]}
    lines.append("| all | " + " | ".join(f"{total[r]}/{runs[r]}" for r in result["rates"]) + " |")
    lines.append("")
    lines.append("Best rate per method: "
                 + ", ".join(f"`{k}` {m['best_rate']:g}" for k, m in result["methods"].items()))
    return lines


def section_heldout() -> list[str]:
    if not HELDOUT.exists():
        return [f"(no {HELDOUT.name} yet)"]
    payload = json.loads(HELDOUT.read_text())
    summary = summary_of(payload)
    return [payload["setup"] + ("" if payload.get("complete") else " (INCOMPLETE)"), "",
            *comparison_table(summary, lrs=run_lrs(payload)), "", finals_line(summary), cost_line(payload)]


def _regimes():
    for name, path in REGIMES.items():
        if path.exists():
            yield name, json.loads(path.read_text())


def section_regimes() -> list[str]:
    lines = ["| regime | run (lr) | vs | L 75 % | L 90 % | acc. 75 % | acc. 90 % | CPU s to 75 % of L | final L | "
             "final acc. |", "| --- | --- | --- |" + " ---: |" * 7]
    full = []
    for name, payload in _regimes():
        summary, lrs = with_against(payload, summary_of(payload)), run_lrs(payload)
        for key, comparison in summary["comparisons"].items():
            label, baseline = key.split(" vs ")[0], comparison["baseline"]
            cells = []
            for metric in METRICS:
                c = comparison[metric]
                cells += ([interval(c["targets"][f]["completions"]) for f in ("0.75", "0.9")]
                          if c.get("target") is not None else ["no target", "no target"])
            cpu = comparison["objective"].get("targets", {}).get("0.75", {}).get("train_cpu_seconds")
            finals = [f"{summary['final'][m][label][0]:.3f} vs {summary['final'][m][baseline][0]:.3f}" for m in METRICS]
            lines.append(f"| {name}{'' if payload.get('complete') else ' (incomplete)'} | `{label}` ({lrs[label]:g}) | "
                         f"`{baseline}` ({lrs[baseline]:g}) | " + " | ".join(cells)
                         + f" | {interval(cpu) if cpu else '-'} | " + " | ".join(finals) + " |")
        full += ["", f"**{name}** — {payload['setup']}", "", *comparison_table(summary, lrs=lrs), "",
                 cost_line(payload)]
    return lines + full


GROUP_STEPS = ((0, 10), (45, 55), (95, 105), (-10, None))


def section_groups() -> list[str]:
    lines = ["Share of prompt groups (one per prompt and step, the N′ + B = 8 completions of a uniform run) that "
             "were all wrong / all correct, seed mean over the steps named; last column: share of all completions "
             "that fell in such groups, whole run.", "",
             "| regime | run | steps 1-10 | steps 46-55 | steps 96-105 | last 10 steps | whole run "
             "| completions in them |",
             "| --- | --- |" + " ---: |" * 6]
    for name, payload in _regimes():
        for label, shares in payload["summary"].get("group_outcomes", {}).items():
            def cell(part: slice) -> str:
                wrong, right = shares["all_wrong"][part], shares["all_correct"][part]
                return f"{statistics.fmean(wrong):.2f} / {statistics.fmean(right):.2f}" if wrong else "-"

            cells = [cell(slice(*window)) for window in GROUP_STEPS] + [cell(slice(None))]
            lines.append(f"| {name} | `{label}` | " + " | ".join(cells)
                         + f" | {statistics.fmean(shares['zero_variance_completions']):.2f} |")
    return lines


def regime_levels(payload: dict) -> dict[int, list[float]]:
    """Each seed's intended starting level per prompt, from the file's own task settings."""
    args = convergence.parse_args(["--task", payload["arguments"]["task"]])
    for key, value in payload["arguments"].items():
        if key in ("train_prompts", "never_share", "solved_share", "lowest_rate", "highest_rate", "data_seed"):
            setattr(args, key, value)
    task = convergence.TASKS[args.task](args)
    return {seed: [f.start_rate for f in task.facts_for(seed)] for seed in {r["seed"] for r in payload["runs"]}}


def section_bands() -> list[str]:
    lines = []
    for name, payload in _regimes():
        bands = convergence.fact_bands(payload["runs"], convergence.REGIME_BANDS, regime_levels(payload))
        labels = list(dict.fromkeys(r["method"] for r in payload["runs"]))
        lines += ["", f"**{name}**: share of completions spent on the band, final p (seed means); start p measured",
                  "", "| band (prompts per seed, start p) | " + " | ".join(f"`{x}`" for x in labels) + " |",
                  "| --- |" + " ---: |" * len(labels)]
        for band, row in bands.items():
            if not row["prompts"]:
                continue
            cells = []
            for label in labels:
                m = row["methods"][label]
                share = "-" if m["completion_share"] is None else f"{m['completion_share']:.2f}"
                final = "-" if m["final_rate"] is None else f"{m['final_rate']:.3f}"
                cells.append(f"{share}, {final}")
            lines.append(f"| {band} ({row['prompts']}, {row['start_rate']:.3f}) | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Contribution of each band to L (= −mean ln p over the solvable facts) at the end, seed means: "
                     + "; ".join(f"`{label}` " + ", ".join(f"{band} {value:.3f}" for band, value in
                                                          band_objective(payload, label).items())
                                 for label in labels))
    return lines


def band_objective(payload: dict, label: str) -> dict[str, float]:
    """Per band, its share of the final L: −Σ_{i in band} ln p_i / (number of solvable facts), seed mean."""
    levels = regime_levels(payload)
    out: dict[str, list[float]] = {}
    for r in (r for r in payload["runs"] if r["method"] == label):
        rates = r["curve"][-1]["rates"]
        solvable = [i for i, level in enumerate(levels[r["seed"]]) if level > 0]
        for band in convergence.REGIME_BANDS:
            if band == "never":
                continue
            members = [i for i in solvable
                       if convergence.fact_band(levels[r["seed"]][i], convergence.REGIME_BANDS) == band]
            if members:
                value = -sum(math.log(max(rates[i], 1e-12)) for i in members) / len(solvable)
                out.setdefault(band, []).append(value)
    return {band: statistics.fmean(values) for band, values in out.items()}


def section_audit() -> list[str]:
    """Intended vs measured starting p of the few-revisit tasks, per seed (one row per task and seed)."""
    lines = ["| task (file) | seed | corr. intended vs measured p (solvable) | mean measured p by intended band: "
             "never / rare / middle / easy (intended 0 / 0.05 / 0.24 / 0.72) | measured p: median, 90th pct, max | "
             "never-solved facts at p < 1e-3 |", "| --- | ---: | ---: | --- | --- | ---: |"]
    for path in FEW_REVISIT:
        if not path.exists():
            continue
        payload = json.loads(path.read_text())
        levels = regime_levels(payload)
        seen = set()
        for r in payload["runs"]:
            if r["seed"] in seen:
                continue
            seen.add(r["seed"])
            intended, measured = np.array(levels[r["seed"]]), np.array(r["curve"][0]["rates"])
            solvable = intended > 0
            corr = np.corrcoef(intended[solvable], measured[solvable])[0, 1]
            means = []
            for band in convergence.FACT_BANDS:
                members = np.array([convergence.fact_band(x) == band for x in intended])
                means.append(f"{measured[members].mean():.3f}")
            never_low = (measured[~solvable] < 1e-3).mean()
            lines.append(f"| {payload['arguments']['task']} ({path.name}) | {r['seed']} | {corr:.2f} | "
                         f"{' / '.join(means)} | {np.median(measured):.3f}, {np.quantile(measured, 0.9):.3f}, "
                         f"{measured.max():.3f} | {never_low:.2f} |")
    return lines


def section_earlier() -> list[str]:
    """The two earlier dynamic-sampling results that had no command (now in fair_evidence.sh), re-analysed."""
    lines = []
    for name in ("convergence_facts_fair.json", "convergence_facts_many.json"):
        payload = json.loads((RESULTS / name).read_text())
        summary = summary_of(payload)
        lines += ["", f"**{name}** — {payload['setup']}", "", *comparison_table(summary), "", finals_line(summary),
                  cost_line(payload)]
    return lines


SECTIONS = {"sweep": section_sweep, "heldout": section_heldout, "regimes": section_regimes, "groups": section_groups,
            "bands": section_bands, "audit": section_audit,
            "earlier": section_earlier}


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=list(SECTIONS), action="append")
    args = parser.parse_args(argv)
    text = []
    for name in args.only or SECTIONS:
        text += [f"\n### {name}\n", *SECTIONS[name]()]
    out = "\n".join(text)
    print(out)
    return out


if __name__ == "__main__":
    main()
