"""Math answer verification: extraction (the final answer of a completion), comparison (two answers are
equal), numbers (the SymPy-free fast path) and symbolic (latex2sympy2_extended + SymPy in a worker process).

This package imports nothing outside the standard library at import time, so the SymPy worker can load it
on its own (see ``symbolic.WORKER_BOOT``); ``gvm_trl.rewards`` is the public API.
"""
