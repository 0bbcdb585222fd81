r"""Serve another revision's verifier to ``benchmarks/grader.py`` from another Python environment.

The verifier's LaTeX parser decides part of its results and speed, and two parsers cannot share one
environment (latex2sympy2 1.9.1 needs antlr4 4.7.2, latex2sympy2_extended >= 4.9.3). So ``grader.py
--baseline REV --baseline-python PY`` extracts REV's ``gvm_trl`` into a folder and starts this script under
PY, which loads that folder's ``answers`` package and ``rewards.py`` under a private name (no ``gvm_trl``
import, so PY needs only SymPy and the parser) and answers one JSON request per line:

* ``["grade", pairs, timeout]``       -> the verdict of each (completion, gold) pair
* ``["time", pairs, timeout]``        -> seconds to grade them all, measured here (no pipe in the timing)
* ``["sympy", pairs, timeout]``       -> whether grading each pair sent a request to the SymPy worker
* ``["cold", warm_up_pairs]``         -> empty every cache, restart the SymPy worker and warm it up
* ``["walls", pairs, timeout]``       -> wall seconds of each call (the hostile inputs)

    PY benchmarks/verifier_server.py FOLDER     (FOLDER holds the revision's gvm_trl/)
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import time
import types
from pathlib import Path


def load(folder: Path):
    """FOLDER/gvm_trl's ``rewards`` module, imported as ``_baseline_gvm.rewards`` without running its ``__init__``."""
    package = types.ModuleType("_baseline_gvm")
    package.__path__ = [str(folder / "gvm_trl")]
    sys.modules["_baseline_gvm"] = package
    return importlib.import_module("_baseline_gvm.rewards")


def cold(rewards, warm_up) -> None:
    symbolic = sys.modules["_baseline_gvm.answers.symbolic"]
    symbolic.WORKER.close()
    symbolic.CACHE.clear()
    for name in ("extraction", "normalisation", "comparison", "screening"):
        module = sys.modules.get(f"_baseline_gvm.answers.{name}")  # a module an older revision lacks: nothing to empty
        for value in vars(module).values() if module is not None else ():
            if hasattr(value, "cache_clear"):
                value.cache_clear()
    for completion, gold in warm_up:
        rewards.grade_answer(completion, gold)
    symbolic.CACHE.clear()


def main() -> None:
    rewards = load(Path(sys.argv[1]))
    symbolic = sys.modules["_baseline_gvm.answers.symbolic"]
    symbolic.WORKER.start()
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        op, *args = json.loads(line)
        if op == "grade":
            pairs, timeout = args
            out = [bool(rewards.grade_answer(c, g, timeout=timeout)) for c, g in pairs]
        elif op == "time":
            pairs, timeout = args
            began = time.perf_counter()
            for c, g in pairs:
                rewards.grade_answer(c, g, timeout=timeout)
            out = time.perf_counter() - began
        elif op == "sympy":
            pairs, timeout = args
            out = []
            for c, g in pairs:
                symbolic.CACHE.clear()
                rewards.grade_answer(c, g, timeout=timeout)
                out.append(bool(symbolic.CACHE))
        elif op == "walls":
            pairs, timeout = args
            out = []
            for c, g in pairs:
                began = time.monotonic()
                rewards.grade_answer(c, g, timeout=timeout)
                out.append(time.monotonic() - began)
        elif op == "cold":
            cold(rewards, args[0])
            out = None
        else:
            raise ValueError(f"unknown request {op!r}")
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
