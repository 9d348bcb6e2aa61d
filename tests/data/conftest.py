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

CHATML = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_NO_BOS = CHATML.removeprefix("{{ bos_token }}")
SPECIAL = ["<s>", "<|im_end|>", "<|im_start|>", "<pad>"]

HH_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
HH_FILE = HH_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"


def make_tokenizer(adds_bos: bool = True, chat_template: str | None = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: index for index, char in enumerate(alphabet)}
    for token in SPECIAL:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(SPECIAL)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


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
