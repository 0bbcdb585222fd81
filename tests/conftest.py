"""Shared fixtures: a character-level tokenizer and tiny random causal LMs, built locally (no Hub)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from gvm_trl.testing import make_char_tokenizer, make_tiny_llama

__all__ = ["BENCHMARKS", "benchmark_modules", "free_port", "load_benchmark", "make_char_tokenizer", "make_tiny_llama",
           "torchrun"]

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# The modules that take longest (most launch processes: torchrun, vLLM, other environments' pytest), longest first.
# Under pytest-xdist (`-n auto --dist loadfile --no-loadscope-reorder`, the README's test command) a module is one
# unit of work, handed out in collection order: long ones first, so that the short ones fill in behind them.
LONGEST_MODULES = ["test_distributed.py", "test_vllm.py", "test_versions.py", "test_trl_features.py",
                   "test_benchmark_convergence.py", "test_examples.py", "test_benchmarks_smoke.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


if os.environ.get("PYTEST_XDIST_WORKER"):  # a test worker among several: its share of the cores, not all of them
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def free_port() -> int:
    """A TCP port nothing listens on now: launches in parallel test workers would all take the default 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(processes: int) -> list[str]:
    """The command that starts `processes` local processes of a script (gloo on the CPU), on a port of its own."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(free_port())]


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
