"""benchmarks/grad_norms.py and benchmarks/gpu_smoke.sh: where results go, and the smoke run's time budget."""

from __future__ import annotations

import re
import subprocess
from argparse import Namespace
from pathlib import Path

from conftest import BENCHMARKS, load_benchmark


def test_a_quick_run_never_writes_over_a_committed_result():
    """Issue 27 item 6: `--quick` wrote its smoke-test figures to benchmarks/results/grad_norms.json."""
    grad_norms = load_benchmark("grad_norms")
    committed = {p.name for p in (BENCHMARKS / "results").glob("grad_norms*.json")}
    for default in ("grad_norms.json", "grad_norms_count.json", "grad_norms_generic.json"):
        quick = grad_norms.output_path(Namespace(output=None, quick=True), default)
        assert "benchmarks/results" not in quick.as_posix() and quick.name not in committed
        assert grad_norms.output_path(Namespace(output=None, quick=False), default) == Path("benchmarks/results",
                                                                                             default)
    assert grad_norms.output_path(Namespace(output="x/y.json", quick=True), "grad_norms.json") == Path("x/y.json")


def test_gpu_smoke_fits_in_eight_minutes_with_every_kill_after():
    """Its stage limits allowed 530 s with the kill-afters. Every stage takes its limit from one list, whose sum
    with a kill-after each must stay within 480 s."""
    script = (BENCHMARKS / "gpu_smoke.sh").read_text()
    subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_smoke.sh")], check=True)
    limits = [int(x) for x in re.search(r"^limits=\(([\d ]+)\)", script, re.M).group(1).split()]
    kill_after = int(re.search(r"^kill_after=(\d+)", script, re.M).group(1))
    assert sum(limits) + len(limits) * kill_after <= 480
    assert "timeout --signal=INT --kill-after=$kill_after" in script
    bash = script[: script.index("<<'EOF'")]  # the verdict's Python follows
    calls = re.findall(r"^\s*stage (.*)$", bash, re.M)
    assert calls and all(re.match(r'"?[\w$]+"? "\$\{limits\[[\w$]+\]\}" ', call) for call in calls)
    assert {re.match(r'"?([\w$]+)', call).group(1) for call in calls} == {"checks", "grad_norms", "step_cost",
                                                                          "fsdp_$trainer"}
