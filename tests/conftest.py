"""Shared fixtures: a character-level tokenizer and tiny random causal LMs, built locally (no Hub)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from gvm_trl.testing import make_char_tokenizer, make_tiny_llama

__all__ = ["make_char_tokenizer", "make_tiny_llama"]


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture
def tiny_llama(char_tokenizer):
    return make_tiny_llama(char_tokenizer)
