"""Shared fixtures: a character-level tokenizer and tiny random causal LMs, built locally (no Hub)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from gvm_trl.testing import make_char_tokenizer, make_tiny_llama

__all__ = ["BENCHMARKS", "benchmark_modules", "load_benchmark", "make_char_tokenizer", "make_tiny_llama"]

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextmanager
def benchmark_modules(*names: str):
    """The benchmark scripts `names` as modules, imported as siblings (as when run from their folder)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(str(BENCHMARKS))


def load_benchmark(name: str):
    """One benchmark script as a fresh module `benchmark_<name>` (its siblings stay importable for its workers)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for the duration of a module's tests, restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture
def tiny_llama(char_tokenizer):
    return make_tiny_llama(char_tokenizer)
