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
