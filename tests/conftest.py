"""Pytest fixtures shared by the whole suite (the helpers themselves are in helpers.py): the tiny tokenizer,
and a tiny Llama saved with it as a local checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import tiny_llama, tiny_tokenizer
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d
