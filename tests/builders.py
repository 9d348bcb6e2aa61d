"""Builders of the suite's tiny models, tokenizers and batches: one place, no downloads.

Test files and conftest files import them (``from builders import tiny_llama``: pytest puts
``tests/`` on ``sys.path`` for the root conftest); subprocess scripts of the tests add
``tests/`` to ``sys.path`` themselves.
"""

from __future__ import annotations

import torch

# A chat template with role tags and an end-of-turn token, BOS first.
ROLE_TAGS = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# ChatML, as SmolLM2 and Qwen write it, with and without a leading BOS.
CHATML_NO_BOS = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML = "{{ bos_token }}" + CHATML_NO_BOS
# Gemma-2 style: no system role (the template raises on one), "model" for the assistant.
NO_SYSTEM = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
    "\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SIDES = ("chosen", "rejected")


def byte_tokenizer(
    chat_template: str | None = ROLE_TAGS,
    *,
    specials: tuple[str, ...] = (),
    bos: str | None = "<s>",
    eos: str | None = "<|end|>",
    pad: str | None = "<pad>",
    adds_bos: bool = False,
):
    """Byte-level BPE with no merges: every byte is one token (ids 0-255 in the byte alphabet's
    sorted order), so any text round-trips and expected ids are easy to write by hand.

    Args:
        chat_template: the Jinja chat template (None: the tokenizer has none, like a base model).
        specials: atomic special tokens, given ids 256, 257, ... in this order.
        bos, eos, pad: the tokenizer's special tokens (added after ``specials`` when not in it).
        adds_bos: the tokenizer itself prepends BOS (like Llama-3 / Gemma), the setting where a
            careless pipeline writes BOS twice.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in specials:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    if specials:
        backend.add_special_tokens(list(specials))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def word_tokenizer(vocab_size: int):
    """Word-level tokenizer over ``t0 .. t{n-1}`` (pad ``t0``, unk ``t1``, eos ``t2``): for tests
    that write token ids directly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="t0", unk_token="t1", eos_token="t2"
    )


def tiny_llama(vocab_size: int, seed: int = 0, dtype: torch.dtype | None = None, **config):
    """A random 2-layer Llama (hidden 32, 4 heads / 2 KV heads, untied head), in eval mode.

    ``config`` overrides any ``LlamaConfig`` field (e.g. ``attn_implementation``,
    ``hidden_size``); the weights depend only on the shapes and ``seed``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        **config,
    }
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **settings)).eval()
    return model if dtype is None else model.to(dtype)


def save_tiny_model(path, tokenizer=None, seed: int = 0):
    """Save a tiny Llama and its tokenizer as a ``save_pretrained`` folder; returns ``path``."""
    tokenizer = tokenizer if tokenizer is not None else byte_tokenizer()
    model = tiny_llama(len(tokenizer), seed)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def pair_batch(
    seed: int = 0, batch: int = 2, lengths=(12, 9), prompt: int = 5, vocab: int = 256
) -> dict[str, torch.Tensor]:
    """A batch of the pair contract: right padding (row 1 has 2 padding tokens per side), the
    response after ``prompt`` tokens, token rewards uniform in (-0.5, 0.5) on response tokens."""
    g = torch.Generator().manual_seed(seed)
    out = {"index": torch.arange(batch), "prompt_lengths": torch.full((batch,), prompt)}
    for side, length in zip(SIDES, lengths, strict=True):
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        attention = torch.ones(batch, length, dtype=torch.long)
        attention[1, -2:] = 0
        response = torch.zeros(batch, length, dtype=torch.bool)
        response[:, prompt:] = True
        response &= attention.bool()
        out[f"{side}_input_ids"] = ids
        out[f"{side}_attention_mask"] = attention
        out[f"{side}_response_mask"] = response
        out[f"{side}_token_rewards"] = (torch.rand(batch, length, generator=g) - 0.5) * response
    return out


def tokenize_pair(tokenizer, example: dict, index: int) -> dict:
    """A row of the contract: the prompt through the chat template, each response on its own
    plus EOS (ids concatenated, never re-tokenized)."""
    text = tokenizer.apply_chat_template(
        example["prompt"], tokenize=False, add_generation_prompt=True
    )
    row = {**example, "index": index}
    row["prompt_ids"] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    for side in SIDES:
        ids = list(tokenizer(example[side], add_special_tokens=False)["input_ids"])
        row[f"{side}_ids"] = ids + [tokenizer.eos_token_id]
    return row


class Annotator:
    """The contrastive scorer and the chunked cache build, composed as
    :class:`~treg_lightning.rewards.ContrastiveRewards` composes them, on a model given directly
    (tests pass tiny models; the source loads its own evaluator).

    ``stats`` adds ``chunks_done`` (chunks this object scored) to the scorer's counters and
    ``chunks`` lists them in order.
    """

    def __init__(
        self,
        template="instruct",
        batch_size: int = 8,
        store_reference_logps: bool = True,
        chunk_pairs: int = 32,
        max_context_length: int | None = None,
    ) -> None:
        from treg_lightning.rewards.annotate import ContrastiveScorer

        self.scorer = ContrastiveScorer(
            template, batch_size, store_reference_logps, max_context_length
        )
        self.chunk_pairs = chunk_pairs
        self.chunks: list[int] = []

    @property
    def stats(self) -> dict:
        return {**self.scorer.stats, "chunks_done": len(self.chunks)}

    def __call__(
        self, model, tokenizer, rows, work_dir, rank=None, world_size=None, on_chunk_done=None
    ):
        from treg_lightning.rewards.cache import build_in_chunks

        def done(c: int) -> None:
            self.chunks.append(c)
            if on_chunk_done is not None:
                on_chunk_done(c)

        return build_in_chunks(
            rows,
            work_dir,
            lambda chunk: self.scorer.score(model, tokenizer, chunk),
            self.chunk_pairs,
            rank=rank,
            world_size=world_size,
            on_chunk_done=done,
        )
