"""Fixtures for the rewards tests: a tiny byte-level tokenizer with a ChatML template (and a
variant whose template has no system role, like Gemma-2), a 2-layer random Llama, and a few
tokenized pairs built per the contract (prompt and responses tokenized separately)."""

from __future__ import annotations

import pytest
import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_SYSTEM = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
    "\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<pad>"]

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


def build_tokenizer(chat_template: str = CHATML, eos: str = "<|im_end|>"):
    """Byte-level BPE without merges (every byte is a token) plus atomic chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_tokens(SPECIALS, special_tokens=True)
    tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token = eos, "<pad>", "<bos>"
    tokenizer.chat_template = chat_template
    return tokenizer


def build_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tokenize_pair(tokenizer, example: dict, index: int) -> dict:
    """Contract tokenization: prompt via chat template; responses on their own + EOS."""
    text = tokenizer.apply_chat_template(
        example["prompt"], tokenize=False, add_generation_prompt=True
    )
    row = {**example, "index": index}
    row["prompt_ids"] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    for side in ("chosen", "rejected"):
        ids = list(tokenizer(example[side], add_special_tokens=False)["input_ids"])
        row[f"{side}_ids"] = ids + [tokenizer.eos_token_id]
    return row


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
