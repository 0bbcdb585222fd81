#!/usr/bin/env bash
# GPU smoke test of the two GVM trainers: one GPU, bf16, no downloads, about 5 minutes on an H100.
#
# A random Qwen2-0.5B-shaped model (benchmarks/step_cost.py --model random-qwen2-0.5b) and the parity stand-in
# verifier (about half the completions accepted); plain trl.GRPOTrainer, GVM-GRPO and GVM-RAFT++ at equal
# completions per step (m = 8 prompts, G = 8, N′ = 4 probes + 4 allocated per prompt on average, ≤ 256 tokens),
# 4 optimizer steps each, the first discarded. Prints seconds per step split into probe generation, gradient-norm
# pass, allocation, phase-2 generation and update, and peak GPU memory; writes
# benchmarks/results/step_cost_cuda.json and .png. Extra arguments go to step_cost.py (they override these).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python benchmarks/step_cost.py --device cuda --model random-qwen2-0.5b --configs grpo gvm-equal gvm-raft \
    --batch-size 64 --num-generations 8 --num-probes 4 --max-completion-length 256 --steps 4 --warmup 1 "$@"
