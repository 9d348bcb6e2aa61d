"""Fixtures for the rewards tests: a tiny byte-level tokenizer with a ChatML template (and a
variant whose template has no system role, like Gemma-2), a 2-layer random Llama, and a few
tokenized pairs built per the contract (prompt and responses tokenized separately)."""

from __future__ import annotations

import pytest

from builders import CHATML_NO_BOS, NO_SYSTEM, byte_tokenizer, tiny_llama, tokenize_pair

SPECIALS = ("<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<pad>")

EXAMPLES = [
    {
        "prompt": [{"role": "user", "content": "What is the capital of France?"}],
        "chosen": "Paris.",
        "rejected": "I think it might be Berlin, or maybe Rome.",
    },
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "2."},
            {"role": "user", "content": "Another one?"},
        ],
        "chosen": "3 is prime.",
        "rejected": "No.",
    },
    {
        "prompt": [{"role": "user", "content": "Say hi <b>&</b>"}],
        "chosen": "Hi! <b>&amp;</b>",
        "rejected": "Bye \u00e9\u00e8 \U0001f600",
    },
]


def build_tokenizer(chat_template: str = CHATML_NO_BOS, eos: str = "<|im_end|>"):
    """Byte-level tokenizer plus atomic chat special tokens (ChatML by default)."""
    return byte_tokenizer(chat_template, specials=SPECIALS, bos="<bos>", eos=eos, pad="<pad>")


def build_model(vocab_size: int, seed: int = 0):
    return tiny_llama(vocab_size, seed, attn_implementation="sdpa")


def make_rows(tokenizer, n: int) -> list[dict]:
    """``n`` tokenized pairs cycling through EXAMPLES, each made distinct by its number."""
    rows = []
    for i in range(n):
        example = EXAMPLES[i % len(EXAMPLES)]
        example = {**example, "chosen": f"{example['chosen']} ({i})"}
        rows.append(tokenize_pair(tokenizer, example, index=10 + i))
    return rows


@pytest.fixture(scope="session")
def rw_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def rw_nosystem_tokenizer():
    return build_tokenizer(NO_SYSTEM, eos="<end_of_turn>")


@pytest.fixture(scope="session")
def rw_model(rw_tokenizer):
    return build_model(len(rw_tokenizer))


@pytest.fixture(scope="session")
def rw_rows(rw_tokenizer):
    return make_rows(rw_tokenizer, 3)


@pytest.fixture(scope="session")
def rw_helpers():
    """The builders above, for tests that need fresh objects (test files cannot import
    conftest: tests/ is not a package)."""
    import types

    return types.SimpleNamespace(
        build_tokenizer=build_tokenizer,
        build_model=build_model,
        make_rows=make_rows,
        tokenize_pair=tokenize_pair,
        conftest_path=__file__,
    )
