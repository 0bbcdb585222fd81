#!/usr/bin/env bash
# The one-GPU check of the GVM trainers: ≤ 8 minutes on an H100/H200, bf16, no downloads. Not yet run on a GPU
# (no session of this project has had one); the CPU parts were dry-run with --device cpu on tiny settings.
#
# 1. Step cost (benchmarks/step_cost.py --device cuda): a random Qwen2-0.5B-shaped model and the parity stand-in
#    verifier; plain trl.GRPOTrainer, uniform, GVM-GRPO sequential, GVM-GRPO probing ahead and GVM-RAFT++ probing
#    ahead at equal completions per step (m = 8 prompts, G = 8, N′ = 4 probes + 4 allocated per prompt, ≤ 256
#    tokens), in lockstep, 7 steps each (the first and the last not timed): seconds per phase and peak GPU memory.
# 2. Per-sample gradient norms (benchmarks/grad_norms.py --device cuda): batch 64 on the Qwen2-0.5B-shaped model,
#    against the official one-sample loop (target: ≥ 10× faster).
# 3. FSDP: a few steps of both trainers under FSDP (full_shard) on the one GPU (tests/scripts/train_tiny.py).
#
# Writes benchmarks/results/step_cost_cuda.json (+ .png), benchmarks/results/grad_norms_cuda.json and prints the
# FSDP runs' results. Extra arguments go to step_cost.py. Copy everything under benchmarks/results/ back.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

python benchmarks/step_cost.py --device cuda --model random-qwen2-0.5b \
    --batch-size 64 --num-generations 8 --num-probes 4 --max-completion-length 256 --steps 7 --warmup 1 "$@"

python benchmarks/grad_norms.py --device cuda --output benchmarks/results/grad_norms_cuda.json

for trainer in raft grpo; do
    out="$(mktemp -d)"
    python tests/scripts/train_tiny.py --trainer "$trainer" --cuda --fsdp --schedule probe-ahead --steps 3 \
        --output_dir "$out" --per_device_train_batch_size 8
    python -c "import json, sys; r = json.load(open('$out/result-0.json')); print('FSDP $trainer:', r['losses'], r['records'])"
done
