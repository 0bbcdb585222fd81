"""Two CPU processes (gloo) against one: same allocations, same losses, same trained weights.

`torchrun --nproc_per_node 2` gives accelerate a real two-process MULTI_CPU run (`accelerate launch --cpu
--num_processes 2` silently starts one process), and each result records `accelerator.num_processes`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


def run(output_dir: Path, trainer: str, processes: int) -> list[dict]:
    output_dir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    per_device = 8 // processes  # the same global batch: 8 probe rows, 2 prompts per generation batch
    command = [*(launcher if processes > 1 else [sys.executable]), str(SCRIPT), "--trainer", trainer,
               "--output_dir", str(output_dir), "--per_device_train_batch_size", str(per_device), "--steps", "3"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return [json.loads(path.read_text()) for path in sorted(output_dir.glob("result-*.json"))]


@pytest.mark.parametrize("trainer", ["raft", "grpo"])
def test_two_processes_match_one(trainer, tmp_path):
    (single,) = run(tmp_path / "single", trainer, 1)
    ranks = run(tmp_path / "multi", trainer, 2)
    assert single["num_processes"] == 1
    assert [r["num_processes"] for r in ranks] == [2, 2]
    # Every process computed the allocation the single process did, from globally gathered p and G; in the first
    # generation batch one process's only prompt is always rejected (n_i = 0, no local training rows).
    assert single["records"][0]["sizes"][0] == 0
    for result in ranks:
        assert [r["sizes"] for r in result["records"]] == [r["sizes"] for r in single["records"]]
        assert [r["accept_rates"] for r in result["records"]] == [r["accept_rates"] for r in single["records"]]
        for mine, theirs in zip(result["records"], single["records"]):
            assert mine["grad_norms"] == pytest.approx(theirs["grad_norms"], rel=1e-5)
        assert result["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
        assert result["checksum"] == pytest.approx(single["checksum"], rel=1e-6)
