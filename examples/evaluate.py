"""Evaluate a model on Math500, Minerva Math, Olympiad Bench, AIME24 and AMC23 with the paper's protocol.

Same as the `gvm-eval` command; see `gvm_trl.evaluation.EvalArguments` (or `--help`) for the flags.

    python examples/evaluate.py --model Qwen/Qwen2.5-Math-1.5B
    python examples/evaluate.py --limit 2 --num_samples 2 --max_new_tokens 256   # embedded SmolLM2 demo model
"""

from gvm_trl.evaluation import main

if __name__ == "__main__":
    main()
