"""The README's first example from a built wheel, installed outside the source tree (not an editable clone)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "gvm_trl" / "data"
TRAIN_FILES = {"math": "math_train_12k.jsonl.gz", "gsm8k": "gsm8k_train.jsonl.gz"}

# Run in a fresh interpreter from an empty folder with only the wheel's files ahead of site-packages: the
# README's imports, then its loader, then where gvm_trl was imported from.
README_EXAMPLE = """
import json, sys
from gvm_trl import GVMRAFTConfig, GVMRAFTTrainer, math_reward
from gvm_trl.data import load_train_dataset
import gvm_trl
out = {"file": gvm_trl.__file__}
for name in ("math", "gsm8k"):
    dataset = load_train_dataset(name)
    out[name] = {"rows": len(dataset), "columns": sorted(dataset.column_names), "answer": dataset[0]["answer"]}
print(json.dumps(out))
"""


def _stored_rows(name: str) -> tuple[int, str]:
    """Rows of the training file as stored in the repository, and the first row's gold, read independently."""
    with gzip.open(DATA / TRAIN_FILES[name], "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return len(rows), rows[0]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (built,) = out.glob("gvm_trl-*.whl")
    return built


def test_wheel_ships_the_training_sets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for filename in TRAIN_FILES.values():
        assert f"gvm_trl/data/{filename}" in names
    assert "gvm_trl/data/math500.jsonl" in names


def test_readme_example_loads_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), HF_DATASETS_CACHE=str(tmp_path / "hf_cache"), HF_HUB_OFFLINE="1")
    completed = subprocess.run([sys.executable, "-c", README_EXAMPLE], cwd=workdir, env=env, capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).resolve().is_relative_to(site.resolve())  # the wheel's copy, not the source tree
    for name in TRAIN_FILES:
        rows, first = _stored_rows(name)
        assert result[name]["rows"] == rows
        assert result[name]["columns"] == ["answer", "prompt"]
    assert result["gsm8k"]["answer"] == _stored_rows("gsm8k")[1]["answer"].rsplit("####", 1)[1].strip().replace(",", "")
