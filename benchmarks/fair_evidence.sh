#!/usr/bin/env bash
# Issue 17's report, regenerated with one command: every piece continues where an interrupted run stopped (--resume).
#
#   bash benchmarks/fair_evidence.sh            # ~2.5 CPU-hours; each piece also runs on its own (commands below)
#
# 1. The factorial on the facts task (48 prompts, ~67 visits each), seeds 8-15 (held out: the defaults were chosen
#    on seeds 0-7): {uniform, GVM without history, GVM with history} x {none, 1/|D_i|}, GVM-GRPO and GVM-RAFT++.
# 2. The levers in the few-revisit regime (facts-many: 1,024 factorised prompts, 2 visits each), tuning seeds 0-3.
# 3. The default, the best lever of 2 (the posterior floor) and the cheapest (G = 1) on the report seeds 8-11,
#    against grpo-mean.
# 4. The few-revisit regime without the factorisation (facts-many-independent), seeds 8-11.
# 5. The levers' gradient error (variance and bias²) on the two synthetic populations.
set -euo pipefail
cd "$(dirname "$0")"
results=results
python convergence.py --factorial --seeds 8 9 10 11 12 13 14 15 --output $results/convergence_facts_factorial.json --resume
python convergence.py --task facts-many --levers --seeds 0 1 2 3 --eval-every 32 \
    --output $results/convergence_facts_many_levers.json --resume
python convergence.py --task facts-many --seeds 8 9 10 11 --methods gvm-grpo grpo-mean --eval-every 32 \
    --variant gvm-grpo-floor=gvm-grpo:gvm_rate_floor_quantile=0.5 \
    --variant gvm-grpo-constant-g=gvm-grpo:gvm_grad_norms=constant \
    --output $results/convergence_facts_many_report.json --resume
python convergence.py --task facts-many-independent --seeds 8 9 10 11 --methods gvm-grpo grpo-mean --eval-every 32 \
    --output $results/convergence_facts_many_independent.json --resume
for population in gradlogp gaussian; do
    python variance.py --population $population --levers --option-probes 4
done
