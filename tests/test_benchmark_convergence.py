"""benchmarks/convergence.py and its facts task: the exact objective, the warm start, the analysis and --quick."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import benchmark_modules


@pytest.fixture(scope="module")
def benchmarks():
    """The benchmark scripts as modules (they import each other as siblings, as when run from their folder)."""
    with benchmark_modules("common", "facts", "convergence") as modules:
        yield modules


def test_exact_objective_matches_enumeration_and_sampling(benchmarks):
    facts = benchmarks["facts"]
    task_facts = facts.make_facts(6, seed=1)
    model, tokenizer = facts.warm_started_policy(task_facts, steps=60)
    exact = facts.accept_probabilities(model, tokenizer, task_facts)

    # Brute force: every two-token completion as its own sequence, graded by the reward function on its text.
    vocab = len(tokenizer)
    pairs = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))
    for fact, p in zip(task_facts[:3], exact):
        prompt = facts.encode_prompts(tokenizer, [facts.question(fact)])[0]
        sequences = torch.cat([prompt.expand(len(pairs), -1), pairs], dim=1)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=sequences).logits.double(), dim=-1)
        n = len(prompt)
        first = logp[:, n - 1].gather(1, pairs[:, :1])[:, 0]
        second = logp[:, n].gather(1, pairs[:, 1:])[:, 0]
        ends = pairs[:, 0] == tokenizer.eos_token_id  # generation stops at EOS: the second token never comes
        texts = tokenizer.batch_decode([[a] if e else [a, b] for (a, b), e in zip(pairs.tolist(), ends)],
                                       skip_special_tokens=True)
        rewards = torch.tensor(facts.fact_reward(texts, [fact.answer] * len(texts)), dtype=torch.float64)
        enumerated = (torch.exp(first + torch.where(ends, 0.0, second)) * rewards).sum()
        assert float(enumerated) == pytest.approx(float(p), rel=1e-9, abs=1e-12)

    # Sampling as the trainer samples (temperature 1, no top-k/top-p) agrees within 4 standard errors.
    best = int(torch.argmax(torch.where(exact < 0.9, exact, torch.zeros_like(exact))))
    prompt = facts.encode_prompts(tokenizer, [facts.question(task_facts[best])])
    torch.manual_seed(0)
    out = model.generate(input_ids=prompt.expand(4000, -1), attention_mask=torch.ones(4000, prompt.shape[1]),
                         do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=2,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, prompt.shape[1]:], skip_special_tokens=True)
    sampled = sum(facts.fact_reward(texts, [task_facts[best].answer] * len(texts))) / len(texts)
    p = float(exact[best])
    assert abs(sampled - p) < 4 * math.sqrt(p * (1 - p) / len(texts)) + 1e-3


def test_warm_start_gives_the_intended_spread(benchmarks):
    facts, convergence = benchmarks["facts"], benchmarks["convergence"]
    args = convergence.parse_args([])
    task_facts = facts.make_facts(args.train_prompts, seed=0, never_share=args.never_share)
    model, tokenizer = facts.warm_started_policy(task_facts, steps=args.warm_start_steps)
    rates = facts.accept_probabilities(model, tokenizer, task_facts)
    heldout = facts.accept_probabilities(model, tokenizer, task_facts, facts.HELDOUT_PHRASING)
    targets = torch.tensor([f.start_rate for f in task_facts], dtype=torch.float64)
    never = targets == 0
    assert never.sum() == round(args.never_share * args.train_prompts)
    assert rates[never].max() < 1e-4
    solvable = rates[~never]
    assert solvable.min() < 0.04 and solvable.max() > 0.9
    # Each solvable fact starts within a factor 1.5 of the rate it was warm-started for, in both phrasings.
    for measured in (rates, heldout):
        assert (measured[~never] / targets[~never]).log().abs().max() < math.log(1.5)


def test_many_facts_have_distinct_multi_character_keys_and_families(benchmarks):
    facts = benchmarks["facts"]
    many = facts.make_facts(1024, seed=0, key_length=2)
    assert len({f.key for f in many}) == 1024 and all(len(f.key) == 2 for f in many)
    assert sum(f.start_rate == 0 for f in many) == 128
    solvable = sorted(f.start_rate for f in many if f.start_rate > 0)
    assert solvable[0] == pytest.approx(0.02) and solvable[-1] == pytest.approx(0.98)
    drift = facts.make_facts(1024, seed=0, key_length=2, families=True)
    assert [f.key for f in drift] == [f.key for f in many]
    family, level = {}, {}
    for f in drift:  # first character: answer and rationale; last character: starting level
        assert family.setdefault(f.key[0], (f.answer, f.rationale)) == (f.answer, f.rationale)
        assert level.setdefault(f.key[1], f.start_rate) == f.start_rate
    assert len(set(family.values())) > 10 and len(set(level.values())) == 43  # 6 never-solved characters share 0
    assert sorted(level.values())[6] == pytest.approx(0.02) and max(level.values()) == pytest.approx(0.98)
    assert len({(f.answer, f.rationale) for f in many if f.key[0] == many[0].key[0]}) > 1  # without families: not
    with pytest.raises(ValueError, match="families needs key_length >= 2"):
        facts.make_facts(8, seed=0, families=True)
    with pytest.raises(ValueError, match="2304 keys of 2 characters"):
        facts.make_facts(3000, seed=0, key_length=2)


def test_fast_paths_agree_with_the_full_forward(benchmarks):
    facts = benchmarks["facts"]
    task_facts = facts.make_facts(24, seed=2, key_length=2, families=True)
    model, tokenizer = facts.warm_started_policy(task_facts, steps=30, batch_size=16)
    full = facts.accept_probabilities(model, tokenizer, task_facts)
    fast = facts.accept_probabilities(model, tokenizer, task_facts, last_logits_only=True)
    assert torch.allclose(full, fast, rtol=1e-5, atol=1e-9)
    assert facts.warm_started_policy(task_facts, steps=30, batch_size=16)[0].state_dict()["lm_head.weight"].equal(
        model.state_dict()["lm_head.weight"])  # seeded: the same warm start twice


def test_variants_are_parsed_and_checked(benchmarks):
    common = benchmarks["common"]
    run = common.parse_variant("gvm-raft-mean=gvm-raft:gvm_weighting=mean,gvm_min_samples=2,gvm_max_samples=None")
    assert (run.label, run.base) == ("gvm-raft-mean", "gvm-raft")
    assert run.fields == {"gvm_weighting": "mean", "gvm_min_samples": 2, "gvm_max_samples": None}
    assert run.is_gvm and run.trainer_cls.__name__ == "GVMRAFTTrainer"
    config = run.config(output_dir="unused", num_generations=2, per_device_train_batch_size=4, report_to="none",
                        use_cpu=True, beta=0.0)
    assert (config.gvm_weighting, config.gvm_min_samples, config.gvm_allocation) == ("mean", 2, "gvm")
    assert common.parse_variant("plain=raft:").fields == {}
    with pytest.raises(ValueError, match="no field 'gvm_not_a_field'"):
        common.parse_variant("x=gvm-raft:gvm_not_a_field=1")
    with pytest.raises(ValueError, match="fixes gvm_allocation"):
        common.parse_variant("x=raft:gvm_allocation=gvm")
    with pytest.raises(ValueError, match="unknown method"):
        common.parse_variant("x=ppo:gvm_alpha=0.1")
    # The fair baseline shares the run's weighting; without one, the unweighted method stands in.
    runs = common.method_runs(["gvm-grpo", "grpo", "grpo-mean", "raft", "gvm-raft", "dynamic-grpo"],
                              ["gvm-grpo-none=gvm-grpo:gvm_weighting=none"])
    baselines = {r.label: getattr(common.uniform_baseline(r, runs), "label", None) for r in runs}
    assert baselines == {"gvm-grpo": "grpo-mean", "grpo": None, "grpo-mean": None, "raft": None, "gvm-raft": "raft",
                         "dynamic-grpo": "grpo-mean", "gvm-grpo-none": "grpo"}


def test_completions_to_reach_and_mean_improvement(benchmarks):
    convergence = benchmarks["convergence"]
    curve = {"completions": [0, 100, 200], "mean": [0.2, 0.4, 0.6]}
    assert convergence.completions_to_reach(curve, 0.5, +1) == pytest.approx(150)
    assert convergence.completions_to_reach(curve, 0.2, +1) == 0
    assert convergence.completions_to_reach(curve, 0.7, +1) == math.inf
    falling = {"completions": [0, 100, 200], "mean": [2.0, 1.0, 0.5]}
    assert convergence.completions_to_reach(falling, 0.75, -1) == pytest.approx(150)
    # Improvement 0, 1, 1.5 over 0..200: trapezoids (50 + 125) / 200; up to 100 only: 50 / 100.
    assert convergence.mean_improvement(falling, -1, 200) == pytest.approx(0.875)
    assert convergence.mean_improvement(falling, -1, 100) == pytest.approx(0.5)
    assert convergence.mean_improvement(falling, -1, 150) == pytest.approx((50 + 0.5 * (1 + 1.25) * 50) / 150)


def test_paired_bootstrap(benchmarks):
    common = benchmarks["common"]
    assert common.paired_bootstrap({"a": [3.0] * 5}, lambda s: sum(s["a"]) / 5) == (3.0, 3.0, 3.0)
    estimate, low, high = common.paired_bootstrap({"a": [0.0, 1.0] * 10, "b": [1.0, 0.0] * 10},
                                                  lambda s: sum(s["a"]) - sum(s["b"]), resamples=500)
    assert estimate == 0.0 and -20 <= low < 0 < high <= 20
    # Pairs resampled together: a − b is −1 or +1 for every seed, so the sum stays within ±20 and is even.
    assert low % 2 == 0 and high % 2 == 0


def test_paired_bootstrap_many_matches_one_statistic_at_a_time(benchmarks):
    common = benchmarks["common"]
    per_seed = {"a": [0.1, 0.7, 0.4, 0.9, 0.3], "b": [0.5, 0.2, 0.6, 0.8, 0.1]}
    first, second = (lambda s: sum(s["a"]) - sum(s["b"])), (lambda s: max(s["a"]) / max(s["b"]))
    together = common.paired_bootstrap_many(per_seed, lambda s: [first(s), second(s)], resamples=300, seed=3)
    assert together == [common.paired_bootstrap(per_seed, f, resamples=300, seed=3) for f in (first, second)]


def test_targets_table_reads_every_cost_axis(benchmarks):
    """Two seeds of straight-line curves: GVM reaches every objective level at 0.8x uniform's completions but 2x its
    CPU seconds; the table's targets and ratios follow by hand."""
    convergence = benchmarks["convergence"]

    def curve(scale_completions, scale_cpu, end):
        return [{"completions": 100 * i * scale_completions, "train_cpu_seconds": 10 * i * scale_cpu,
                 "objective": 2.0 - (2.0 - end) * i / 4} for i in range(5)]

    per_seed = {"gvm": [curve(0.8, 2.0, 1.0), curve(0.8, 2.0, 1.0)],
                "uniform": [curve(1.0, 1.0, 1.0), curve(1.0, 1.0, 1.0)]}
    table = convergence.targets_table(per_seed, "objective", -1, (0.25, 0.9), resamples=50)
    assert set(table) == {"0.25", "0.9"}
    assert table["0.25"]["target"] == pytest.approx(1.75) and table["0.9"]["target"] == pytest.approx(1.1)
    for cell in table.values():
        assert cell["completions"] == pytest.approx((0.8, 0.8, 0.8))
        assert cell["train_cpu_seconds"] == pytest.approx((2.0, 2.0, 2.0))
        assert "train_seconds" not in cell  # an axis the runs did not record is left out
    never = {"gvm": [curve(1.0, 1.0, 1.5)] * 2, "uniform": per_seed["uniform"]}  # half the slope: 2x to 1.75
    table = convergence.targets_table(never, "objective", -1, (0.25, 0.9), resamples=50)
    assert table["0.25"]["completions"][0] == pytest.approx(2.0) and table["0.9"]["completions"][0] == math.inf


def test_quick_facts(benchmarks, tmp_path):
    output = tmp_path / "convergence.json"
    benchmarks["convergence"].main(["--quick", "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["complete"] and output.with_suffix(".png").stat().st_size > 0
    runs = report["runs"]
    assert [r["method"] for r in runs] == ["gvm-raft", "raft-mean", "raft", "gvm-grpo", "grpo-mean", "grpo"]
    for run in runs:
        assert [point["step"] for point in run["curve"]] == [0, 1, 2]
        completions = [point["completions"] for point in run["curve"]]
        # Equal budgets: m·(N′ + B) = 4·(2 + 2) completions a step. Uniform spends exactly that each step; GVM probes
        # ahead, so its first step also probes its own batch (+m·N′ = 8) and the last step probes none (−8).
        if run["method"] in ("raft", "raft-mean", "grpo", "grpo-mean"):
            assert completions == [0, 16, 32]
        else:
            assert completions == [0, 24, 32]
        assert all(math.isfinite(p["objective"]) and 0 <= p["heldout_accuracy"] <= 1 for p in run["curve"])
        assert sum(run["completions_per_prompt"].values()) == pytest.approx(completions[-1])
        for axis in ("train_cpu_seconds", "train_seconds"):  # training cost, evaluations left out
            costs = [point[axis] for point in run["curve"]]
            assert costs[0] == 0 and costs[1] > 0 and costs == sorted(costs)
            assert costs[-1] < run["wall_seconds"]
        assert len(run["prompt_bands"]) == 12
    summary = report["summary"]
    assert set(summary["comparisons"]) == {"gvm-raft", "gvm-grpo"}
    assert summary["comparisons"]["gvm-raft"]["baseline"] == "raft-mean"  # the same weighting: the fair baseline
    assert summary["comparisons"]["gvm-grpo"]["baseline"] == "grpo-mean"
    targets = summary["comparisons"]["gvm-grpo"]["objective"]["targets"]
    assert list(targets) == ["0.25", "0.5", "0.75", "0.9"]
    assert all({"completions", "train_cpu_seconds", "train_seconds"} <= set(cell) for cell in targets.values())
    assert set(summary["bands"]) == {"never", "rare (< 0.1)", "middle (0.1-0.5)", "easy (≥ 0.5)"}
    shares = [band["methods"]["raft"]["completion_share"] for band in summary["bands"].values()]
    assert sum(shares) == pytest.approx(1.0)


def test_quick_few_revisit_task(benchmarks, tmp_path):
    output = tmp_path / "facts-many.json"
    report = benchmarks["convergence"].main(["--quick", "--task", "facts-many", "--methods", "grpo", "gvm-grpo",
                                             "--output", str(output)])
    assert report["complete"] and "facts-many task: 64 facts with two-character keys" in report["setup"]
    assert "0.12 visits per prompt" in report["setup"]  # 4 prompts a step × 2 steps / 64 facts
    for run in report["runs"]:
        assert [point["step"] for point in run["curve"]] == [0, 1, 2]
        assert len(run["prompt_bands"]) == 64 and len(run["curve"][0]["rates"]) == 64
        assert all(math.isfinite(p["objective"]) for p in run["curve"])
    assert set(report["summary"]["comparisons"]) == {"gvm-grpo"}


def test_quick_independent_few_revisit_task(benchmarks, tmp_path):
    convergence = benchmarks["convergence"]
    report = convergence.main(["--quick", "--task", "facts-many-independent", "--methods", "grpo-mean", "gvm-grpo",
                               "--output", str(tmp_path / "independent.json")])
    assert report["complete"] and "each fact's answer, rationale and level drawn on its own" in report["setup"]
    task = convergence.TASKS["facts-many-independent"](convergence.parse_args(["--task", "facts-many-independent"]))
    drawn = task.facts_for(0)
    assert len(drawn) == 1024 and len({f.key for f in drawn}) == 1024 and all(len(f.key) == 2 for f in drawn)
    # No factorisation: facts sharing a first character do not share their answer (they all do in facts-many).
    by_first = {}
    for fact in drawn:
        by_first.setdefault(fact.key[0], set()).add(fact.answer)
    assert sum(len(answers) > 1 for answers in by_first.values()) > 0.9 * len(by_first)
    assert set(report["summary"]["comparisons"]) == {"gvm-grpo"}


def test_quick_letters_with_a_variant(benchmarks, tmp_path):
    output = tmp_path / "letters.json"
    report = benchmarks["convergence"].main(["--quick", "--task", "letters", "--methods", "raft", "--variant",
                                             "gvm-raft-mean=gvm-raft:gvm_weighting=mean", "--output", str(output)])
    assert [(r["method"], r["fields"]) for r in report["runs"]] == [
        ("raft", {}), ("gvm-raft-mean", {"gvm_weighting": "mean"})]
    assert report["methods"]["gvm-raft-mean"] == "gvm-raft (gvm_weighting='mean')"
    assert all(0 <= p["reward"] <= 1 for r in report["runs"] for p in r["curve"])


def test_resume_keeps_finished_runs_and_refuses_other_settings(benchmarks, tmp_path):
    convergence = benchmarks["convergence"]
    output = tmp_path / "resume.json"
    first = convergence.main(["--quick", "--methods", "raft", "--output", str(output)])
    second = convergence.main(["--quick", "--methods", "raft", "grpo", "--resume", "--against", "grpo=raft",
                               "--output", str(output)])
    assert [r["method"] for r in second["runs"]] == ["raft", "grpo"]
    paired = second["summary"]["comparisons"]["grpo vs raft"]  # any two runs, paired over their shared seeds
    assert paired["baseline"] == "raft" and paired["seeds"] == [0] and "objective" in paired
    with pytest.raises(SystemExit, match="no runs of gvm-grpo in this invocation"):
        convergence.main(["--quick", "--methods", "raft", "--resume", "--against", "gvm-grpo=raft",
                          "--output", str(output)])
    assert second["runs"][0]["wall_seconds"] == first["runs"][0]["wall_seconds"]  # reused, not rerun
    with pytest.raises(SystemExit, match="learning_rate"):
        convergence.main(["--quick", "--methods", "raft", "--learning-rate", "0.5", "--resume",
                          "--output", str(output)])


def test_a_pair_whose_baseline_runs_second_is_compared_once_both_ran(benchmarks, tmp_path):
    """The file is rewritten after every run: after the first, the pair's other run does not exist yet."""
    convergence = benchmarks["convergence"]
    output = tmp_path / "pair.json"
    payload = convergence.main(["--quick", "--methods", "raft", "grpo", "--against", "raft=grpo",
                                "--output", str(output)])
    assert payload["complete"] and [r["method"] for r in payload["runs"]] == ["raft", "grpo"]
    assert payload["summary"]["comparisons"]["raft vs grpo"]["baseline"] == "grpo"


def test_merge_joins_the_seeds_of_two_files_and_refuses_other_settings(benchmarks, tmp_path):
    convergence = benchmarks["convergence"]
    parts = [tmp_path / "seed0.json", tmp_path / "seed2.json"]  # (--quick reads --seeds 0 1 as seed 0 alone)
    for seed, part in zip((0, 2), parts):
        convergence.main(["--quick", "--methods", "raft", "--seeds", str(seed), "--output", str(part)])
    merged = convergence.main(["--quick", "--methods", "raft", "--seeds", "0", "2", "--merge", *map(str, parts),
                               "--output", str(tmp_path / "both.json")])
    assert [(r["method"], r["seed"]) for r in merged["runs"]] == [("raft", 0), ("raft", 2)]
    assert [r["wall_seconds"] for r in merged["runs"]] == [
        json.loads(part.read_text())["runs"][0]["wall_seconds"] for part in parts]  # taken over, not rerun
    with pytest.raises(SystemExit, match="learning_rate"):
        convergence.main(["--quick", "--methods", "raft", "--seeds", "0", "--learning-rate", "0.5", "--merge",
                          str(parts[0]), "--output", str(tmp_path / "other.json")])


def test_factorial_and_levers_name_valid_runs(benchmarks):
    """The two method sets of issue 17's report parse into known methods with real config fields, each GVM run
    compared against the uniform method with its own weighting."""
    convergence, common = benchmarks["convergence"], benchmarks["common"]
    args = convergence.parse_args(["--factorial"])
    runs = common.method_runs(args.methods, args.variant)
    assert len(runs) == 14 and len({r.label for r in runs}) == 14
    baselines = {r.label: common.uniform_baseline(r, runs) for r in runs}
    assert baselines["gvm-raft-unweighted-no-history"].label == "raft"
    assert baselines["gvm-grpo-no-history"].label == "grpo-mean"
    assert baselines["reinforce-ada-grpo"].label == "grpo" and baselines["reinforce-ada-raft"].label == "raft"
    levers = common.method_runs(*[getattr(convergence.parse_args(["--levers"]), k) for k in ("methods", "variant")])
    for run in levers[2:]:
        run.config(output_dir="/tmp/unused", use_cpu=True, report_to="none", bf16=False, num_generations=4,
                   per_device_train_batch_size=16)  # every field exists and validates
    with pytest.raises(SystemExit, match="--factorial"):
        convergence.parse_args(["--factorial", "--methods", "grpo"])


def test_the_report_script_runs_valid_commands(benchmarks, tmp_path):
    """benchmarks/fair_evidence.sh (issues 17 and 27's report in one command), run with a stand-in `python` that
    records its arguments: every convergence.py call parses, names known methods and config fields, continues where
    it stopped (--resume) and gives --method-lr only to its own runs; the held-out and regime runs use the rates the
    sweep picked."""
    import os
    import shlex
    import subprocess
    from pathlib import Path

    convergence, common = benchmarks["convergence"], benchmarks["common"]
    script = Path(convergence.__file__).parent / "fair_evidence.sh"
    log = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\n'
                    'if [ "$1" = -c ]; then echo 0.00123; exit 0; fi\n'  # the sweep's pick (best())
                    f'printf "%q " "$@" >> {log}; echo >> {log}\n')
    fake.chmod(0o755)
    subprocess.run(["bash", str(script)], check=True, env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"})
    calls = [shlex.split(line) for line in log.read_text().splitlines()]
    runs = [argv[1:] for argv in calls if argv[0] == "convergence.py" and "--lr-sweep" not in argv]
    assert len(runs) == 4 + 2 + 5 + 1 + 4  # issue 17's four, two earlier ones, the sweep, held out, the regimes
    sweeps = [argv for argv in calls if "--lr-sweep" in argv]
    assert len(sweeps) == 1 and sum(a.endswith(".json") for a in sweeps[0]) == 6  # five rates and the output
    assert [argv[0] for argv in calls if argv[0] != "convergence.py"] == ["variance.py", "variance.py",
                                                                         "report_tables.py"]
    seeds_used = {}
    for argv in runs:
        args = convergence.parse_args(argv)
        assert "--resume" in argv and args.seeds
        labels = {r.label for r in common.method_runs(args.methods, args.variant)}
        assert {label for label, _ in args.method_lr} <= labels
        if args.method_lr:
            assert {rate for _, rate in args.method_lr} == {0.00123} and set(dict(args.method_lr)) == labels
            seeds_used.setdefault(tuple(args.seeds), []).append(args.output.name)
        for run in common.method_runs(args.methods, args.variant):
            run.config(output_dir="/tmp/unused", use_cpu=True, report_to="none", bf16=False, num_generations=4,
                       per_device_train_batch_size=16)
    # the rates were tuned on seeds 0-3; what is reported at them uses seeds nobody tuned on
    assert set(seeds_used) == {tuple(range(30, 42)), tuple(range(42, 50))}
    assert len(seeds_used[tuple(range(42, 50))]) == 4


# -- issue 27: the learning-rate sweep, the nearly-solved share, the zero-variance groups -----------------------------


def _curve(values, completions_per_point=100, cpu_per_point=1.0):
    return [{"step": i, "completions": i * completions_per_point, "train_cpu_seconds": i * cpu_per_point,
             "objective": v, "train_accuracy": 0.5} for i, v in enumerate(values)]


def test_divergence_rule_on_hand_made_curves(benchmarks):
    divergence = benchmarks["convergence"].divergence
    assert divergence(_curve([2.0, 1.5, 1.0, 0.9])) is None  # falls throughout
    assert divergence(_curve([2.0, 1.0, 1.2])) is None  # gave back 0.2 of its 1.0: under half
    assert divergence(_curve([2.0, 1.0, 1.6])) == "gave back"  # 0.6 of 1.0 back
    assert divergence(_curve([2.0, 1.98, 2.0])) is None  # back to the start, within noise (0.05 nats)
    assert divergence(_curve([2.0, 1.96, 2.03])) == "ended worse than start"
    assert divergence(_curve([2.0, 1.0, math.nan])) == "non-finite"
    assert divergence(_curve([2.0, 1.0, math.inf])) == "non-finite"
    # higher-is-better metrics read the same way with direction +1
    accuracy = [{"train_accuracy": v} for v in (0.2, 0.6, 0.3)]
    assert divergence(accuracy, "train_accuracy", +1) == "gave back"


def _sweep_runs(curves: dict[str, list[list[float]]]) -> list[dict]:
    return [{"method": label, "base": label, "fields": {}, "seed": seed, "curve": _curve(values)}
            for label, per_seed in curves.items() for seed, values in enumerate(per_seed)]


def test_best_learning_rate_is_picked_by_completions_to_the_shared_target(benchmarks):
    convergence = benchmarks["convergence"]
    sweep = {
        # baseline: at 1e-4 it ends at 1.0 (improvement 1.0), at 1e-3 at 0.6 (best: 1.4), at 1e-2 faster but diverges
        1e-4: _sweep_runs({"grpo-mean": [[2.0, 1.6, 1.2, 1.0]] * 2, "gvm-grpo": [[2.0, 1.8, 1.6, 1.4]] * 2}),
        1e-3: _sweep_runs({"grpo-mean": [[2.0, 1.2, 0.8, 0.6]] * 2, "gvm-grpo": [[2.0, 1.0, 0.7, 0.6]] * 2}),
        1e-2: _sweep_runs({"grpo-mean": [[2.0, 0.5, 0.5, 1.8]] * 2, "gvm-grpo": [[2.0, 0.9, 0.6, 0.5],
                                                                              [2.0, 0.9, 0.6, 0.5]]}),
    }
    result = convergence.analyse_sweep(sweep)
    family = result["families"]["grpo-mean"]
    assert family["members"] == ["grpo-mean", "gvm-grpo"]
    assert family["target_from_rate"] == 1e-3  # the baseline's best final among the rates where it did not diverge
    assert family["target"] == pytest.approx(2.0 - 0.75 * 1.4)  # 0.95
    baseline, gvm = result["methods"]["grpo-mean"], result["methods"]["gvm-grpo"]
    assert baseline["rates"][1e-2]["diverged"] == 2 and baseline["rates"][1e-2]["reasons"] == ["gave back"] * 2
    assert baseline["rates"][1e-4]["completions_to_target"] == math.inf  # never reaches 0.95: this rate loses
    assert baseline["rates"][1e-3]["completions_to_target"] == pytest.approx(100 + 100 * (1.2 - 0.95) / 0.4)
    assert baseline["best_rate"] == 1e-3 and baseline["reached"]  # 1e-2 reached it sooner but diverged
    # GVM reaches 0.95 sooner at 1e-2 (before its first evaluation at 100) than at 1e-3, and no seed diverged there
    assert gvm["rates"][1e-2]["completions_to_target"] == pytest.approx(100 * 1.05 / 1.1)
    assert gvm["best_rate"] == 1e-2 and gvm["rates"][1e-2]["diverged"] == 0
    text = convergence.format_sweep(result)
    assert "| `gvm-grpo` |" in text and "never; L 1.400" in text and text.count("**") == 4  # one bold cell each
    # No rate reaches the target: the best final value wins, marked as not reached.
    rows = {1e-4: {"diverged": 0, "completions_to_target": math.inf, "final": 1.3},
            1e-3: {"diverged": 0, "completions_to_target": math.inf, "final": 1.1},
            1e-2: {"diverged": 1, "completions_to_target": 50.0, "final": 0.2}}
    assert convergence.pick_best_rate(rows) == {"best_rate": 1e-3, "reached": False, "best_diverged": 0}


def test_lr_sweep_command_reads_one_file_per_rate(benchmarks, tmp_path):
    convergence = benchmarks["convergence"]
    files = []
    for rate, values in ((1e-4, [2.0, 1.5, 1.2]), (1e-3, [2.0, 1.0, 0.8])):
        path = tmp_path / f"lr{rate:g}.json"
        runs = _sweep_runs({"raft-mean": [values] * 2, "gvm-raft": [values] * 2})
        path.write_text(json.dumps({"arguments": {"learning_rate": rate, "method_lr": []}, "runs": runs}))
        files.append(str(path))
    payload = convergence.main(["--lr-sweep", *files, "--output", str(tmp_path / "sweep.json")])
    assert payload["rates"] == [1e-4, 1e-3]
    assert {label: m["best_rate"] for label, m in payload["methods"].items()} == {"raft-mean": 1e-3, "gvm-raft": 1e-3}
    assert "gave back" in payload["divergence_rule"]
    assert json.loads((tmp_path / "sweep.json").read_text())["families"]["raft-mean"]["start"] == 2.0
    with pytest.raises(SystemExit, match="two files at learning rate"):
        convergence.main(["--lr-sweep", files[0], files[0], "--output", str(tmp_path / "twice.json")])


def test_solved_share_levels(benchmarks):
    facts = benchmarks["facts"]
    assert [f.start_rate for f in facts.make_facts(48, seed=3)] == [
        f.start_rate for f in facts.make_facts(48, seed=3, solved_share=0.0)]  # the original draws, fact for fact
    drawn = facts.make_facts(48, seed=3, never_share=0.125, solved_share=0.5)
    rates = sorted(f.start_rate for f in drawn)
    assert rates[:6] == [0.0] * 6
    solved = [r for r in rates if r >= facts.SOLVED_LOW]
    assert len(solved) >= 24 and min(solved) == pytest.approx(0.95)  # (the other band's 0.98 may lie among them)
    assert [r for r in rates if r > 0.98 + 1e-12][-1] == pytest.approx(0.99)
    others = [r for r in rates if 0 < r < facts.SOLVED_LOW]
    assert len(others) == 48 - 6 - 24 - 1 and others[0] == pytest.approx(0.02)
    assert facts._levels(8, 0.25, 0.02, 0.98, 0.5)[2:4] == pytest.approx([0.02, 0.98])
    with pytest.raises(ValueError, match="summing to <= 1"):
        facts.make_facts(48, seed=0, never_share=0.5, solved_share=0.6)


def test_group_outcomes_count_the_zero_variance_groups(benchmarks, tmp_path):
    from gvm_trl.metrics import AllocationLog

    convergence = benchmarks["convergence"]
    log = AllocationLog(str(tmp_path))

    def prompt(samples, accepted, probes=None):
        return {"index": 0, "num_samples": samples, "num_accepted": accepted, "probes_accepted": probes}

    # uniform (no probe count): groups of 8; a probing run: 4 probes + the allocated samples
    log.append({"step": 0, "prompts": [prompt(8, 0), prompt(8, 8), prompt(8, 3)]})
    log.append({"step": 1, "prompts": [prompt(0, 0, 0), prompt(0, 0, 4), prompt(6, 6, 4), prompt(4, 0, 1)]})
    rows = convergence.group_outcomes(str(tmp_path), num_probes=4)
    assert rows == [[0, 3, 1, 1, 24, 16], [1, 4, 1, 2, 26, 18]]
    assert convergence.group_outcomes(str(tmp_path / "none"), 4) is None
    shares = convergence.group_outcome_shares([{"group_outcomes": rows}, {"group_outcomes": rows[:1]}, {}])
    assert shares["steps"] == [0] and shares["seeds"] == 2  # the steps every logged seed has
    assert shares["all_wrong"] == pytest.approx([1 / 3]) and shares["all_correct"] == pytest.approx([1 / 3])
    assert shares["zero_variance_completions"] == pytest.approx([16 / 24])


def test_quick_run_with_nearly_solved_facts_and_own_learning_rates(benchmarks, tmp_path):
    convergence = benchmarks["convergence"]
    report = convergence.main(["--quick", "--methods", "grpo-mean", "gvm-grpo", "--solved-share", "0.25",
                               "--method-lr", "gvm-grpo=3e-4", "--output", str(tmp_path / "solved.json")])
    assert "3 nearly solved (0.95-0.99)" in report["setup"] and "gvm-grpo at 0.0003" in report["setup"]
    assert {r["method"]: r["learning_rate"] for r in report["runs"]} == {"grpo-mean": 1e-4, "gvm-grpo": 3e-4}
    for run in report["runs"]:
        assert [row[0] for row in run["group_outcomes"]] == [0, 1]
        assert all(row[1] == 4 and row[2] + row[3] <= 4 for row in run["group_outcomes"])
    uniform = report["runs"][0]["group_outcomes"]
    assert all(row[4] == 16 for row in uniform)  # m·(N′ + B) = 4·4 scored completions a step
    assert set(report["summary"]["group_outcomes"]) == {"grpo-mean", "gvm-grpo"}
    with pytest.raises(SystemExit, match="names no run"):
        convergence.main(["--quick", "--methods", "grpo-mean", "--method-lr", "gvm-grpo=3e-4",
                          "--output", str(tmp_path / "other.json")])
    with pytest.raises(SystemExit):
        convergence.parse_args(["--method-lr", "gvm-grpo=fast"])
