"""Tiny local models for tests, smoke runs and benchmarks' quick modes: no Hub, no downloads, seconds on a CPU.

Written by hand because tokenizers ship with models on the Hub; a character-level tokenizer built in code keeps
every test hermetic.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic character-level tokenizer (printable ASCII) with a tiny chat template."""
    characters = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + characters)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|end|>", additional_special_tokens=SPECIAL_TOKENS[2:]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_llama(
    tokenizer,
    *,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    hidden_size: int = 32,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
) -> LlamaForCausalLM:
    """A random 2-layer Llama (hidden 32, 4 heads unless told) sized to `tokenizer`'s vocabulary."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def parity_reward(completions, **kwargs) -> list[float]:
    """Stand-in verifier for random tiny models (which solve nothing): 1 iff the completion's character codes sum to
    an even number, so about half of all completions are accepted and accept rates vary within each group."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(sum(map(ord, text)) % 2 == 0) for text in texts]


class FakeRolloutPort:
    """A model-free :class:`~gvm_trl.schedules.RolloutPort` (one process) for testing schedules without a trainer.

    A prompt row is a dict with its accept probability ``rate`` and, optionally, the gradient norm ``norm`` of its
    accepted completions (default 1). Each completion is accepted with its prompt's probability (a seeded draw, in
    row order) and scores 1 if accepted, else 0. With ``trains_rejected`` every real row trains (GRPO), else only
    the accepted ones (RAFT++). ``batches`` are the run's generation batches in order, each a list of prompt rows
    with a ``key``, for :meth:`upcoming_prompts`. Every call is recorded: ``rounds`` (phase, rows),
    ``norm_passes`` (whether each pass also attached old log-probabilities), ``logps_passes``, ``warnings``.
    """

    def __init__(self, batches: list[list[dict]] | None = None, *, seed: int = 0, folds: bool = True,
                 trains_rejected: bool = True, step: int = 0) -> None:
        self.batches, self.folds, self.trains_rejected, self.step = batches or [], folds, trains_rejected, step
        self.generator = torch.Generator().manual_seed(seed)
        self.rounds: list[tuple[str, int]] = []
        self.norm_passes: list[bool] = []
        self.logps_passes = 0
        self.warnings = 0

    def generate_rollout(self, rows: list[dict], group_size: int, prompts: torch.Tensor, phase: str):
        from .rollout import Rollout, accepted_rows

        self.rounds.append((phase, len(rows)))
        draws = torch.rand(len(rows), generator=self.generator)
        rewards = (draws < torch.tensor([float(row["rate"]) for row in rows])).float()
        rewards[prompts < 0] = float("nan")
        accepted = accepted_rows(rewards, prompts, 1.0)
        trains = (prompts >= 0) if self.trains_rejected else accepted
        width = torch.ones(len(rows), 2, dtype=torch.long)
        batch = {"prompt_ids": width, "prompt_mask": width, "completion_ids": width, "completion_mask": width,
                 "norms": torch.tensor([float(row.get("norm", 1.0)) for row in rows])}
        logged = {"prompt": [row.get("key") for row in rows], "completion": [""] * len(rows)}
        return Rollout(batch, prompts, rewards[:, None], rewards, accepted, trains, torch.full((len(rows),), 2.0),
                       torch.zeros(len(rows), dtype=torch.bool), logged, self.step, phase)

    def probe_grad_norms(self, probes, *, with_old_logps: bool = False) -> torch.Tensor:
        self.norm_passes.append(with_old_logps)
        if with_old_logps:
            probes.batch["old_per_token_logps"] = torch.zeros(probes.batch["completion_ids"].shape)
        return probes.batch["norms"] * probes.accepted

    def folds_old_logps(self, probes) -> bool:
        return self.folds

    def attach_old_logps(self, probes) -> None:
        self.logps_passes += 1
        probes.batch["old_per_token_logps"] = torch.zeros(probes.batch["completion_ids"].shape)

    def upcoming_prompts(self, keys: list[int]) -> tuple[list[dict], list[int]]:
        position = next((i for i, batch in enumerate(self.batches) if [r["key"] for r in batch] == keys), None)
        if position is None or position + 1 == len(self.batches):
            return [], []
        following = self.batches[position + 1]
        return following, [row["key"] for row in following]

    def warn_no_accepted_probe(self) -> None:
        self.warnings += 1
