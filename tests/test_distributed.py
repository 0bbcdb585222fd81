"""Two CPU processes (gloo) against one: same allocations, same losses, same trained weights.

`torchrun --nproc_per_node 2` gives accelerate a real two-process MULTI_CPU run (`accelerate launch --cpu
--num_processes 2` silently starts one process), and each result records `accelerator.num_processes`.

A launch spends ~10 s per process importing torch, transformers and TRL, and a run of this size well under one; so the
runs share launches: one single-process launch trains every reference, one two-process launch every plain
two-process run and one more every ZeRO-3 run, each run from a fresh model and trainer (`train_tiny.py --runs`).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import torchrun

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")


def launch(output_dir: Path, processes: int, runs: dict[str, tuple[str, ...]], *options: str) -> dict[str, list[dict]]:
    """Train each named run (its options after the launch's) in one launch of `processes` processes; every process's
    result, by run name."""
    output_dir.mkdir()
    (output_dir / "runs.json").write_text(json.dumps(runs))
    per_device = 8 // processes  # the same global batch: 8 probe rows, 2 prompts per generation batch
    launcher = torchrun(processes) if processes > 1 else [sys.executable]
    command = [*launcher, str(SCRIPT), "--runs", str(output_dir / "runs.json"), "--output_dir", str(output_dir),
               "--per_device_train_batch_size", str(per_device), "--steps", "3", *options]
    completed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return {name: [json.loads(path.read_text()) for path in sorted((output_dir / name).glob("result-*.json"))]
            for name in runs}


MATCH_CASES = {
    "raft": ("--trainer", "raft"),
    "grpo": ("--trainer", "grpo"),
    "grpo-accumulation": ("--trainer", "grpo", "--gradient_accumulation_steps", "2", "--steps_per_generation", "4"),
    "raft-probe-ahead": ("--trainer", "raft", "--schedule", "probe-ahead"),
    "grpo-probe-ahead-history-explore": ("--trainer", "grpo", "--schedule", "probe-ahead", "--history_decay", "0.5",
                                         "--explore_samples", "1"),
    "grpo-probe-ahead-accumulation": ("--trainer", "grpo", "--schedule", "probe-ahead", "--gradient_accumulation_steps",
                                      "2", "--steps_per_generation", "4"),
    "grpo-probe-ahead-history-dynamic": ("--trainer", "grpo", "--schedule", "probe-ahead", "--history_decay", "0.5",
                                         "--allocation", "dynamic"),
    "raft-knapsack": ("--trainer", "raft", "--allocation", "knapsack"),
    "grpo-probe-ahead-history-constant-norms-rate-floor": ("--trainer", "grpo", "--schedule", "probe-ahead",
                                                           "--history_decay", "0.5", "--grad_norms", "constant",
                                                           "--rate_floor_quantile", "0.5"),
    "raft-batch-prior": ("--trainer", "raft", "--rate_prior", "batch"),
    "grpo-reinforce-ada": ("--trainer", "grpo", "--allocation", "reinforce-ada"),
}
ACCUMULATION = ("--gradient_accumulation_steps", "2", "--steps_per_generation", "4")
PARITY_CASES = {"one-step-per-generation": (), "accumulation": ACCUMULATION}
ZERO3_CASES = {"raft-sequential": ("--trainer", "raft", "--schedule", "sequential"),
               "raft-probe-ahead": ("--trainer", "raft", "--schedule", "probe-ahead"),
               "grpo-probe-ahead": ("--trainer", "grpo", "--schedule", "probe-ahead")}
KILL_COMMON = ("--trainer", "raft", "--per_device_train_batch_size", "4", "--steps", "4", "--history_decay", "0.5")
SCHEDULES = ("sequential", "probe-ahead")


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict[str, dict]:
    """One process: the reference of every two-process and ZeRO-3 case."""
    runs = {**MATCH_CASES, **{f"zero3-reference-{name}": options for name, options in ZERO3_CASES.items()}}
    return {name: result for name, (result,) in launch(tmp_path_factory.mktemp("single") / "runs", 1, runs).items()}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict[str, list[dict]]:
    """Two processes: every case, TRL's trainer and GVM switched off for parity, and the uninterrupted runs the
    killed ones are compared with (their output directories, `PATH/name`, hold the allocation logs)."""
    runs = {
        **MATCH_CASES,
        **{f"trl-{name}": ("--trainer", "trl", "--sample", *options) for name, options in PARITY_CASES.items()},
        **{f"off-{name}": ("--trainer", "grpo", "--sample", "--gvm_off", *options)
           for name, options in PARITY_CASES.items()},
        **{f"uninterrupted-{schedule}": (*KILL_COMMON, "--schedule", schedule) for schedule in SCHEDULES},
    }
    output_dir = tmp_path_factory.mktemp("two")
    return {"output_dir": output_dir, **launch(output_dir / "runs", 2, runs)}


@pytest.fixture(scope="module")
def zero3_two_processes(tmp_path_factory) -> dict[str, list[dict]]:
    output_dir = tmp_path_factory.mktemp("zero3")
    config = output_dir / "zero3.json"
    config.write_text(json.dumps(ZERO3_CONFIG))
    return launch(output_dir / "runs", 2, ZERO3_CASES, "--deepspeed", str(config))


def same_history(a: dict, b: dict) -> bool:
    """Two saved prompt histories hold the same prompts with the same counts (norms to float tolerance)."""
    return a["decay"] == b["decay"] and a["prompts"].keys() == b["prompts"].keys() and all(
        a["prompts"][key] == pytest.approx(b["prompts"][key], rel=1e-5) for key in a["prompts"]
    )


@pytest.mark.parametrize("case", list(MATCH_CASES))
def test_two_processes_match_one(case, single_process, two_processes):
    """With accumulation, each process splits its (unequal) rows over 4 micro-steps, 2 per optimizer step."""
    options = MATCH_CASES[case]
    single, ranks = single_process[case], two_processes[case]
    assert single["num_processes"] == 1
    assert [r["num_processes"] for r in ranks] == [2, 2]
    # Every process computed the allocation the single process did, from globally gathered p and G; in the first
    # generation batch one process's only prompt is always rejected (n_i = 0, no local training rows, unless the
    # exploration floor gives it samples).
    if "--rate_floor_quantile" in options or "--rate_prior" in options:  # a rate above 0 gives it samples
        assert single["records"][0]["sizes"][0] > 0
        if "--grad_norms" in options:
            assert single["records"][0]["grad_norms"] == [1.0, 1.0]
    elif "reinforce-ada" in options:  # never accepted: sampled in every round, 8 completions each, up to the cap
        assert single["records"][0]["sizes"][0] == 32
    elif not single["records"][0]["fallback"]:  # (dynamic sampling splits uniformly when nothing is informative)
        assert single["records"][0]["sizes"][0] == (1 if "--explore_samples" in options else 0)
    for result in ranks:
        assert [r["sizes"] for r in result["records"]] == [r["sizes"] for r in single["records"]]
        assert [r["accept_rates"] for r in result["records"]] == [r["accept_rates"] for r in single["records"]]
        assert [r["probe_step"] for r in result["records"]] == [r["probe_step"] for r in single["records"]]
        assert [r["fallback"] for r in result["records"]] == [r["fallback"] for r in single["records"]]
        for mine, theirs in zip(result["records"], single["records"]):
            if theirs["grad_norms"] is None:  # dynamic sampling and Knapsack RL need no gradient norms
                assert mine["grad_norms"] is None and "--allocation" in options
            else:
                assert mine["grad_norms"] == pytest.approx(theirs["grad_norms"], rel=1e-5)
        assert result["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
        assert result["checksum"] == pytest.approx(single["checksum"], rel=1e-6)
        assert result["history"] == ranks[0]["history"]  # the per-prompt history is the same on every process
    if "--history_decay" in options:
        assert single["history"]["prompts"] and same_history(ranks[0]["history"], single["history"])
    if "probe-ahead" in options and "--gradient_accumulation_steps" not in options:
        assert [r["probe_step"] for r in single["records"]] == [0, 0, 1]  # each drawn one step before it trains


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_two_processes_with_gvm_off_are_trl(case, two_processes):
    """Two processes of GVM-GRPO with GVM switched off and of trl.GRPOTrainer: the same losses and weights."""
    plain, off = two_processes[f"trl-{case}"], two_processes[f"off-{case}"]
    assert [r["num_processes"] for r in plain + off] == [2, 2, 2, 2]
    assert any(loss != 0 for loss in plain[0]["losses"])  # sampled completions, rewards that differ in a group
    for ours, theirs in zip(off, plain):
        assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-5, abs=1e-7)
        assert ours["checksum"] == pytest.approx(theirs["checksum"], rel=1e-7)


# Parameters below DeepSpeed's persistence threshold are never partitioned; 0 shards every one of the tiny model's.
ZERO3_CONFIG = {
    "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": True
    },
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": False},
    "fp16": {"enabled": False},
}


@pytest.mark.parametrize("case", list(ZERO3_CASES))
def test_deepspeed_zero3_two_processes_match_one(case, single_process, zero3_two_processes):
    """ZeRO-3 shards every parameter; the gradient-norm pass runs in lockstep on both processes (one of which has no
    accepted probe in the first generation batch) and leaves nothing gathered."""
    single, ranks = single_process[f"zero3-reference-{case}"], zero3_two_processes[case]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    for result in ranks:
        assert [r["sizes"] for r in result["records"]] == [r["sizes"] for r in single["records"]]
        for mine, theirs in zip(result["records"], single["records"]):
            assert mine["grad_norms"] == pytest.approx(theirs["grad_norms"], rel=1e-5)
        assert result["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
        assert result["left_gathered"] == [0] * len(result["left_gathered"]) and result["left_gathered"]
    assert ranks[0]["checksum"] == pytest.approx(single["checksum"], rel=1e-6)  # the full state dict, on rank 0


def test_zero3_without_gathering_for_generation_names_the_fix(tmp_path):
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps(ZERO3_CONFIG))
    command = [*torchrun(1), str(SCRIPT),
               "--output_dir", str(tmp_path), "--deepspeed", str(config), "--no_ds3_gather"]
    completed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0
    assert "set ds3_gather_for_generation=True" in completed.stderr


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_killed_two_process_run_resumes_without_lost_or_repeated_prompts(schedule, two_processes, tmp_path):
    """Kill a two-process run once a checkpoint exists, resume it, and compare with an uninterrupted run.

    Probe-ahead: the batch whose probes were drawn before the kill is probed again after resuming (its probes are not
    checkpointed), so its allocation may differ; its prompts may not."""
    common = [str(SCRIPT), *KILL_COMMON, "--schedule", schedule]

    def prompts_by_step(output_dir: Path) -> dict[int, list[int]]:
        steps: dict[int, list[int]] = {}
        for record in map(json.loads, (output_dir / "gvm_allocations.jsonl").read_text().splitlines()):
            prompts = [p["index"] for p in record["prompts"]]
            assert steps.setdefault(record["step"], prompts) == prompts  # a step redone after resuming: same prompts
            steps[record["step"]] = prompts
        return steps

    reference = two_processes["output_dir"] / "runs" / f"uninterrupted-{schedule}"
    killed = tmp_path / "killed"
    killed.mkdir()
    process = subprocess.Popen(
        [*torchrun(2), *common, "--output_dir", str(killed), "--save_steps", "1", "--pause_after_checkpoint", "2"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not any(killed.glob("checkpoint-2/trainer_state.json")) and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.2)
    for worker in psutil.Process(process.pid).children(recursive=True):  # torchrun starts workers in new sessions
        worker.kill()
    process.kill()
    process.wait()
    complete = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth")
    checkpoints = sorted(
        int(path.name.split("-")[1]) for path in killed.glob("checkpoint-*") if all((path / f).exists() for f in complete)
    )
    last = checkpoints[-1]
    assert last < 4, "the run finished before it could be killed"

    completed = subprocess.run(
        # The last complete checkpoint: the kill may have interrupted the writing of a later one.
        [*torchrun(2), *common, "--output_dir", str(killed), "--save_steps", "1", "--resume", str(killed / f"checkpoint-{last}")],
        env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    expected, resumed = prompts_by_step(reference), prompts_by_step(killed)
    # The resumed run continues from the checkpoint's step, with the prompts the uninterrupted run had there;
    # steps logged before the kill but after the checkpoint are redone, with the same prompts.
    assert sorted(resumed) == [0, 1, 2, 3]
    assert resumed == expected
    resumed_result = json.loads((killed / "result-0.json").read_text())
    reference_result = json.loads((reference / "result-0.json").read_text())
    assert resumed_result["num_processes"] == 2
    assert resumed_result["history"]["prompts"]
    if schedule == "sequential":  # the same trained weights, and the per-prompt history survived the resume
        assert resumed_result["checksum"] == pytest.approx(reference_result["checksum"], rel=1e-6)
        assert same_history(resumed_result["history"], reference_result["history"])


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> list[dict]:
    output_dir = tmp_path_factory.mktemp("fsdp")
    script = Path(__file__).parent / "scripts" / "fsdp_grad_norms.py"
    command = [*torchrun(2), str(script),
               "--output_dir", str(output_dir), "--params", "trainable", "embed_tokens"]
    completed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return [json.loads(path.read_text()) for path in sorted(output_dir.glob("result-*.json"))]


@pytest.mark.parametrize("params", ["trainable", "embed_tokens"])
def test_grad_norms_under_fsdp2_match_unsharded(params, fsdp_results):
    """FSDP2 (`fully_shard` per decoder layer and root) on two processes with different row counts: the hooks see full
    activations and output gradients, so the norms equal the unsharded model's; parameters stay sharded, no `.grad`.

    (accelerate only enables FSDP on GPU backends, so the trainers' FSDP path itself needs a multi-GPU machine.)"""
    results = [result[params] for result in fsdp_results]
    assert [len(r["expected"]) for r in results] == [3, 4]
    for result in results:
        assert result["world_size"] == 2
        assert min(result["expected"]) > 0
        assert result["max_rel_error"] < 1e-5
        assert result["still_sharded"] and result["grads"] == 0


def test_unequal_free_memory_gives_every_process_the_same_micro_batch(tmp_path):
    """Issue 26, B1: rank 0 reports a terabyte free, rank 1 one byte. Each sizes its share of the gradient-norm pass
    from its own figure, and the two agree on the smaller micro-batch, so both run the same number of forwards (under
    FSDP or ZeRO-3 unequal counts deadlock); the norms are the single-micro-batch ones."""
    script = Path(__file__).parent / "scripts" / "measure_two_processes.py"
    command = [*torchrun(2), str(script), str(tmp_path)]
    completed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["processes"] for r in ranks] == [2, 2]
    assert [r["micro_batch"] for r in ranks] == [1, 1]  # the smaller of what each could fit
    assert ranks[0]["forwards"] == ranks[1]["forwards"] >= 6  # one forward per row, the same count on both
    assert ranks[0]["norms"] == ranks[1]["norms"] and len(ranks[0]["norms"]) == 12 and min(ranks[0]["norms"]) > 0
    assert ranks[0]["norms"] == pytest.approx(ranks[0]["reference"], rel=1e-5)
