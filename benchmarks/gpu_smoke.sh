#!/usr/bin/env bash
# The one-GPU check of the GVM trainers and of the gradient-norm pass's GPU-only paths, bf16, no downloads, within
# 8 minutes: every stage has its own time limit plus a 5 s kill-after, 455 s in all (checked below), and a stage
# that fails or times out does not stop the next. Stages (times from the H200 runs of ../shared/docs/GPU_RUN.md;
# models are initialised on the GPU):
# 1. checks (benchmarks/grad_norms.py --checks, ≤ 100 s): on Qwen2-0.5B's structure (vocab 151,936, bf16, batch 64,
#    32 + 384 tokens) a micro-batch sized from free memory for embed_tokens, LoRA (q/v) and all parameters, its
#    peak within the free memory it was sized for, and an 8 GiB figure splitting the batch with the same norms;
#    fp32 weights under bf16 autocast with generic re-runs (within 3 % of fp32); the bf16 Gram kernel
#    (bmm out_dtype) against fp32 Grams; ≤ 2 host syncs per call; the prepared-mask guard in bf16.
# 2. grad_norms (benchmarks/grad_norms.py --device cuda --no-flops, ≤ 80 s): batch 64, 128 completion tokens,
#    against the official one-sample loop (target ≥ 10×) and one plain forward+backward (target c/d ≤ 1.0); the
#    pass sizes its micro-batch from free memory. FLOPs, ops and syncs are counted on a CPU (grad_norms.py --count).
# 3. step_cost (benchmarks/step_cost.py --device cuda, ≤ 150 s): a random Qwen2-0.5B-shaped model and the parity
#    stand-in verifier; plain trl.GRPOTrainer, GVM-GRPO and GVM-RAFT++ probing ahead at 32 completions per step
#    (4 prompts × G = 8; N′ = 4), ≤ 128 tokens, three workers at once (≤ 3 × 25 GB), 4 steps (2 timed).
# 4. fsdp_raft, fsdp_grpo (tests/scripts/train_tiny.py under FSDP full_shard on the one GPU, ≤ 50 s each): 3 steps.
#
# Writes ONE verdict, gpu_smoke.json (every stage's figures, exit code, seconds and pass/fail, and "pass"), with
# the stages' own JSON and logs beside it, into benchmarks/results/gpu_smoke/ (--output DIR to change).
# --cpu: the same stages on this CPU with shrunk shapes (--quick presets; FSDP replaced by the same script
# unsharded) and twice the time limits, written to a temporary folder unless --output is given: a dry run of the
# script, never results.
# The machine needs trl and datasets (pure-Python wheels: ../shared/docs/GPU_RUN.md). Arguments after -- go to
# step_cost.py; PYTHON=... picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
device=cuda
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) device=cpu; shift ;;
        --output) out="$2"; shift 2 ;;
        --) shift; break ;;
        *) echo "usage: $0 [--cpu] [--output DIR] [-- step_cost.py arguments]" >&2; exit 2 ;;
    esac
done
if [ -z "$out" ]; then
    if [ "$device" = cuda ]; then out=benchmarks/results/gpu_smoke; else out="${TMPDIR:-/tmp}/gvm_trl_gpu_smoke_cpu"; fi
fi
mkdir -p "$out"
python=${PYTHON:-python3}
kill_after=5
limits=(100 80 150 50 50)  # checks, grad_norms, step_cost, fsdp_raft, fsdp_grpo
total=$(( $(IFS=+; echo "${limits[*]}") + ${#limits[@]} * kill_after ))
[ "$total" -le 480 ] || { echo "stage limits allow $total s, over 8 minutes" >&2; exit 2; }
if [ "$device" = cpu ]; then  # a shared CPU runs the small shapes slower than the GPU the large ones: twice the time
    for i in "${!limits[@]}"; do limits[$i]=$(( limits[$i] * 2 )); done
    total=$(( total * 2 ))
fi
echo "== $device, results in $out, at most $total s"
: > "$out/stages.tsv"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to a file, record exit code and seconds
    local name="$1" limit="$2"
    shift 2
    echo "== $name (≤ ${limit} s): $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=$kill_after "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$out/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >> "$out/stages.tsv"
}

if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/device.txt" 2>&1 || true
    stage checks "${limits[0]}" "$python" benchmarks/grad_norms.py --checks --device cuda --output "$out/checks.json"
    stage grad_norms "${limits[1]}" "$python" benchmarks/grad_norms.py --device cuda --no-flops --completions 128 \
        --output "$out/grad_norms.json"
    stage step_cost "${limits[2]}" "$python" benchmarks/step_cost.py --device cuda --model random-qwen2-0.5b \
        --batch-size 32 --num-generations 8 --num-probes 4 --max-completion-length 128 --steps 4 --warmup 1 \
        --max-workers 3 --configs grpo gvm-grpo gvm-raft --output "$out/step_cost.json" "$@"
    sharding=(--cuda --fsdp)
else
    echo "$(uname -m) CPU, $(nproc) cores" > "$out/device.txt"
    stage checks "${limits[0]}" "$python" benchmarks/grad_norms.py --checks --quick --output "$out/checks.json"
    stage grad_norms "${limits[1]}" "$python" benchmarks/grad_norms.py --quick --no-flops --completions 32 \
        --output "$out/grad_norms.json"
    stage step_cost "${limits[2]}" "$python" benchmarks/step_cost.py --quick --output "$out/step_cost.json" "$@"
    sharding=()
fi
for index in 3 4; do
    trainer=$([ "$index" = 3 ] && echo raft || echo grpo)
    run_dir="$out/fsdp_$trainer"
    rm -rf "$run_dir"
    stage "fsdp_$trainer" "${limits[$index]}" "$python" -m torch.distributed.run --nproc_per_node 1 \
        tests/scripts/train_tiny.py --trainer "$trainer" ${sharding[@]+"${sharding[@]}"} --schedule probe-ahead \
        --steps 3 --output_dir "$run_dir" --per_device_train_batch_size 8
done

"$python" - "$out" "$device" <<'EOF'
"""Merge the stages into one verdict: figures, exit code, seconds and pass/fail per stage, and the whole."""
import json
import sys
from pathlib import Path

out, device = Path(sys.argv[1]), sys.argv[2]
stages = {}
for line in (out / "stages.tsv").read_text().splitlines():
    name, rc, seconds, limit = line.split("\t")
    stage = {"exit": int(rc), "seconds": int(seconds), "limit_s": int(limit), "timed_out": rc in ("124", "137")}
    figures = {"checks": "checks.json", "grad_norms": "grad_norms.json", "step_cost": "step_cost.json"}.get(name)
    if name.startswith("fsdp_"):
        figures = f"{name}/result-0.json"
    path = out / figures if figures else None
    stage["figures"] = json.loads(path.read_text()) if path and path.exists() else None
    figures = stage["figures"] or {}
    stage["pass"] = (stage["exit"] == 0 and stage["figures"] is not None and figures.get("pass", True)
                     and not figures.get("failed"))  # step_cost: configurations that crashed in their worker
    stages[name] = stage
verdict = {"device": device, "machine": (out / "device.txt").read_text().strip(), "stages": stages,
           "seconds": sum(s["seconds"] for s in stages.values()), "pass": all(s["pass"] for s in stages.values())}
(out / "gpu_smoke.json").write_text(json.dumps(verdict, indent=2))
for name, stage in stages.items():
    print(f"{name:12s} {'pass' if stage['pass'] else 'FAIL'}  exit {stage['exit']}  {stage['seconds']} s")
print(f"{'pass' if verdict['pass'] else 'FAIL'} in {verdict['seconds']} s: {out / 'gpu_smoke.json'}")
sys.exit(0 if verdict["pass"] else 1)
EOF
