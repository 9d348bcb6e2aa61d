"""Shared fixtures (the builders are in builders.py). `tiny_model_dir`: a 2-layer random Llama
and a byte-level tokenizer with a chat template, saved once per session; no downloads."""

from __future__ import annotations

import pytest

from builders import save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder with a tiny random LlamaForCausalLM (2 layers, hidden 32) and its tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
