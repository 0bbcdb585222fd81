"""Benchmark ``per_sample_grad_norms`` against per-sample autograd loops and a plain training step.

Timed per completion length, on one batch of completions from a random model (no Hub access needed):

  (a) the official GVM code's loop: one sample at a time, ``autograd.grad`` w.r.t. ``embed_tokens`` only,
      loss = −Σ log π over the response tokens;
  (b) the same loop over all parameters (the exact reference);
  (c) ``per_sample_grad_norms(params="all")``;
  (c2) ``per_sample_grad_norms(params="lm_head")`` on an untied copy of the model;
  (d) one plain batched forward+backward of the token-mean loss (the cost of a training micro-step);

and reports a/c, b/c, c/d, c2/d (c2 against d of the untied model), the same ratios in matmul and attention FLOPs
(``gvm_trl.grad_norms.counting``: independent of machine load, which on a shared CPU distorts timings), peak memory
and the max relative error of (c) against (b). Cases are timed round-robin, ``--repeats`` times, best kept.

``--generic`` instead times the exact generic rule (a per-sample re-run of each module and a VJP) against the fast
rules on the same model and batch: a Llama with every decoder-layer parameter forced onto the generic rule, and a
Qwen3-MoE whose experts and routers need it, against the same model measured without them.
CPU memory is the peak process RSS above the RSS before the call, sampled every 2 ms with psutil
(torch allocations are invisible to tracemalloc); CUDA memory is ``torch.cuda.max_memory_allocated`` above the
allocation before the call.

    python benchmarks/grad_norms.py --quick                # smoke test, < 1 minute
    python benchmarks/grad_norms.py                        # CPU: hidden 256, 4 layers, vocab 49152 (SmolLM2-like)
    python benchmarks/grad_norms.py --device cuda          # Qwen2-0.5B-shaped, bf16, batch 64
    python benchmarks/grad_norms.py --generic [--quick]    # cost of the generic rule vs the fast rules
    python benchmarks/grad_norms.py --count [--quick]      # ops, host syncs, FLOPs per call; predicted H200 time
    python benchmarks/grad_norms.py --gram-precision       # error of bf16/TF32 Gram factors against float64
    python benchmarks/grad_norms.py --against DIR          # CPU c/d of an older grad_norms package vs this one
    python benchmarks/grad_norms.py --checks --device cuda # issue 26's GPU-only paths, pass/fail (gpu_smoke.sh)

A ``--quick`` run writes to a temporary folder unless ``--output`` is given: its figures are a smoke test's, never
a result to keep.

``--checks`` runs on one device what only a GPU takes (``--quick``: the same code on CPU-sized shapes): a
micro-batch sized from free memory for ``embed_tokens``, LoRA and all parameters (its peak within the free memory
it was sized for, and a tighter figure splitting the batch with the same norms); fp32 weights under bf16 autocast
with generic re-runs (within 3 % of fp32); the bf16 Gram kernel against fp32 Grams; host syncs per call (≤ 2);
the prepared-mask guard in the model's dtype. It exits 1 when a check fails.

``--against DIR`` times (wall clock, and the process's CPU time, which other processes' load disturbs less: one
thread), interleaved in one process on the CPU preset, the pass of an older copy of the package
(``DIR/old_grad_norms``, e.g. ``mkdir -p DIR && git archive 533bfbd gvm_trl/grad_norms | tar -x -C DIR &&
mv DIR/gvm_trl/grad_norms DIR/old_grad_norms``), this one and the plain forward+backward, so both c/d ratios see the
same machine load.

``--count`` counts what one call issues (``gvm_trl.grad_norms.counting``: ATen ops that launch a kernel, host
syncs, FLOPs, bytes) for the pass (c) and one plain forward+backward (d) of the same batch, on Qwen2-0.5B's
structure and widths (hidden 896, 24 layers, 14/2 heads, MLP 4864, tied) with a 2,048-token vocabulary so that it
runs on a CPU; the counts do not depend on the machine or its load. It then predicts the H200 time of both at the
issue-18 GPU setting (batch 64 in micro-batches of 16, vocab 151,936, bf16) as ops × host cost per op + FLOPs /
peak + bytes / bandwidth, the cost per op fitted on the measured 2.54 s (pass) and 0.448 s (plain) (``predict_h200``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import gvm_trl.grad_norms.planning as planning  # noqa: E402
from gvm_trl.grad_norms import per_sample_grad_norms  # noqa: E402
from gvm_trl.grad_norms.rules import GENERIC  # noqa: E402

PRESETS = {
    "cpu": dict(
        arch="llama", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=49152,
        batch=16, prompt=32, completions=[128, 384], dtype="float32",
    ),
    "cuda": dict(
        arch="qwen2", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
        batch=64, prompt=32, completions=[128, 384], dtype="bfloat16", micro_batch_size=16,
    ),
    "quick": dict(
        arch="llama", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=2048,
        batch=4, prompt=16, completions=[32, 96], dtype="float32",
    ),
}


def build_model(cfg: dict, tied: bool, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
        tie_word_embeddings=tied, max_position_embeddings=4096,
    )
    config = LlamaConfig(**common) if cfg["arch"] == "llama" else Qwen2Config(**common)
    cls = LlamaForCausalLM if cfg["arch"] == "llama" else Qwen2ForCausalLM
    with torch.device(device):  # initialised where it runs: seconds for a 0.5B model on a GPU, not half a minute
        return cls(config).to(dtype=getattr(torch, cfg["dtype"])).eval()


def make_batch(cfg: dict, completion: int, batch: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded prompts of 1/2..1× ``prompt`` tokens, right-padded completions of 1/2..1× ``completion``."""
    g = torch.Generator().manual_seed(seed)
    prompt = cfg["prompt"]
    p_lens = torch.randint(prompt // 2, prompt + 1, (batch,), generator=g)
    c_lens = torch.randint(completion // 2, completion + 1, (batch,), generator=g)
    c_lens[0] = completion
    ids = torch.randint(0, cfg["vocab"], (batch, prompt + completion), generator=g)
    attention = torch.zeros_like(ids)
    loss = torch.zeros_like(ids)
    for b, (p, c) in enumerate(zip(p_lens.tolist(), c_lens.tolist())):
        attention[b, prompt - p : prompt + c] = 1
        loss[b, prompt : prompt + c] = 1
    ids = ids.masked_fill(attention == 0, 0)
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=attention, loss_mask=loss).items()}


def rows(batch: dict[str, torch.Tensor]):
    """Unpadded (ids, response mask) of each row."""
    for ids, att, loss in zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]):
        keep = att.bool()
        yield ids[keep][None], loss[keep].bool()


def response_log_prob(model: torch.nn.Module, ids: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[0, :-1].float()
    log_probs = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return log_probs[response[1:]].sum()


def loop_norms(model: torch.nn.Module, batch: dict, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Per-sample autograd loop: ‖∇ (−Σ log π)‖ w.r.t. ``params``, one unpadded sample at a time."""
    norms = []
    for ids, response in rows(batch):
        grads = torch.autograd.grad(-response_log_prob(model, ids, response), params, allow_unused=True)
        norms.append(sum(g.double().square().sum() for g in grads if g is not None).sqrt())
    return torch.stack(norms)


def plain_step(model: torch.nn.Module, batch: dict, micro_batch_size: int | None = None) -> None:
    """Batched forward+backward of the token-mean loss, as in a training step (accumulated over micro-batches)."""
    size = len(batch["input_ids"])
    step = micro_batch_size or size
    tokens = batch["loss_mask"][:, 1:].sum()
    for start in range(0, size, step):
        ids, attention, counted = (batch[k][start : start + step] for k in ("input_ids", "attention_mask", "loss_mask"))
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        log_probs = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        (-log_probs[counted[:, 1:].bool()].sum() / tokens).backward()
    model.zero_grad(set_to_none=True)


class PeakMemory:
    """Peak memory (MiB) of the measured call above what was in use before it."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil

        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.running = False
            self.thread.join()
            self.mib = (max(self.peak, self.process.memory_info().rss) - self.base) / 2**20


def timed(fn: Callable[[], object], device: str) -> tuple[float, float, object]:
    """(seconds, peak MiB, result) of one call."""
    with PeakMemory(device) as memory:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, memory.mib, result


def gflops(fn: Callable[[], object]) -> float:
    """Matmul and attention GFLOPs of one call (``gvm_trl.grad_norms.counting``: torch's formulas, except attention,
    counted there because torch's SDPA counter asserts on grouped-query shapes)."""
    from gvm_trl.grad_norms.counting import count

    return count(fn).flops / 1e9


def ratios(values: dict[str, float]) -> dict[str, float]:
    return {
        "a/c": values["a_official_loop_embed"] / values["c_hooks_all"],
        "b/c": values["b_loop_all"] / values["c_hooks_all"],
        "c/d": values["c_hooks_all"] / values["d_plain_fwd_bwd"],
        "c2/d": values["c2_hooks_lm_head_untied"] / values["d_plain_fwd_bwd_untied"],
    }


def run_length(cfg: dict, tied_model, untied_model, completion: int, args) -> dict:
    device = args.device
    batch = make_batch(cfg, completion, cfg["batch"], device)
    embed = tied_model.get_input_embeddings().weight
    all_params = list(tied_model.parameters())
    for p in all_params:
        p.requires_grad_(True)
    mb, pass_mb = args.micro_batch_size, args.pass_micro_batch_size
    cases = {
        "a_official_loop_embed": lambda: loop_norms(tied_model, batch, [embed]),
        "b_loop_all": lambda: loop_norms(tied_model, batch, all_params),
        "c_hooks_all": lambda: per_sample_grad_norms(tied_model, **batch, params="all", micro_batch_size=pass_mb),
        "c2_hooks_lm_head_untied": lambda: per_sample_grad_norms(
            untied_model, **batch, params="lm_head", micro_batch_size=pass_mb
        ),
        "d_plain_fwd_bwd": lambda: plain_step(tied_model, batch, mb),
        "d_plain_fwd_bwd_untied": lambda: plain_step(untied_model, batch, mb),
    }
    warm = make_batch(cfg, 8, 2, device, seed=1)
    per_sample_grad_norms(tied_model, **warm, params="all")
    plain_step(tied_model, warm)
    seconds, mib, outputs = defaultdict(list), {}, {}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            elapsed, peak, outputs[name] = timed(fn, device)
            seconds[name].append(elapsed)
            mib.setdefault(name, peak)
    best = {name: min(times) for name, times in seconds.items()}
    flops = {name: gflops(fn) for name, fn in cases.items()} if args.flops else {}
    for name in cases:
        flop_text = f"  {flops[name]:8.1f} GFLOP" if flops else ""
        label = f"T={cfg['prompt']}+{completion} {name}"
        print(f"  {label:36s} {best[name]:8.3f} s  peak {mib[name]:8.1f} MiB{flop_text}")
    reference = outputs["b_loop_all"].double().cpu()
    error = ((outputs["c_hooks_all"].double().cpu() - reference).abs() / reference).max().item()
    time_ratios = ratios(best)
    flop_ratios = ratios(flops) if flops else {}
    print("  time ratios " + "  ".join(f"{k} {v:.2f}" for k, v in time_ratios.items()))
    if flop_ratios:
        print("  FLOP ratios " + "  ".join(f"{k} {v:.2f}" for k, v in flop_ratios.items()))
    print(f"  max rel err (c vs b) {error:.2e}", flush=True)
    return {
        "completion_max": completion,
        "tokens_per_row_mean": round(batch["attention_mask"].sum(1).float().mean().item(), 1),
        "seq_len_padded": batch["input_ids"].shape[1],
        "seconds": {k: round(v, 4) for k, v in best.items()},
        "seconds_all_repeats": {k: [round(t, 4) for t in v] for k, v in seconds.items()},
        "peak_mib": {k: round(v, 1) for k, v in mib.items()},
        "gflop": {k: round(v, 2) for k, v in flops.items()},
        "ratios_time": {k: round(v, 3) for k, v in time_ratios.items()},
        "ratios_flops": {k: round(v, 3) for k, v in flop_ratios.items()},
        "max_rel_error_c_vs_b": error,
    }


GENERIC_PRESETS = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=2048, batch=8, prompt=16,
                 completion=64),
    "small": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=8192, batch=8, prompt=32,
                  completion=128),
}


@contextlib.contextmanager
def generic_decoder_layers(model: torch.nn.Module):
    """Plan every parameter outside the embeddings and the head onto the generic rule (for timing it)."""
    keep = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    original = planning.rule_for
    planning.rule_for = lambda module, attr, shape: original(module, attr, shape) if id(module) in keep else GENERIC
    try:
        yield
    finally:
        planning.rule_for = original


def generic_cost(args) -> dict:
    """Seconds of the pass with the fast rules vs with the generic rule where it is forced or needed."""
    import warnings

    warnings.filterwarnings("ignore", message=".*generic rule")
    sizes = ["tiny"] if args.quick else ["tiny", "small"]
    results = []
    for size in sizes:
        cfg = dict(GENERIC_PRESETS[size], dtype="float32", arch="llama")
        batch = make_batch(cfg, cfg["completion"], cfg["batch"], "cpu")
        llama = build_model(cfg, True, "cpu")
        torch.manual_seed(0)
        moe = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
            num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"], intermediate_size=cfg["intermediate"],
            moe_intermediate_size=cfg["intermediate"] // 4, num_experts=8, num_experts_per_tok=2,
            head_dim=cfg["hidden"] // cfg["heads"], max_position_embeddings=4096,
        )).eval()
        fast_only = r"embed_tokens|lm_head|self_attn|layernorm|norm\.weight"

        def forced(model=llama):
            with generic_decoder_layers(model):
                return per_sample_grad_norms(model, **batch, params="all")

        cases = {
            "llama_fast": lambda: per_sample_grad_norms(llama, **batch, params="all"),
            "llama_layers_generic": forced,
            "moe_fast_parameters_only": lambda: per_sample_grad_norms(moe, **batch, params=fast_only),
            "moe_all_experts_generic": lambda: per_sample_grad_norms(moe, **batch, params="all"),
        }
        for fn in cases.values():  # warm-up (and vmap's one-off probe of which modules it can batch)
            fn()
        seconds = defaultdict(list)
        for _ in range(args.repeats):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - start)
        best = {name: min(times) for name, times in seconds.items()}
        error = ((forced().double() - cases["llama_fast"]().double()).abs() / cases["llama_fast"]().double()).max()
        generic_params = sum(p.numel() for n, p in moe.named_parameters() if "experts" in n or "mlp.gate" in n)
        result = {
            "size": size, "config": cfg, "seconds": {k: round(v, 4) for k, v in best.items()},
            "llama_generic_over_fast": round(best["llama_layers_generic"] / best["llama_fast"], 2),
            "moe_all_over_fast_only": round(best["moe_all_experts_generic"] / best["moe_fast_parameters_only"], 2),
            "llama_generic_vs_fast_max_rel_diff": float(error),
            "moe_generic_parameter_share": round(generic_params / sum(p.numel() for p in moe.parameters()), 3),
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    return {"threads": args.threads, "torch": torch.__version__, "repeats": args.repeats, "results": results}


# Measured on the H200 (issue 18; batch 64 in micro-batches of 16, prompt 32 + completion 128, bf16, vocab 151,936),
# and what --count found for the code measured then (commit 533bfbd) per micro-batch: kernel-launching ops, and the
# device time of its FLOPs and bytes at the H200's peak rates (scaled to the GPU setting by predict_h200).
H200_MEASURED = {"pass_s": 2.54, "plain_s": 0.448, "micro_batches": 4}
H200_CALIBRATION = {"pass_ops": 9184, "plain_ops": 2855, "pass_device_s": 0.0828, "plain_device_s": 0.0809}
H200_PEAK_FLOPS = 989e12  # dense bf16
H200_BANDWIDTH = 4.8e12  # HBM3e, bytes/s
COUNT_PRESETS = {
    "qwen2-0.5b": dict(arch="qwen2", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=2048,
                       batch=4, prompt=32, completions=[128], dtype="float32"),
    "quick": dict(arch="qwen2", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=2048,
                  batch=4, prompt=16, completions=[32], dtype="float32"),
}
GPU_VOCAB, GPU_BATCH, GPU_MICRO_BATCH = 151936, 64, 16


def count_calls(cfg: dict, completion: int, micro_batch_size: int | None) -> dict:
    """Counts of one pass call (c, params="all") and one plain forward+backward (d) on the same batch."""
    from gvm_trl.grad_norms.counting import count

    model = build_model(cfg, True, "cpu")
    for p in model.parameters():
        p.requires_grad_(True)
    batch = make_batch(cfg, completion, cfg["batch"], "cpu")
    warm = make_batch(cfg, 8, 2, "cpu", seed=1)
    per_sample_grad_norms(model, **warm, params="all")  # planning-time work happens once, as in a trainer
    return {
        "c_pass": count(lambda: per_sample_grad_norms(model, **batch, params="all",
                                                      micro_batch_size=micro_batch_size)).as_dict(),
        "d_plain": count(lambda: plain_step(model, batch)).as_dict(),
    }


def head_slope(cfg: dict, completion: int) -> dict:
    """FLOPs and bytes per extra vocabulary entry (a one-layer model at two vocabularies: the head is linear in V)."""
    counts = {}
    for vocab in (2048, 4096):
        counts[vocab] = count_calls(dict(cfg, layers=1, vocab=vocab), completion, None)
    return {case: {unit: (counts[4096][case][unit] - counts[2048][case][unit]) / 2048 for unit in ("gflop", "gbytes")}
            for case in ("c_pass", "d_plain")}


def predict_h200(counted: dict, slope: dict, cfg: dict) -> dict:
    """Seconds on the H200 at the issue's GPU setting (batch 64 in micro-batches of 16, vocab 151,936, bf16):
    ops × host cost per op + FLOPs / peak + bytes / bandwidth.

    Device work is scaled from the counted batch to batch 64 and vocabulary 151,936, bytes halved for bf16, at the
    peak rates (a floor). The host cost per op is fitted on the measured times of the code of issue 18 (its ops
    and device time in ``H200_CALIBRATION``): the plain step gives the cost of a bare launch (≈ 32 µs), the pass of
    then ≈ 67 µs per op, its hooks and Python bookkeeping included. The prediction for the counted code is the
    range between the two: ``optimistic`` if its per-op overhead is now that of the plain step, ``conservative``
    if it is still that of the old pass."""
    scale = GPU_BATCH / cfg["batch"]
    device = {}
    for case in ("c_pass", "d_plain"):
        gflop = (counted[case]["gflop"] + slope[case]["gflop"] * (GPU_VOCAB - cfg["vocab"])) * scale
        gbytes = (counted[case]["gbytes"] + slope[case]["gbytes"] * (GPU_VOCAB - cfg["vocab"])) * scale / 2
        device[case] = gflop * 1e9 / H200_PEAK_FLOPS + gbytes * 1e9 / H200_BANDWIDTH
    micro = H200_MEASURED["micro_batches"]
    cal = H200_CALIBRATION
    per_op = {
        "optimistic": (H200_MEASURED["plain_s"] - cal["plain_device_s"]) / (micro * cal["plain_ops"]),
        "conservative": (H200_MEASURED["pass_s"] - cal["pass_device_s"]) / (micro * cal["pass_ops"]),
    }
    plain = micro * counted["d_plain"]["ops"] * per_op["optimistic"] + device["d_plain"]
    prediction = {"host_us_per_op": {k: round(v * 1e6, 1) for k, v in per_op.items()},
                  "device_s_at_peak": {k: round(v, 4) for k, v in device.items()}, "plain_s": round(plain, 3)}
    for name, cost in per_op.items():
        for micro_batches in (micro, 1):
            seconds = micro_batches * counted["c_pass"]["ops"] * cost + device["c_pass"]
            label = f"{name}_{micro_batches}_micro_batch" + ("es" if micro_batches > 1 else "")
            prediction[f"pass_s_{label}"] = round(seconds, 3)
            prediction[f"c/d_{label}"] = round(seconds / plain, 3)
    return prediction


def count_mode(args) -> dict:
    cfg = dict(COUNT_PRESETS["quick" if args.quick else "qwen2-0.5b"])
    cfg["batch"] = args.batch or cfg["batch"]
    completions = args.completions or cfg["completions"]
    results = []
    for completion in completions:
        counted = count_calls(cfg, completion, args.micro_batch_size)
        slope = head_slope(cfg, completion)
        prediction = predict_h200(counted, slope, cfg)
        ratio = counted["c_pass"]["ops"] / counted["d_plain"]["ops"]
        print(f"T={cfg['prompt']}+{completion}: pass {counted['c_pass']['ops']:,} ops, "
              f"{counted['c_pass']['host_syncs']} syncs, {counted['c_pass']['gflop']:.1f} GFLOP; plain fwd+bwd "
              f"{counted['d_plain']['ops']:,} ops, {counted['d_plain']['host_syncs']} syncs, "
              f"{counted['d_plain']['gflop']:.1f} GFLOP; ops ratio {ratio:.2f}", flush=True)
        print(f"  predicted H200 (batch 64, vocab 151,936, bf16): {json.dumps(prediction)}", flush=True)
        results.append({"completion_max": completion, "counts": counted, "ops_ratio_c/d": round(ratio, 3),
                        "head_slope_per_vocab_entry": slope, "h200_prediction": prediction})
    return {"config": cfg, "torch": torch.__version__, "micro_batch_size": args.micro_batch_size,
            "h200_measured": H200_MEASURED, "h200_calibration": H200_CALIBRATION, "results": results}


def gram_precision(args) -> dict:
    """Max relative error of the norms against a float64 per-sample loop with the batched Gram products' factors
    rounded to TF32 or bf16 (products of rounded factors are exact in fp32, the sums accumulate in fp32: what a GPU
    Gram in that precision with fp32 accumulation computes, up to summation order)."""
    import copy

    import gvm_trl.grad_norms.products as products

    cfg = dict(arch="qwen2", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=8192, batch=8,
               prompt=32, completions=[128], dtype="float32")
    model = build_model(cfg, True, "cpu")
    batch = make_batch(cfg, 128, cfg["batch"], "cpu")
    reference = copy.deepcopy(model).double()
    want = loop_norms(reference, batch, list(reference.parameters())).double()
    exact = products._gram

    def rounded(kind: str):
        def gram(x: torch.Tensor) -> torch.Tensor:
            x = x.float()
            if kind == "bf16":
                x = x.to(torch.bfloat16).float()
            else:  # TF32: round to nearest on 10 mantissa bits
                x = ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)
            return x @ x.mT
        return gram

    errors = {}
    try:
        for kind in ("fp32", "tf32", "bf16"):
            products._gram = exact if kind == "fp32" else rounded(kind)
            got = per_sample_grad_norms(model, **batch, params="all").double()
            errors[kind] = ((got - want).abs() / want).max().item()
            print(f"  Gram factors {kind}: max rel err vs float64 loop {errors[kind]:.2e}", flush=True)
    finally:
        products._gram = exact
    return {"config": cfg, "max_rel_error_vs_float64": errors,
            "note": "only the stacked Grams of single-use matrices are rounded; the head/embedding terms stay fp32"}


def against(args) -> dict:
    """CPU c/d of an older copy of the package (``DIR/old_grad_norms``) and of this one, interleaved."""
    import importlib
    import sys

    sys.path.insert(0, args.against)
    old = importlib.import_module("old_grad_norms")
    torch.set_num_threads(args.threads)
    cfg = dict(PRESETS["cpu"])
    cfg["completions"] = args.completions or cfg["completions"]
    model = build_model(cfg, True, "cpu")
    results = []
    for completion in cfg["completions"]:
        batch = make_batch(cfg, completion, cfg["batch"], "cpu")
        cases = {
            "c_before": lambda: old.per_sample_grad_norms(model, **batch, params="all"),
            "c_after": lambda: per_sample_grad_norms(model, **batch, params="all"),
            "d_plain": lambda: plain_step(model, batch),
        }
        warm = make_batch(cfg, 8, 2, "cpu", seed=1)
        old.per_sample_grad_norms(model, **warm, params="all")
        per_sample_grad_norms(model, **warm, params="all")
        for p in model.parameters():
            p.requires_grad_(True)
        seconds, cpu_seconds, outputs = defaultdict(list), defaultdict(list), {}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                outputs[name] = fn()
                seconds[name].append(time.perf_counter() - start)
                cpu_seconds[name].append(time.process_time() - start_cpu)
        best = {name: min(times) for name, times in seconds.items()}
        best_cpu = {name: min(times) for name, times in cpu_seconds.items()}
        before, after = outputs["c_before"].double(), outputs["c_after"].double()
        row = {"completion_max": completion, "seconds_best": best, "seconds_all": dict(seconds),
               "cpu_seconds_best": best_cpu, "cpu_seconds_all": dict(cpu_seconds),
               "c/d_before": best["c_before"] / best["d_plain"], "c/d_after": best["c_after"] / best["d_plain"],
               "cpu_time_c/d_before": best_cpu["c_before"] / best_cpu["d_plain"],
               "cpu_time_c/d_after": best_cpu["c_after"] / best_cpu["d_plain"],
               "max_rel_diff_after_vs_before": ((after - before).abs() / before).max().item()}
        print(json.dumps(row), flush=True)
        results.append(row)
    return {"config": cfg, "threads": args.threads, "repeats": args.repeats, "results": results}


CHECK_PRESETS = {
    # Qwen2-0.5B's structure and vocabulary, bf16; ``tight_gib``: a free-memory figure that splits the batch.
    "cuda": dict(arch="qwen2", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, batch=64,
                 prompt=32, completion=384, dtype="bfloat16", tight_gib=8.0, autocast_batch=8, autocast_completion=128),
    "quick": dict(arch="qwen2", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=2048, batch=12,
                  prompt=16, completion=48, dtype="float32", tight_gib=None, autocast_batch=4, autocast_completion=24),
}


class OwnForwardLinear(torch.nn.Linear):
    """An nn.Linear subclass with its own forward: measured by the generic rule, which re-runs it."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def built(cfg: dict, device: str, dtype: str, tied: bool = True) -> torch.nn.Module:
    return build_model(dict(cfg, dtype=dtype), tied, device)


def check(name: str, fn: Callable[[], dict], results: dict) -> None:
    """Run one check; a crash is recorded as a failure and the next check still runs."""
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - the verdict file reports it
        result = {"pass": False, "error": f"{type(err).__name__}: {err}"[:2000]}
    result["seconds"] = round(time.perf_counter() - start, 2)
    results[name] = result
    print(f"  {name}: {'pass' if result['pass'] else 'FAIL'} {json.dumps(result)[:600]}", flush=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_sizing(cfg: dict, device: str, selection: str) -> dict:
    """A micro-batch sized from free memory (B2, B5, B6): the pass's real peak stays within the free memory it was
    sized for, and a tighter figure splits the batch with the same norms."""
    from peft import LoraConfig, get_peft_model

    from gvm_trl.grad_norms import MEMORY_SHARE, rows_that_fit
    from gvm_trl.grad_norms.memory import budget, memory_model

    model = built(cfg, device, cfg["dtype"])
    params = selection
    if selection == "lora":
        model, params = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"])), "trainable"
    batch = make_batch(cfg, cfg["completion"], cfg["batch"], device)
    shape = tuple(batch["input_ids"].shape)
    memory = memory_model(model, params)
    result = {"selection": selection, "shape": shape, "probe_bytes": {f"{r}x{t}": b for (r, t), b in
                                                                        memory.probes.items()}}
    if device == "cuda":
        available = budget(torch.device(device), None, 1) / MEMORY_SHARE
        rows = rows_that_fit(model, params, shape, device)
        seconds, peak, whole = timed(lambda: per_sample_grad_norms(model, **batch, params=params), device)
        result["auto"] = {"free_gib": round(available / 2**30, 2), "rows": rows, "seconds": round(seconds, 3),
                          "estimate_gib": round(memory.bytes(rows, shape[1]) / 2**30, 3),
                          "peak_gib": round(peak / 1024, 3), "peak_within_free": peak * 2**20 <= available}
        free = int(cfg["tight_gib"] * 2**30)
    else:  # no free-memory figure on a CPU: one that holds about a third of the batch
        whole = per_sample_grad_norms(model, **batch, params=params)
        free = round(memory.bytes(max(1, shape[0] // 3), shape[1]) / MEMORY_SHARE)
    rows = rows_that_fit(model, params, shape, device, free_bytes=free)
    seconds, peak, split = timed(lambda: per_sample_grad_norms(model, **batch, params=params, micro_batch_size=rows),
                                 device)
    difference = ((split.double() - whole.double()).abs() / whole.double()).max().item()
    estimate = memory.bytes(rows, shape[1])
    result["tight"] = {"free_gib": round(free / 2**30, 4), "rows": rows, "seconds": round(seconds, 3),
                       "estimate_gib": round(estimate / 2**30, 4), "peak_gib": round(peak / 1024, 4),
                       "peak_over_estimate": round(peak * 2**20 / estimate, 3),
                       "max_rel_diff_vs_one_call": difference}
    within = peak * 2**20 <= free if device == "cuda" else True  # a CPU's RSS peak includes the allocator's slack
    result["pass"] = bool(1 <= rows < shape[0] and estimate <= MEMORY_SHARE * free and within and difference < 3e-2
                          and result.get("auto", {}).get("peak_within_free", True))
    return result


def autocast_fp32_weights(cfg: dict, device: str) -> dict:
    """fp32 weights under bf16 autocast (B3), generic re-runs included: norms within 3 % of the fp32 ones."""
    model = built(cfg, device, "float32")
    for layer in model.model.layers[-2:]:
        old = layer.mlp.down_proj
        layer.mlp.down_proj = OwnForwardLinear(old.in_features, old.out_features, bias=False, device=device)
        layer.mlp.down_proj.weight = old.weight
    batch = make_batch(cfg, cfg["autocast_completion"], cfg["autocast_batch"], device)

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16)

    fp32 = per_sample_grad_norms(model, **batch, params="all")
    bf16 = per_sample_grad_norms(model, **batch, params="all", forward_context=autocast)
    with autocast():
        ambient = per_sample_grad_norms(model, **batch, params="all")
    gap = ((bf16.double() / fp32.double()) - 1).abs().max().item()
    same = ((ambient.double() - bf16.double()).abs() / bf16.double()).max().item()
    return {"max_rel_gap_to_fp32": gap, "ambient_vs_forward_context": same, "pass": gap < 3e-2 and same < 1e-6}


def gram_kernel(cfg: dict, device: str) -> dict:
    """The bf16 Gram (B7): whether bmm(out_dtype=float32) runs here, and the norms with it against fp32 Grams."""
    import gvm_trl.grad_norms.products as products

    model = built(cfg, device, "bfloat16")
    batch = make_batch(cfg, cfg["autocast_completion"], cfg["autocast_batch"], device)
    probe = torch.ones(1, 1, 1, dtype=torch.bfloat16, device=device)
    supported = products._low_precision_supported(probe)
    low = per_sample_grad_norms(model, **batch, params="all")
    products.LOW_PRECISION_GRAMS = False
    try:
        fp32 = per_sample_grad_norms(model, **batch, params="all")
    finally:
        products.LOW_PRECISION_GRAMS = True
    difference = ((low.double() - fp32.double()).abs() / fp32.double()).max().item()
    expected = device == "cuda"
    return {"out_dtype_supported": supported, "max_rel_diff_vs_fp32_grams": difference,
            "pass": supported == expected and difference < 1e-2}


def host_syncs(cfg: dict, device: str) -> dict:
    """Host syncs per call (B9), counted after a first call: at most 2, in one micro-batch or several."""
    from gvm_trl.grad_norms.counting import count

    model = built(cfg, device, cfg["dtype"])
    batch = make_batch(cfg, cfg["autocast_completion"], cfg["autocast_batch"], device)
    per_sample_grad_norms(model, **batch, params="all")
    counted = {size or "all": count(lambda s=size: per_sample_grad_norms(model, **batch, params="all",
                                                                         micro_batch_size=s)).as_dict(top=0)
               for size in (None, 2)}
    figures = {k: {"host_syncs": v["host_syncs"], "sync_ops": v["sync_ops"], "ops": v["ops"]}
               for k, v in counted.items()}
    return {"per_micro_batch_size": figures, "pass": all(v["host_syncs"] <= 2 for v in figures.values())}


def prepared_mask(cfg: dict, device: str) -> dict:
    """The prepared-mask guard in the model's dtype (B4): the causal mask is taken, a non-causal one refused."""
    import gvm_trl.grad_norms.recorder as recorder

    model = built(cfg, device, cfg["dtype"])
    taken = recorder._probe_prepared_mask(model) is not None
    original = recorder._causal_mask
    recorder._causal_mask = lambda real: (real[:, None, :] | torch.eye(real.shape[1], dtype=torch.bool,
                                                                        device=real.device))[:, None]
    try:
        refused = recorder._probe_prepared_mask(model) is None
    finally:
        recorder._causal_mask = original
    return {"causal_taken": taken, "non_causal_refused": refused, "pass": taken and refused}


def gpu_checks(args) -> dict:
    """Issue 26's GPU-only paths on one device (``--quick``: CPU-sized, the same code)."""
    import transformers

    cfg = dict(CHECK_PRESETS["quick" if args.quick else "cuda"])
    results = {}
    for selection in ("embed_tokens", "lora", "all"):
        check(f"memory_sizing_{selection}", lambda s=selection: memory_sizing(cfg, args.device, s), results)
    check("autocast_fp32_weights", lambda: autocast_fp32_weights(cfg, args.device), results)
    check("bf16_gram_kernel", lambda: gram_kernel(cfg, args.device), results)
    check("host_syncs", lambda: host_syncs(cfg, args.device), results)
    check("prepared_mask", lambda: prepared_mask(cfg, args.device), results)
    return {"config": cfg, "device": args.device, "device_name": torch.cuda.get_device_name() if
            args.device == "cuda" else platform.processor() or "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "checks": results,
            "pass": all(r["pass"] for r in results.values())}


def output_path(args, default: str) -> Path:
    """``--output``, else ``benchmarks/results/<default>``; a ``--quick`` run's figures mean nothing, so without
    ``--output`` it writes to a temporary folder and never over a committed result."""
    if args.output:
        return Path(args.output)
    if args.quick:
        import tempfile

        return Path(tempfile.gettempdir()) / "gvm_trl_benchmarks" / f"quick_{default}"
    return Path("benchmarks/results") / default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny model and batch: a smoke test under a minute")
    parser.add_argument("--batch", type=int, help="rows per batch (preset: 16 CPU, 64 CUDA)")
    parser.add_argument("--completions", type=int, nargs="+", help="max completion lengths (preset: 128 384)")
    parser.add_argument("--micro-batch-size", type=int, help="rows per forward/backward in (c), (c2), (d) (default: "
                        "the pass chooses from free memory, (d) uses the preset's: 16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds over all cases (the best is reported)")
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP-counting runs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--generic", action="store_true", help="time the generic rule against the fast rules")
    parser.add_argument("--count", action="store_true", help="count ops, host syncs and FLOPs per call (CPU)")
    parser.add_argument("--gram-precision", action="store_true", help="norm error with bf16/TF32 Gram factors")
    parser.add_argument("--against", metavar="DIR", help="CPU c/d of DIR/old_grad_norms vs this package")
    parser.add_argument("--checks", action="store_true", help="issue 26's GPU-only paths on --device, pass/fail "
                        "(with --quick: CPU-sized)")
    parser.add_argument("--output", help="default: benchmarks/results/grad_norms.json (or the mode's own file); "
                        "--quick writes to a temporary folder instead, never over a committed result")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    torch.set_num_threads(args.threads)
    for flag, run, default in (("gram_precision", gram_precision, "grad_norms_gram_precision.json"),
                               ("against", against, "grad_norms_cpu_before_after.json"),
                               ("count", count_mode, "grad_norms_count.json"),
                               ("generic", generic_cost, "grad_norms_generic.json"),
                               ("checks", gpu_checks, f"grad_norms_checks_{args.device}.json")):
        if getattr(args, flag):
            out = output_path(args, default)
            out.parent.mkdir(parents=True, exist_ok=True)
            report = run(args)
            out.write_text(json.dumps(report, indent=2))
            print(f"wrote {out}")
            if flag == "checks" and not report["pass"]:
                raise SystemExit(1)
            return
    args.output = str(output_path(args, "grad_norms.json"))
    cfg = dict(PRESETS["quick" if args.quick else args.device])
    cfg["batch"] = args.batch or cfg["batch"]
    cfg["completions"] = args.completions or cfg["completions"]
    preset_micro_batch_size = cfg.pop("micro_batch_size", None)
    # The pass picks its micro-batch from free memory unless told; the plain step keeps the preset's (issue 18's).
    args.pass_micro_batch_size = args.micro_batch_size
    args.micro_batch_size = args.micro_batch_size or preset_micro_batch_size
    tied, untied = build_model(cfg, True, args.device), build_model(cfg, False, args.device)
    print(f"model {cfg}, device {args.device}, threads {args.threads}", flush=True)
    report = {
        "config": cfg,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "threads": args.threads,
        "micro_batch_size": args.micro_batch_size,
        "pass_micro_batch_size": args.pass_micro_batch_size or "chosen from free memory",
        "memory": "CUDA max_memory_allocated above the pre-call allocation" if args.device == "cuda"
        else "peak process RSS above the pre-call RSS, psutil sampled every 2 ms",
        "torch": torch.__version__,
        "results": [run_length(cfg, tied, untied, c, args) for c in cfg["completions"]],
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
