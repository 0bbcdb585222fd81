#!/usr/bin/env bash
# Issue 17's report, regenerated with one command: every piece continues where an interrupted run stopped (--resume).
#
#   bash benchmarks/fair_evidence.sh            # issue 17's pieces ~2.5 CPU-hours, issue 27's ~6; each piece also
#                                               # runs on its own (commands below)
#
# 1. The factorial on the facts task (48 prompts, ~67 visits each), seeds 8-15 (held out: the defaults were chosen
#    on seeds 0-7): {uniform, GVM without history, GVM with history} x {none, 1/|D_i|}, GVM-GRPO and GVM-RAFT++.
# 2. The levers in the few-revisit regime (facts-many: 1,024 factorised prompts, 2 visits each), tuning seeds 0-3.
# 3. The default, the best lever of 2 (the posterior floor) and the cheapest (G = 1) on the report seeds 8-11,
#    against grpo-mean.
# 4. The few-revisit regime without the factorisation (facts-many-independent), seeds 8-11.
# 5. The levers' gradient error (variance and bias²) on the two synthetic populations.
# 6. Two earlier dynamic-sampling comparisons that had no command: facts task, seeds 8-11 (its GVM and grpo-mean runs
#    are the factorial's, bit for bit) and facts-many, seeds 8-11.
# Issue 27 (NOTES_issue27.md; tables: python report_tables.py):
# 7. The learning-rate sweep, tuning seeds 0-3, 3e-5 to 3e-3: one file per rate, then each method's best rate
#    (convergence.py --lr-sweep: fewest completions to 75 % of L, rates with a diverged seed excluded).
# 8. Each method at its own best rate, 400 steps, held-out seeds 30-41 never used before.
# 9. The regimes: never-solved share 0.5 / 0.75 / 0.125 and half the facts nearly solved, GVM-GRPO, dynamic sampling
#    and Knapsack RL (both at GVM-GRPO's best rate: not tuned themselves) against grpo-mean, held-out seeds 42-49.
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
python convergence.py --seeds 8 9 10 11 --methods gvm-grpo grpo-mean dynamic-grpo \
    --variant gvm-grpo-no-history=gvm-grpo:gvm_history_decay=0.0 --output $results/convergence_facts_fair.json --resume
python convergence.py --task facts-many --seeds 8 9 10 11 --methods gvm-grpo grpo-mean dynamic-grpo --eval-every 32 \
    --output $results/convergence_facts_many.json --resume
python convergence.py --learning-rate 3e-5 --seeds 0 1 2 3 --methods grpo-mean gvm-grpo raft-mean gvm-raft \
    --output $results/convergence_facts_lr3e-5.json --resume
python convergence.py --learning-rate 1e-4 --seeds 0 1 2 3 --methods grpo-mean gvm-grpo raft-mean gvm-raft \
    --output $results/convergence_facts_lr1e-4.json --resume
python convergence.py --learning-rate 3e-4 --seeds 0 1 2 3 --methods grpo-mean gvm-grpo raft-mean gvm-raft \
    --output $results/convergence_facts_lr3e-4.json --resume
python convergence.py --learning-rate 1e-3 --seeds 0 1 2 3 --methods grpo-mean gvm-grpo raft-mean gvm-raft \
    --output $results/convergence_facts_lr1e-3.json --resume
python convergence.py --learning-rate 3e-3 --seeds 0 1 2 3 --methods grpo-mean gvm-grpo raft-mean gvm-raft \
    --output $results/convergence_facts_lr3e-3.json --resume
python convergence.py --lr-sweep $results/convergence_facts_lr{3e-5,1e-4,3e-4,1e-3,3e-3}.json \
    --output $results/lr_sweep_facts.json
best() { python -c "import json, sys; print(json.load(open(sys.argv[1]))['methods'][sys.argv[2]]['best_rate'])" \
    $results/lr_sweep_facts.json "$1"; }
G=$(best grpo-mean); V=$(best gvm-grpo); RM=$(best raft-mean); VR=$(best gvm-raft)
python convergence.py --seeds $(seq 30 41) --max-steps 400 --eval-every 20 \
    --methods grpo-mean gvm-grpo raft-mean gvm-raft \
    --method-lr grpo-mean=$G --method-lr gvm-grpo=$V --method-lr raft-mean=$RM --method-lr gvm-raft=$VR \
    --output $results/convergence_facts_bestlr.json --resume
# The regimes' runs: each uniform one at its fair baseline's best rate, each probing one at GVM-GRPO's. A policy that
# lands later (e.g. Reinforce-Ada) joins by adding its name here.
REGIME_METHODS=(grpo-mean gvm-grpo dynamic-grpo knapsack-grpo)
regime() {  # NAME, then the task's options
    local name=$1 rates=() method; shift
    for method in "${REGIME_METHODS[@]}"; do
        rates+=(--method-lr "$method=$([ "$method" = grpo-mean ] && echo "$G" || echo "$V")")
    done
    python convergence.py --seeds $(seq 42 49) --eval-every 20 "$@" --methods "${REGIME_METHODS[@]}" "${rates[@]}" \
        --against gvm-grpo=dynamic-grpo --output $results/convergence_facts_regime_$name.json --resume
}
regime never0.5 --never-share 0.5
regime never0.75 --never-share 0.75
regime solved0.5 --solved-share 0.5
regime never0.125 --never-share 0.125
python report_tables.py
