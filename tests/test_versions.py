"""Both ends of the supported ranges, each in an environment of its own.

The main suite runs on the `test` extra's stack (transformers 5.24, accelerate 1.15, peft 0.21, torch 2.13). The vLLM
environment (`tests/vllm_env.sh`) resolves this package's ranges next to vLLM 0.31 to transformers 5.17, the low end,
where the trainer tests run again. The compat environment (`tests/compat_env.sh`) resolves them alone, to the newest
transformers, accelerate, peft and datasets on the index, with the newest torch pip installs here; the tests run there
compare against a reference computed in the same environment (TRL's own trainer, a float64 loop), so they hold at any
version.
"""

import os
import subprocess
from pathlib import Path

import pytest

VLLM_PYTHON = os.environ.get("GVM_VLLM_PYTHON")
COMPAT_PYTHON = os.environ.get("GVM_COMPAT_PYTHON")
ROOT = Path(__file__).resolve().parents[1]
TRAINER_TESTS = ["test_trainer.py", "test_trl_parity.py", "test_schedules.py", "test_advantages.py"]
# TRL-feature cases whose path goes through transformers, accelerate, tokenizers or peft (the rest vary TRL's own
# arithmetic, which these releases do not change): two fifths of the file's time; all of it ran once (README).
FEATURE_CASES = ["conversational", "standard-prompt", "reward-model", "beta-and-ref-model", "sync-ref-model",
                 "multiple-iterations", "cast-lm-head-to-fp32", "generation-kwargs", "non-dividing-steps"]
FEATURE_TESTS = [f"test_feature_matches_trl_with_gvm_off_and_trains_with_gvm_on[{case}]" for case in FEATURE_CASES] + [
    "test_iterable_dataset_matches_trl_and_trains_with_gvm", "test_moe_router_auxiliary_loss_matches_trl",
    "test_peft_adapters_train_as_in_trl", "test_evaluation_runs_trls_own_loop",
    "test_training_step_receives_trls_generation_batches",
]
COMPAT_TESTS = [
    "test_trl_parity.py",
    *(f"test_trl_features.py::{test}" for test in FEATURE_TESTS),
    "test_grad_norms_architectures.py",
    "test_trainer.py::test_trains_end_to_end_and_logs_gvm_metrics",  # two steps of each trainer
    "test_trl_compat.py",
    "test_supported_trl.py",
]


def transformers_version(python: str) -> str:
    return subprocess.run([python, "-c", "import transformers; print(transformers.__version__)"],
                          capture_output=True, text=True, check=True).stdout.strip()


def run_tests(python: str, tests: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(f"tests/{t}" for t in tests)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.skipif(not VLLM_PYTHON,
                    reason="no vLLM environment: run `bash tests/vllm_env.sh` and export GVM_VLLM_PYTHON")
def test_trainer_tests_pass_on_the_oldest_supported_transformers():
    assert transformers_version(VLLM_PYTHON).startswith("5.17")
    completed = run_tests(VLLM_PYTHON, TRAINER_TESTS)
    assert completed.returncode == 0, completed.stdout[-4000:]


@pytest.mark.skipif(not COMPAT_PYTHON,
                    reason="no compat environment: run `bash tests/compat_env.sh` and export GVM_COMPAT_PYTHON")
def test_parity_features_and_norms_pass_on_the_newest_releases():
    completed = run_tests(COMPAT_PYTHON, COMPAT_TESTS)
    assert completed.returncode == 0, completed.stdout[-4000:]
