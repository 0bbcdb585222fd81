"""The low end of the supported transformers range: the trainer tests again, in the vLLM environment (5.17).

The main suite runs on transformers 5.24, the high end; the vLLM environment (`tests/vllm_env.sh`) resolves this
package's own ranges next to vLLM 0.31 to transformers 5.17. The tests here need nothing the vLLM environment lacks.
"""

import os
import subprocess
from pathlib import Path

import pytest

VLLM_PYTHON = os.environ.get("GVM_VLLM_PYTHON")
ROOT = Path(__file__).resolve().parents[1]
TRAINER_TESTS = ["test_trainer.py", "test_trl_parity.py", "test_schedules.py", "test_advantages.py"]


@pytest.mark.skipif(not VLLM_PYTHON, reason="no vLLM environment: run `bash tests/vllm_env.sh` and export GVM_VLLM_PYTHON")
def test_trainer_tests_pass_on_the_oldest_supported_transformers():
    version = subprocess.run([VLLM_PYTHON, "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version.startswith("5.17")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    command = [VLLM_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(f"tests/{t}" for t in TRAINER_TESTS)]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-4000:]
