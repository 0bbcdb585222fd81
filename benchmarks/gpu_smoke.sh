#!/usr/bin/env bash
# The one-GPU check of the GVM trainers, sized for one H200 (140 GB) in ≤ 8 minutes, bf16, no downloads.
# Not yet run in this form: the first H200 run (issue 18) ran out of memory at 64 completions per worker (a
# Qwen2-0.5B-shaped worker needs 37–53 GB there, 13–25 GB at 32) and crashed in the FLOP counter (fixed since).
#
# Budget, from the times measured on the H200 (../shared/docs/GPU_RUN.md); each stage has its own timeout, 470 s
# in all, and a stage that fails or times out does not stop the next:
# 1. Step cost (benchmarks/step_cost.py --device cuda), ≈ 230 s: a random Qwen2-0.5B-shaped model and the parity
#    stand-in verifier; plain trl.GRPOTrainer, GVM-GRPO probing ahead and GVM-RAFT++ probing ahead at equal
#    completions per step (32 = 4 prompts × G = 8; N′ = 4 probes + 4 allocated per prompt; ≤ 256 tokens), three
#    workers at once (≤ 3 × 25 GB), 5 steps each (the first and the last not timed).
# 2. Per-sample gradient norms (benchmarks/grad_norms.py --device cuda --no-flops), ≈ 100 s: batch 64 on the Qwen2-0.5B-shaped
#    model (vocab 151,936), 128 and 384 completion tokens, against the official one-sample loop (target ≥ 10×) and
#    one plain forward+backward (target c/d ≤ 1.0); the pass picks its micro-batch from free memory. FLOPs, ops
#    and host syncs are counted on a CPU instead (grad_norms.py --count: they do not depend on the machine).
# 3. FSDP, ≈ 45 s: 3 steps of both trainers under FSDP (full_shard) on the one GPU (tests/scripts/train_tiny.py).
#
# Writes benchmarks/results/step_cost_cuda*.json (+ .png), benchmarks/results/grad_norms_cuda.json and the FSDP
# results to benchmarks/results/gpu_smoke_fsdp.txt, logs to benchmarks/results/gpu_smoke_*.log. Extra arguments go
# to step_cost.py. SMOKE_DEVICE=cpu dry-runs the same stages, tiny-sized, on a CPU (no FSDP; ran: 71 s + 44 s).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
device="${SMOKE_DEVICE:-cuda}"
results=benchmarks/results
mkdir -p "$results"
status=0

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to a file, remember a failure, go on
    local name="$1" limit="$2"
    shift 2
    echo "== $name (≤ ${limit} s): $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$results/gpu_smoke_$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}

if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    stage step_cost 250 python benchmarks/step_cost.py --device cuda --model random-qwen2-0.5b \
        --batch-size 32 --num-generations 8 --num-probes 4 --max-completion-length 256 --steps 5 --warmup 1 \
        --max-workers 3 --configs grpo gvm-grpo gvm-raft "$@"
    stage grad_norms 140 python benchmarks/grad_norms.py --device cuda --no-flops --output "$results/grad_norms_cuda.json"
    : > "$results/gpu_smoke_fsdp.txt"
    for trainer in raft grpo; do
        out="$(mktemp -d)"
        stage "fsdp_$trainer" 40 python -m torch.distributed.run --nproc_per_node 1 tests/scripts/train_tiny.py \
            --trainer "$trainer" --cuda --fsdp --schedule probe-ahead --steps 3 --output_dir "$out" \
            --per_device_train_batch_size 8
        python -c "import json; r = json.load(open('$out/result-0.json')); print('FSDP $trainer:', r['losses'], r['records'])" \
            >> "$results/gpu_smoke_fsdp.txt" 2>&1 || status=1
    done
    cat "$results/gpu_smoke_fsdp.txt"
else
    stage step_cost 600 python benchmarks/step_cost.py --quick "$@"
    stage grad_norms 300 python benchmarks/grad_norms.py --quick --output /tmp/grad_norms_smoke_cpu.json
fi
exit $status
