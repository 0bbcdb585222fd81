"""A TRL outside the supported range is refused at `import gvm_trl`, naming the range and the fix."""

import subprocess
import sys
from pathlib import Path

import pytest
import trl

from gvm_trl.versions import ALLOW_UNSUPPORTED_TRL, SUPPORTED_TRL, check_trl_version, unsupported_trl_message

ROOT = Path(__file__).resolve().parents[1]
FIX = f'pip install "trl{SUPPORTED_TRL}"'


@pytest.mark.parametrize("version", ["1.16.0", "1.16.3", "1.16.1.dev0"])
def test_the_supported_releases_pass(version):
    assert unsupported_trl_message(version) is None


@pytest.mark.parametrize("version", ["1.17.0", "1.17.0.dev0", "1.15.0", "2.0.0", "unknown"])
def test_others_are_refused_naming_the_range_and_the_fix(version):
    message = unsupported_trl_message(version)
    assert f"trl {version} is installed" in message and FIX in message and "upgrade gvm-trl" in message


def test_importing_under_a_newer_trl_fails_first_with_the_refusal():
    """A fresh interpreter whose TRL says 1.17.0 (patched before `import gvm_trl`): the refusal is the error."""
    script = "import trl; trl.__version__ = '1.17.0'; import gvm_trl"
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0
    last_line = completed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: gvm-trl supports trl>=1.16,<1.17, but trl 1.17.0 is installed")
    assert FIX in last_line


def test_the_override_warns_instead(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(ImportError, match="trl 1.17.0 is installed"):
        check_trl_version()
    monkeypatch.setenv(ALLOW_UNSUPPORTED_TRL, "1")
    with pytest.warns(UserWarning, match="trl 1.17.0 is installed"):
        check_trl_version()
