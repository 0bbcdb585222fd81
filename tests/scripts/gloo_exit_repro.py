"""Does a two-process gloo run abort at interpreter exit? Runs many trials of one exit scenario and counts how they end.

One torch import, then per trial two forked ranks on a fresh TCP port; each rank runs the scenario and leaves the way
a script does (the end of the module: atexit handlers, then interpreter finalization), with ``os._exit(0)``
(``--exit os_exit``), or through examples/train.py's `leave_distributed_run` (``--exit leave``). A rank's stderr goes
to a file, so that the abort's message ("terminate called without an active exception") is counted.

    python tests/scripts/gloo_exit_repro.py --scenario starved --trials 20
    python tests/scripts/gloo_exit_repro.py --scenario starved --trials 20 --destroy --pinned_default

Scenarios (after a few ordinary collectives):
  sync          nothing more: every collective was waited for
  starved       one more all_reduce whose tensor Python drops at once, with the rank on one CPU and its gloo worker
                threads at the lowest priority, so that a worker frees that tensor late, as the main thread leaves
                (what a loaded machine does now and then)
  pending       one more all_reduce issued with ``async_op=True`` and never waited for
  daemon_wait   on rank 0 a daemon thread waits on an all_reduce that rank 1 joins only ``--delay`` seconds later,
                when rank 0 is already finalizing its interpreter
``--destroy`` calls ``destroy_process_group()`` before leaving. ``--pinned_default`` defines, after
init_process_group, a function with ``group=dist.group.WORLD`` as a default argument, as torch.distributed.nn.functional
and deepspeed.comm.torch do when imported late: that default keeps the group, and gloo's workers, alive through
destroy_process_group.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def starve_gloo_workers(rank: int) -> None:
    """Put the rank on one CPU and its gloo worker threads at the lowest priority."""
    for task in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(task), {rank % os.cpu_count()})
        with open(f"/proc/self/task/{task}/comm", encoding="utf-8") as handle:
            if handle.read().strip() == "pt_gloo_runloop":
                os.setpriority(os.PRIO_PROCESS, int(task), 19)


def run_rank(rank: int, port: int, options) -> None:
    """The scenario, on one rank; returns when the rank should leave."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if options.pinned_default:
        exec("def barrier(group=dist.group.WORLD):\n    return dist.barrier(group=group)\n", globals())
    for _ in range(3):
        dist.all_reduce(torch.ones(options.size))
    if options.scenario == "starved":
        starve_gloo_workers(rank)
        tensor = torch.ones(options.size)
        dist.all_reduce(tensor)
        del tensor  # Python lets go first: the tensor's Python object now dies with the gloo worker's reference
    elif options.scenario == "pending":
        globals()["work"] = dist.all_reduce(torch.ones(options.size), async_op=True)
    elif options.scenario == "daemon_wait":
        if rank == 0:  # a daemon thread blocks in wait(), the GIL released, while this rank goes on to exit
            work = dist.all_reduce(torch.ones(options.size), async_op=True)
            threading.Thread(target=work.wait, daemon=True).start()
        else:
            time.sleep(options.delay)
            dist.all_reduce(torch.ones(options.size))
    if options.destroy:
        dist.destroy_process_group()


def trial(options) -> list[str]:
    """Two ranks once; how each ended ('exit 0', 'exit 1', 'signal SIGABRT', ...), '+terminate' if it said so,
    '+os._exit fallback' if `leave_distributed_run` could not free the process group."""
    port, children = free_port(), []
    for rank in range(2):
        log = tempfile.NamedTemporaryFile(prefix=f"rank{rank}-", suffix=".log", delete=False)
        pid = os.fork()
        if pid == 0:
            os.dup2(log.fileno(), 2)
            try:
                run_rank(rank, port, options)
                if options.exit == "leave":
                    import train

                    train.leave_distributed_run()
            except BaseException as error:  # noqa: BLE001 - a failed scenario is an outcome, not a harness crash
                print(repr(error), file=sys.stderr)
                os._exit(1)
            if options.exit == "os_exit":
                os._exit(0)
            raise SystemExit(0)  # the interpreter's own exit: atexit handlers, finalization, C++ static destructors
        children.append((pid, log.name))
    outcomes = []
    for pid, log_name in children:
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            outcome = f"signal {signal.Signals(os.WTERMSIG(status)).name}"
        else:
            outcome = f"exit {os.WEXITSTATUS(status)}"
        with open(log_name, encoding="utf-8", errors="replace") as handle:
            said = handle.read()
        outcome += " +terminate" * ("terminate called" in said) + " +os._exit fallback" * ("leaving with os._exit" in said)
        os.unlink(log_name)
        outcomes.append(outcome)
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["sync", "starved", "pending", "daemon_wait"], default="starved")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--size", type=int, default=1 << 20, help="float32 elements per all_reduce")
    parser.add_argument("--destroy", action="store_true", help="destroy_process_group() before leaving")
    parser.add_argument("--pinned_default", action="store_true",
                        help="a default argument captures the group after init (as a late import does)")
    parser.add_argument("--delay", type=float, default=0.5, help="daemon_wait: seconds before rank 1 joins")
    parser.add_argument("--exit", choices=["interpreter", "os_exit", "leave"], default="interpreter")
    options = parser.parse_args()
    if options.exit == "leave":
        sys.path.insert(0, str(EXAMPLES))
        import train  # noqa: F401 - imported once, before the ranks fork

    counts = collections.Counter(outcome for _ in range(options.trials) for outcome in trial(options))
    print(json.dumps({"settings": vars(options), "ranks": 2 * options.trials, "outcomes": dict(counts)}), flush=True)


if __name__ == "__main__":
    main()
