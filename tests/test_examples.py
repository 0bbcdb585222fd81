"""The training script: paper configs parse, a tiny end-to-end run, and the Hub push (network patched out)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoUrl

from gvm_trl import GVMGRPOConfig, GVMRAFTConfig

from conftest import free_port, make_tiny_llama

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = Path(__file__).resolve().parent / "scripts"
sys.path.insert(0, str(EXAMPLES))
import train  # noqa: E402

CONFIGS = sorted((EXAMPLES / "configs").glob("*.yaml"))


def test_a_config_per_paper_setting():
    models = {"qwen2.5-math-1.5b", "qwen2.5-math-7b", "llama-3.2-1b-instruct", "llama-3.2-3b-instruct"}
    assert {path.stem for path in CONFIGS} == {f"{m}_{a}" for m in models for a in ("gvm-raft", "gvm-grpo")}


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_paper_configs_parse_without_unknown_keys(path):
    # bf16 needs a GPU or use_cpu; everything else is parsed exactly as written (unknown keys raise).
    script_args, training_args, model_args = train.parse_args(["--config", str(path), "--use_cpu", "true"])
    expected_config = GVMRAFTConfig if path.stem.endswith("gvm-raft") else GVMGRPOConfig
    assert type(training_args) is expected_config and training_args.gvm_allocation == "gvm"
    assert training_args.gvm_num_probes == 8 and training_args.gvm_budget_per_prompt == 8
    assert (training_args.gvm_alpha, training_args.gvm_beta) == (1e-3, 2.0)
    assert training_args.learning_rate == 1e-6 and training_args.beta == 0.001
    assert training_args.max_completion_length == 3072 and training_args.temperature == 1.0
    assert training_args.use_vllm and training_args.bf16
    assert model_args.dtype == "bfloat16" and "/" in model_args.model_name_or_path
    assert len(script_args.eval_benchmarks) == 5


def test_baseline_algorithm_overrides_the_config():
    path = EXAMPLES / "configs" / "qwen2.5-math-1.5b_gvm-grpo.yaml"
    _, training_args, _ = train.parse_args(["--config", str(path), "--algorithm", "grpo", "--use_cpu", "true"])
    assert training_args.gvm_allocation == "uniform" and training_args.gvm_weighting == "none"
    assert type(training_args) is GVMGRPOConfig  # vanilla GRPO through the same trainer


def test_no_arguments_is_the_cpu_demo():
    script_args, training_args, model_args = train.parse_args([])
    assert script_args.algorithm == "gvm-raft" and script_args.dataset_name == "arithmetic"
    assert model_args.model_name_or_path == "smollm2-135m-instruct"
    assert not training_args.bf16 and not training_args.gradient_checkpointing
    assert type(training_args) is GVMRAFTConfig and training_args.beta == 0.001


def tiny_run(tmp_path, char_tokenizer, *extra):
    model_dir = tmp_path / "tiny"
    make_tiny_llama(char_tokenizer).save_pretrained(model_dir)
    char_tokenizer.save_pretrained(model_dir)
    output_dir = tmp_path / "run"
    argv = [
        "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), "--max_steps", "2",
        "--max_completion_length", "8", "--heldout_prompts", "4", "--num_train_prompts", "32", "--use_cpu", "true",
        "--per_device_train_batch_size", "8",
        *extra,
    ]
    return train.main(argv), output_dir


def test_tiny_end_to_end_run(tmp_path, char_tokenizer):
    summary, output_dir = tiny_run(tmp_path, char_tokenizer)
    assert 0.0 <= summary["heldout_reward_before"] <= 1.0 and 0.0 <= summary["heldout_reward_after"] <= 1.0
    records = [json.loads(line) for line in (output_dir / "gvm_allocations.jsonl").read_text().splitlines()]
    assert len(records) == 2
    phase2 = sum(p["num_samples"] for record in records for p in record["prompts"])
    assert summary["completions_generated"] == 2 * 8 + phase2  # 2 generation batches of N′·m = 8 probes
    assert set(summary["seconds_per_phase"]) >= {"probe rounds", "gradient norms", "allocation", "update and the rest"}
    assert summary["probe_completions"] == 2 * 8  # probing ahead: the first batch's round, then riding along
    assert json.loads((output_dir / "gvm_summary.json").read_text())["algorithm"] == "gvm-raft"
    assert (output_dir / "gvm_allocation.png").stat().st_size > 1000
    assert (output_dir / "model.safetensors").exists()


def test_push_to_hub_uploads_model_and_gvm_card(tmp_path, char_tokenizer, monkeypatch):
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/me/{repo_id}", endpoint="https://huggingface.co")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append(
            {"repo_id": repo_id, "files": sorted(p.name for p in Path(folder_path).iterdir()), "folder": folder_path}
        )
        card = (Path(folder_path) / "README.md").read_text()
        uploads[-1]["card"] = card

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    tiny_run(tmp_path, char_tokenizer, "--push_to_hub", "true", "--hub_model_id", "gvm-tiny", "--max_steps", "1")
    assert uploads and uploads[-1]["repo_id"] == "me/gvm-tiny"
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= set(uploads[-1]["files"])
    card = uploads[-1]["card"]
    assert "GVM-RAFT++" in card and "2505.02391" in card and "gvm_budget_per_prompt" in card


def test_a_baseline_refuses_a_contradicting_flag():
    with pytest.raises(SystemExit, match="gvm_weighting"):
        train.parse_args(["--algorithm", "raft", "--gvm_weighting", "lemma1"])


def launch_two_processes(script: Path, model_dir: Path, output_dir: Path, *extra: str):
    """`accelerate launch` with two CPU processes (gloo) of a tiny run. `--multi_gpu` is what starts two processes
    on a CPU-only machine (`--cpu --num_processes 2` silently starts one); `--use_cpu true` keeps the trainer on the
    CPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no",
               str(script), "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir),
               "--max_steps", "2", "--max_completion_length", "8", "--heldout_prompts", "0",
               "--num_train_prompts", "32", "--use_cpu", "true", "--per_device_train_batch_size", "8", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_two_process_launch_exits_zero_every_time(tmp_path, char_tokenizer):
    """`accelerate launch` with two CPU processes ends with exit code 0, run after run, once its outputs are saved,
    and through the interpreter's own exit: the process group is freed first, so gloo's teardown cannot abort it and
    the os._exit fallback is not needed (examples/train.py, `leave_distributed_run`)."""
    model_dir = tmp_path / "tiny"
    make_tiny_llama(char_tokenizer).save_pretrained(model_dir)
    char_tokenizer.save_pretrained(model_dir)
    for attempt in range(2):
        output_dir = tmp_path / f"run{attempt}"
        completed = launch_two_processes(EXAMPLES / "train.py", model_dir, output_dir)
        assert completed.returncode == 0, completed.stderr[-4000:]
        assert "terminate called" not in completed.stderr
        assert "leaving with os._exit" not in completed.stderr
        summary = json.loads((output_dir / "gvm_summary.json").read_text())
        assert summary["probe_completions"] == 2 * 2 * 8  # 2 generation batches × 2 processes × 8 probe rows each
        assert (output_dir / "model.safetensors").exists() and (output_dir / "gvm_allocation.png").exists()


def test_two_process_run_finishes_its_integrations_and_exit_handlers(tmp_path, char_tokenizer):
    """On every rank of a two-process run, a `report_to` integration that buffers its logs and finishes its run at
    exit (as wandb's does) has logged, seen `on_train_end` and finished, and the user's atexit handler has run, all
    before exit code 0 (tests/scripts/train_reporting_probe.py)."""
    model_dir = tmp_path / "tiny"
    make_tiny_llama(char_tokenizer).save_pretrained(model_dir)
    char_tokenizer.save_pretrained(model_dir)
    output_dir = tmp_path / "run"
    completed = launch_two_processes(SCRIPTS / "train_reporting_probe.py", model_dir, output_dir,
                                     "--report_to", "exit_probe")
    assert completed.returncode == 0, completed.stderr[-4000:]
    for rank in range(2):
        lines = (output_dir / "exit_probe" / f"run-{rank}.log").read_text().splitlines()
        assert "log step 2" in lines and lines[-2:] == ["on_train_end", "finished"], lines
        assert (output_dir / "exit_probe" / f"atexit-{rank}").read_text() == "flushed\n"


LEAVING = """
import atexit, sys, threading, time
import torch.distributed as dist
sys.path.insert(0, {examples!r})
import train

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
dist.all_reduce(__import__("torch").ones(4))
{hold}
atexit.register(lambda: open({marker!r}, "a").write("atexit\\n"))
threading.Thread(target=lambda: (time.sleep(6), open({marker!r}, "a").write("thread\\n"))).start()
assert train.gloo_worker_threads() > 0
train.leave_distributed_run()
print("left with", train.gloo_worker_threads(), "gloo workers")
"""


def leave(tmp_path, hold: str):
    """A one-process gloo run that holds its process group as `hold` says, then leaves through
    `leave_distributed_run`."""
    marker = tmp_path / "marker"
    script = LEAVING.format(examples=str(EXAMPLES), hold=hold, marker=str(marker))
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    completed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    return completed, sorted(marker.read_text().splitlines()) if marker.exists() else []


def test_leaving_frees_a_process_group_that_a_default_argument_captured(tmp_path):
    """A function defined (or imported) after init_process_group with `group=dist.group.WORLD` as a default keeps the
    group through destroy_process_group, as torch.distributed.nn.functional and deepspeed.comm.torch do: leaving
    frees it anyway, gloo's workers end, and the interpreter exits as usual (its thread joined, its atexit run)."""
    completed, markers = leave(tmp_path, "def barrier(group=dist.group.WORLD): pass")
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "left with 0 gloo workers" in completed.stdout and "leaving with os._exit" not in completed.stderr
    assert markers == ["atexit", "thread"]


def test_leaving_with_a_process_group_held_elsewhere_finishes_like_the_interpreter(tmp_path):
    """A group held where leaving cannot release it keeps gloo's workers alive: the run then waits for its threads,
    runs its atexit handlers and leaves with os._exit(0), before the interpreter's teardown could abort it."""
    completed, markers = leave(tmp_path, "held = [dist.group.WORLD]")
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "leaving with os._exit" in completed.stderr and "left with" not in completed.stdout
    assert markers == ["atexit", "thread"]
