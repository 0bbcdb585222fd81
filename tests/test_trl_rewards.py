r"""TRL's math reward (``trl.rewards.accuracy_reward``, math-verify) and ours (``gvm_trl.math_reward``) in one GVM run.

The policy is a tiny Llama made into a bigram model that writes ``\boxed{7}`` or ``\boxed{8}`` (even odds) after the
assistant tag, so each prompt's accept rate is known in advance (gold 7 or 8: one half; gold 9: zero) and every
reward a function returns can be checked against the completion's own digit and the gold of the prompt it came
from, which the test reads off the prompt text, not from the columns the trainer hands on.
"""

from __future__ import annotations

import re

import pytest
import torch
from datasets import Dataset

from gvm_trl import GVMGRPOConfig, GVMGRPOTrainer, GVMRAFTConfig, GVMRAFTTrainer, math_reward
from gvm_trl.testing import make_tiny_llama

pytest.importorskip("math_verify", reason="TRL's accuracy_reward needs math-verify (the `test` extra installs it)")
from trl.rewards import accuracy_reward  # noqa: E402

GOLDS = ("7", "8", "9")  # prompt i has gold GOLDS[i % 3]; the model never writes 9
CHAIN = {"<|assistant|>": "\\", "\\": "b", "b": "o", "o": "x", "x": "e", "e": "d", "d": "{", "{": "78", "7": "}",
         "8": "}", "}": ["<|end|>"]}


def boxed_digit_llama(tokenizer):
    """A 2-layer Llama whose next token depends on the current token only (attention and MLP outputs zeroed): the
    hidden state is the token's embedding, a basis vector for each token in CHAIN, and the head puts a logit margin
    of about 57 on that token's successors."""
    model = make_tiny_llama(tokenizer, tie_word_embeddings=False)
    ids = tokenizer.convert_tokens_to_ids
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for k, (token, successors) in enumerate(CHAIN.items()):
            model.model.embed_tokens.weight[ids(token), k] = 1.0
            for successor in successors:
                model.lm_head.weight[ids(successor), k] = 10.0
    return model


def prompt_number(prompt) -> int:
    return int(re.match(r"Q(\d+):", prompt[-1]["content"]).group(1))


def recording(reward_func, calls: list):
    """The reward function unchanged, with each call's inputs and outputs kept for the test."""

    def reward(prompts, completions, **kwargs):
        values = reward_func(prompts=prompts, completions=completions, **kwargs)
        calls.append((prompts, completions, kwargs, values))
        return values

    reward.__name__ = reward_func.__name__
    return reward


@pytest.mark.parametrize("trainer_cls, config_cls", [(GVMGRPOTrainer, GVMGRPOConfig), (GVMRAFTTrainer, GVMRAFTConfig)])
def test_trls_accuracy_reward_and_math_reward_train_together(trainer_cls, config_cls, tmp_path, char_tokenizer):
    rows = [{"prompt": [{"role": "user", "content": f"Q{i}: what is the answer?"}],
             "solution": f"Working it out, the answer is $\\boxed{{{GOLDS[i % 3]}}}$.", "answer": GOLDS[i % 3]}
            for i in range(24)]
    calls = {"accuracy_reward": [], "math_reward": []}
    args = config_cls(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=12, max_steps=2, learning_rate=1e-3, logging_steps=1, report_to="none",
                      bf16=False, use_cpu=True, save_strategy="no", seed=0, beta=0.0, dataloader_num_workers=0)
    trainer = trainer_cls(
        model=boxed_digit_llama(char_tokenizer),
        reward_funcs=[recording(accuracy_reward, calls["accuracy_reward"]), recording(math_reward, calls["math_reward"])],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=char_tokenizer,
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))

    for name, column in (("accuracy_reward", "solution"), ("math_reward", "answer")):
        graded = []
        for prompts, completions, kwargs, values in calls[name]:
            for prompt, completion, stored, value in zip(prompts, completions, kwargs[column], values, strict=True):
                gold = GOLDS[prompt_number(prompt) % 3]
                assert gold in stored  # the row's own column value reached the reward function
                written = re.fullmatch(r"\\boxed\{(\d)\}", completion[0]["content"])
                assert written, completion  # the bigram model writes what it was built to write
                graded.append((value, float(written.group(1) == gold)))
        assert len(graded) >= 2 * 8  # two generation batches at least (probes and allocated rows)
        assert all(value == expected for value, expected in graded), name
        assert {expected for _, expected in graded} == {0.0, 1.0}  # both verdicts occurred
    logs = [entry for entry in trainer.state.log_history if "rewards/accuracy_reward/mean" in entry]
    assert logs and all("rewards/math_reward/mean" in entry for entry in logs)
