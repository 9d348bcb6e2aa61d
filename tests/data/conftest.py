"""Fixtures of the data tests: a byte-level tokenizer built locally (no downloads).

Every byte is one token, so expected ids are easy to write by hand: a text of n ASCII characters
is n tokens, and ``decode`` gives the text back. The chat template is ChatML-like and starts with
``{{ bos_token }}``, and the tokenizer itself also adds a BOS (like Llama-3 / Gemma), which is the
setting where a careless pipeline writes BOS twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from builders import CHATML, CHATML_NO_BOS, byte_tokenizer

SPECIAL = ("<s>", "<|im_end|>", "<|im_start|>", "<pad>")

HH_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
HH_FILE = HH_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"


def make_tokenizer(adds_bos: bool = True, chat_template: str | None = CHATML):
    return byte_tokenizer(
        chat_template, specials=SPECIAL, bos="<s>", eos="<|im_end|>", pad="<pad>", adds_bos=adds_bos
    )


@pytest.fixture(scope="session")
def toks():
    """The tokenizer factory and chat templates, for tests that need variants."""
    return SimpleNamespace(make=make_tokenizer, chatml=CHATML, chatml_no_bos=CHATML_NO_BOS)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The byte-level tokenizer saved as a model folder would hold it (with a config.json)."""
    path = tmp_path_factory.mktemp("byte-tokenizer")
    make_tokenizer().save_pretrained(path)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


@pytest.fixture
def hh_file() -> Path:
    if not HH_FILE.is_file():
        pytest.skip(f"real HH-RLHF data not found at {HH_FILE} (../shared/data beside the repo)")
    return HH_FILE
