r"""Grading a batch with a pool of SymPy workers (``grade_answers``, ``symbolic.POOL``): a batch's stall, killed
workers, the processes' lifetime, fork and spawn, and verdicts identical to ``grade_answer`` one row at a time.

The timing and lifecycle tests run real worker processes whose request handler is replaced by a sleep (``SLOW_BOOT``:
the real ``worker_main`` loop, watchdog and protocol without SymPy), so they start in milliseconds and each request
takes exactly as long as the test says.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from gvm_trl import rewards
from gvm_trl.answers import symbolic
from gvm_trl.rewards import grade_answer, grade_answers, make_math_reward

REPO = Path(__file__).resolve().parents[1]
SLACK_S = 1.5

SLOW_BOOT = symbolic.WORKER_BOOT.replace(
    "importlib.import_module('_gvm_answers.symbolic').worker_main()\n",
    "import os, time\n"
    "module = importlib.import_module('_gvm_answers.symbolic')\n"
    "module._parser_class = lambda: None\n"
    "def run_request(request):\n"
    "    busy = os.environ.get('SLOW_WORKER_BUSY_DIR')\n"
    "    if busy:\n"
    "        open(os.path.join(busy, str(os.getpid())), 'w').close()\n"
    "    time.sleep(float(os.environ['SLOW_WORKER_SECONDS']))\n"
    "    return True\n"
    "module.run_request = run_request\n"
    "module.worker_main()\n",
)


def radical_rows(count: int, offset: int = 3) -> tuple[list[str], list[str]]:
    r"""Rows that each need one SymPy check of their own (``\sqrt{2k^2}`` against ``k\sqrt{2}``, all equal)."""
    completions = [rf"So the length is $\boxed{{\sqrt{{{2 * k * k}}}}}$." for k in range(offset, offset + count)]
    return completions, [rf"{k}\sqrt{{2}}" for k in range(offset, offset + count)]


def alive(pid: int) -> bool:
    """Whether *pid* is a process that has not exited (a zombie counts as exited but not reaped: see reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def reaped(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def wait_until(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def slow_pool(monkeypatch, tmp_path):
    """A fresh WORKER, POOL and cache whose workers sleep SLOW_WORKER_SECONDS per request, then answer "1"."""
    monkeypatch.setattr(symbolic, "WORKER_BOOT", SLOW_BOOT)
    monkeypatch.setattr(symbolic, "WORKER", symbolic.SymbolicWorker())
    monkeypatch.setattr(symbolic, "POOL", symbolic.WorkerPool())
    monkeypatch.setattr(symbolic, "CACHE", symbolic.OrderedDict())
    monkeypatch.setenv("SLOW_WORKER_BUSY_DIR", str(tmp_path))
    yield monkeypatch
    symbolic.POOL.close()


def started(size: int) -> list[symbolic.SymbolicWorker]:
    """The first *size* pool members, started and ready (their start is never part of a row's timeout)."""
    symbolic.POOL.start(size, wait=True)
    members = symbolic.POOL.members()[:size]
    assert all(w.pid for w in members)
    return members


def test_a_batch_of_slow_rows_stalls_about_one_timeout_not_one_per_row(slow_pool):
    slow_pool.setenv("SLOW_WORKER_SECONDS", "30")
    started(8)
    completions, golds = radical_rows(8)
    began = time.monotonic()
    verdicts = grade_answers(completions, golds, timeout=1.0, workers=8)
    wall = time.monotonic() - began
    assert verdicts == [False] * 8  # every row overran its 1 s
    assert wall < 3.0, wall

    started(1)
    began = time.monotonic()
    assert grade_answers(completions[:1], golds[:1], timeout=1.0, workers=1) == [False]
    assert time.monotonic() - began >= 1.0  # one after another, 8 rows would take at least 8 s


def test_fast_symbolic_rows_stay_on_one_worker(slow_pool, tmp_path):
    """Checks that finish quickly are not spread: more workers would only split the parse caches and the CPU.
    (The spreading delay is raised so that a busy machine's pauses do not pass for slow checks.)"""
    slow_pool.setenv("SLOW_WORKER_SECONDS", "0.01")
    slow_pool.setattr(rewards, "SPREAD_AFTER_S", 2.0)
    started(4)
    for marker in tmp_path.iterdir():
        marker.unlink()
    assert grade_answers(*radical_rows(12, offset=20), timeout=5.0, workers=4) == [True] * 12
    assert [int(m.name) for m in tmp_path.iterdir()] == [symbolic.WORKER.pid]


def test_a_worker_killed_mid_batch_is_replaced_and_the_batch_still_grades(slow_pool, tmp_path):
    slow_pool.setenv("SLOW_WORKER_SECONDS", "0.4")
    members = started(4)
    for marker in tmp_path.iterdir():
        marker.unlink()
    before = {w.pid for w in members}
    killed = []

    def kill_a_busy_worker():
        assert wait_until(lambda: any(tmp_path.iterdir()), 10.0)
        pid = int(next(tmp_path.iterdir()).name)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    completions, golds = radical_rows(8)
    verdicts = grade_answers(completions, golds, timeout=10.0, workers=4)
    killer.join()
    assert verdicts == [True] * 8  # the killed row was answered again by the replacement
    assert killed and killed[0] in before
    assert wait_until(lambda: reaped(killed[0]), 5.0)  # killed and waited for: no zombie
    now = {w.pid for w in symbolic.POOL.members()[:4]}
    assert killed[0] not in now and None not in now and len(now) == 4


def test_an_overrunning_worker_is_killed_reaped_and_replaced_by_a_standby_started_meanwhile(slow_pool):
    slow_pool.setenv("SLOW_WORKER_SECONDS", "30")
    members = started(2)
    pids = [w.pid for w in members]
    standbys = []

    def note_standbys():  # past half of each row's 3 s (the 2nd starts a spreading delay late), before a deadline
        time.sleep(2.3)
        standbys.extend(w._standby[0].pid for w in members if w._standby is not None)

    watcher = threading.Thread(target=note_standbys)
    watcher.start()
    assert grade_answers(*radical_rows(2, offset=40), timeout=3.0, workers=2) == [False, False]
    watcher.join()
    for pid in pids:
        assert wait_until(lambda p=pid: reaped(p), 5.0)
    assert sorted(w.pid for w in members) == sorted(standbys)  # each replacement was already importing


def test_pool_size_defaults_to_cpus_per_local_rank_capped_at_four(monkeypatch):
    monkeypatch.delenv(symbolic.POOL_SIZE_ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert symbolic.default_pool_size() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert symbolic.default_pool_size() == 2  # each of 8 ranks its own pool of 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert symbolic.default_pool_size() == 1
    monkeypatch.setenv(symbolic.POOL_SIZE_ENV, "6")
    assert symbolic.default_pool_size() == 6
    monkeypatch.setenv(symbolic.POOL_SIZE_ENV, "many")
    with pytest.raises(ValueError, match=symbolic.POOL_SIZE_ENV):
        make_math_reward()  # refused when the reward function is made, not at the first batch
    monkeypatch.delenv(symbolic.POOL_SIZE_ENV)
    for bad in (0, 2.5, "4", True):
        with pytest.raises(ValueError, match="workers"):
            make_math_reward(workers=bad)


HOSTILE = [
    (r"\boxed{\input{/etc/passwd}}", "1"),
    (r"\boxed{__import__('os').system('touch {marker}')}", "0"),
    ("__import__(os).system(touch)", "__import__(os).system(touch) + 0"),
    (r"\boxed{9^{9^{9^{9}}}}", r"9^{9^{9^{9}}}+1"),
    (r"\boxed{9^9^9^9}", "5"),
    (r"\boxed{" + ",".join(["1"] * 500_000) + "}", "1"),
    (r"\boxed{(a+b+c+d+f+g+h+k)^{20}}", "(a+b+c+d+f+g+h+k)^{19}(a+b+c+d+f+g+h) + (a+b+c+d+f+g+h+k)^{19} k"),
]


def test_hostile_answers_in_a_batch_execute_nothing_and_are_bounded(tmp_path):
    marker = tmp_path / "pwned"
    rows = [(c.replace("{marker}", str(marker)), g.replace("{marker}", str(marker))) for c, g in HOSTILE]
    completions, golds = [c for c, _ in rows], [g for _, g in rows]
    grade_answers(*radical_rows(2, offset=70), timeout=30.0, workers=2)  # both workers up: start-up is not timed
    began = time.monotonic()
    verdicts = grade_answers(completions, golds, timeout=2.0, workers=2)
    assert time.monotonic() - began < 2 * 2.0 + SLACK_S  # ceil(the slow rows / 2 workers) timeouts at most
    assert verdicts == [False] * len(rows)
    assert not marker.exists()


def _family_rows():
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_answer_families import CASES, ONE_WAY
        from test_rewards import EQUIVALENCE, PATHOLOGICAL, boxed
    finally:
        sys.path.pop(0)
    rows = []
    for _, cid, pred, gold, _ in CASES:
        rows.append((pred, gold))
        if cid not in ONE_WAY:
            rows.append((gold, pred))
    rows += [(boxed(p), g) for _, _, p, g, _ in EQUIVALENCE]
    rows += [(c, g) for _, c, g, expected in PATHOLOGICAL if expected is not None]
    return rows


def test_batch_verdicts_equal_one_row_at_a_time():
    rows = _family_rows()
    completions, golds = [c for c, _ in rows], [g for _, g in rows]
    serial = [grade_answer(c, g) for c, g in rows]
    symbolic.CACHE.clear()  # the batch asks the workers again rather than reading the serial results
    assert grade_answers(completions, golds, workers=3) == serial
    symbolic.CACHE.clear()
    assert make_math_reward(workers=2)(completions[:40], golds[:40]) == [1.0 if v else 0.0 for v in serial[:40]]


def test_cheap_rows_never_wait_for_a_worker(monkeypatch):
    def no_worker(*args, **kwargs):
        raise AssertionError("a row that needs no SymPy reached a worker")

    monkeypatch.setattr(symbolic.WorkerPool, "acquire", no_worker)
    monkeypatch.setattr(symbolic.SymbolicWorker, "request", no_worker)
    completions = [r"\boxed{7}", "so $x = \\frac{3}{4}$", r"\boxed{(1,2)}", "The answer is 12 cm.", "#### 5"] * 40
    golds = ["7", "0.75", "(2,1)", "12", "6"] * 40
    assert grade_answers(completions, golds) == [True, True, False, True, False] * 40


def _grade_in_child(out) -> None:
    completions, golds = radical_rows(3, offset=90)
    out.put((grade_answers(completions, golds, workers=2), [w.pid for w in symbolic.POOL.members()]))


def test_a_forked_child_grades_with_workers_of_its_own(slow_pool):
    slow_pool.setenv("SLOW_WORKER_SECONDS", "0.01")
    completions, golds = radical_rows(2, offset=80)
    assert grade_answers(completions, golds, workers=2) == [True, True]
    parent_pids = {w.pid for w in symbolic.POOL.members()[:2]}
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_grade_in_child, args=(out,))
    child.start()
    verdicts, child_pids = out.get(timeout=120)
    child.join(30)
    assert verdicts == [True] * 3 and child.exitcode == 0
    assert not parent_pids & set(child_pids)  # the child never wrote to its parent's workers
    assert all(wait_until(lambda p=pid: reaped(p) or not alive(p), 5.0) for pid in child_pids if pid)
    assert {w.pid for w in symbolic.POOL.members()[:2]} == parent_pids  # and the parent's are untouched
    assert grade_answers(*radical_rows(2, offset=85), workers=2) == [True, True]


LIFETIME_SCRIPT = textwrap.dedent(
    """
    import importlib, json, multiprocessing, os, sys, threading, time, types
    package = types.ModuleType("gvm_trl")  # the verifier without the trainer (nothing else is needed)
    package.__path__ = [os.path.join(sys.argv[1], "gvm_trl")]
    sys.modules["gvm_trl"] = package
    rewards = importlib.import_module("gvm_trl.rewards")
    symbolic = importlib.import_module("gvm_trl.answers.symbolic")
    symbolic.WORKER_BOOT = os.environ["SLOW_BOOT"]
    ROWS = ([r"\\boxed{\\sqrt{%d}}" % (2 * k * k) for k in range(3, 6)], [r"%d\\sqrt{2}" % k for k in range(3, 6)])

    def child(out):
        out.put((rewards.grade_answers(*ROWS, workers=2), [w.pid for w in symbolic.POOL.members()]))

    if __name__ == "__main__":
        how = sys.argv[2]
        if how == "spawn":
            context = multiprocessing.get_context("spawn")
            out = context.Queue()
            process = context.Process(target=child, args=(out,))
            process.start()
            verdicts, pids = out.get(timeout=120)
            process.join(60)
            print(json.dumps({"spawned": verdicts, "pids": pids}), flush=True)
            sys.exit(0)
        if how == "busy":
            os.environ["SLOW_WORKER_SECONDS"] = "600"
            threading.Thread(target=rewards.grade_answers, args=ROWS, kwargs={"timeout": 600.0, "workers": 3},
                             daemon=True).start()
            while len(os.listdir(os.environ["SLOW_WORKER_BUSY_DIR"])) < 3:
                time.sleep(0.05)
        else:
            assert rewards.grade_answers(*ROWS, workers=3) == [True] * 3
        print(json.dumps({"pids": [w.pid for w in symbolic.POOL.members()]}), flush=True)
        if how == "busy":
            time.sleep(600)
        if how == "os_exit":
            os._exit(0)
    """
)


@pytest.mark.parametrize("how", ["exit", "os_exit", "busy", "spawn"])
def test_pool_processes_end_with_the_interpreter(tmp_path, how):
    """Normal exit (atexit), ``os._exit`` (workers see their stdin close), a SIGKILL while the workers are busy
    (their watchdog sees the parent gone) and a spawned child's own pool: no worker process outlives its parent."""
    script = tmp_path / "lifetime.py"
    script.write_text(LIFETIME_SCRIPT)
    busy = tmp_path / "busy"
    busy.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLOW_BOOT": SLOW_BOOT, "SLOW_WORKER_SECONDS": "0.01",
           "SLOW_WORKER_BUSY_DIR": str(busy)}
    proc = subprocess.Popen([sys.executable, str(script), str(REPO), how], stdout=subprocess.PIPE, text=True, env=env)
    lines = json.loads(proc.stdout.readline())
    if how == "busy":
        proc.kill()
    assert proc.wait(60) == (-signal.SIGKILL if how == "busy" else 0)
    if how == "spawn":
        assert lines["spawned"] == [True] * 3
    pids = [pid for pid in lines["pids"] if pid]
    assert len(pids) == (2 if how == "spawn" else 3)
    assert wait_until(lambda: not any(alive(pid) for pid in pids), 5.0), [p for p in pids if alive(p)]


RANK_SCRIPT = textwrap.dedent(
    """
    import importlib, json, os, sys, types
    package = types.ModuleType("gvm_trl")
    package.__path__ = [os.path.join(sys.argv[1], "gvm_trl")]
    sys.modules["gvm_trl"] = package
    rewards = importlib.import_module("gvm_trl.rewards")
    symbolic = importlib.import_module("gvm_trl.answers.symbolic")
    symbolic.WORKER_BOOT = os.environ["SLOW_BOOT"]
    os.sched_getaffinity = lambda pid: set(range(int(os.environ["MACHINE_CPUS"])))  # a machine of that size
    rows = ([r"\\\\boxed{\\\\sqrt{%d}}" % (2 * k * k) for k in range(3, 9)], [r"%d\\\\sqrt{2}" % k for k in range(3, 9)])
    verdicts = rewards.make_math_reward()(*rows)
    size = symbolic.default_pool_size()
    print(json.dumps({"size": size, "verdicts": verdicts, "pids": [w.pid for w in symbolic.POOL.members()]}))
    """
)


def test_each_rank_of_a_multi_process_run_grades_with_a_small_pool_of_its_own(tmp_path):
    """Two processes as ``accelerate launch`` / ``torchrun`` start them on one 6-CPU machine (LOCAL_WORLD_SIZE=2):
    each sizes its pool to its share of the CPUs (3), grades with its own workers, and leaves none behind."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLOW_BOOT": SLOW_BOOT, "SLOW_WORKER_SECONDS": "0.3",
           "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2", "MACHINE_CPUS": "6"}
    env.pop(symbolic.POOL_SIZE_ENV, None)
    ranks = [subprocess.Popen([sys.executable, str(script), str(REPO)], stdout=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    results = [json.loads(rank.communicate(timeout=120)[0]) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks)
    pids = [set(filter(None, r["pids"])) for r in results]
    for result, own in zip(results, pids):
        assert result["size"] == 3
        assert result["verdicts"] == [1.0] * 6
        assert len(own) == result["size"]  # a batch of 6 SymPy rows used every worker of the pool, no more
    assert not pids[0] & pids[1]
    assert wait_until(lambda: not any(alive(pid) for pid in pids[0] | pids[1]), 5.0)
