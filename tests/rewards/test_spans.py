"""SpanRewards: character spans mapped onto tokens, checked by hand on a byte-level BPE with
leading-space tokens (SmolLM2's) and a sentencepiece-style Unigram tokenizer built here; the data
plumbing (spans survive normalization, multi-turn prompts); the cache; and every bad annotation
stopping `treg fit` with a message naming the row, before anything is trained."""

from __future__ import annotations

import json
import string
import sys
from unittest import mock

import pytest

from builders import NO_SYSTEM, tiny_fit_args
from treg_lightning.cli.main import cli_main
from treg_lightning.data import PreferenceDataModule
from treg_lightning.errors import ConfigError
from treg_lightning.rewards import SpanAnnotationError, SpanRewards
from treg_lightning.rewards.spans import response_offsets

TEXT = "Hello world, it is  nice."  # 25 characters


def sentencepiece_tokenizer():
    """A sentencepiece-style Unigram tokenizer (Metaspace "▁", prefix space on the first word)
    with a hand-written vocabulary: "world" is split as "▁wor" + "ld"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<bos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
    words = ["▁", "▁Hello", "▁wor", "ld", ",", "▁it", "▁is", "▁nice", ".", "\n"]
    chars = [c for c in string.ascii_letters + string.digits + string.punctuation]
    chars = [c for c in chars if c not in words]
    vocab = [(p, 0.0) for p in specials] + [(w, -1.0) for w in words] + [(c, -5.0) for c in chars]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    backend.add_special_tokens(specials)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<end_of_turn>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = NO_SYSTEM
    return tokenizer


def row_of(tokenizer, text: str, spans, side: str = "chosen", index: int = 7) -> dict:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return {"index": index, side: text, f"{side}_ids": ids + [tokenizer.eos_token_id],
            f"{side}_spans": spans}  # fmt: skip


def span(start: int, end: int, reward: float, **extra) -> dict:
    return {"start": start, "end": end, "reward": reward, **extra}


def values(source, tokenizer, text, spans):
    return source.response_values(row_of(tokenizer, text, spans), "chosen", tokenizer).tolist()


# --- hand-checked mappings ---------------------------------------------------------------------


@pytest.mark.slow
def test_byte_level_bpe_with_leading_space_tokens():
    from treg_lightning.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2")
    # Hello(0,5) Ġworld(5,11) ,(11,12) Ġit(12,15) Ġis(15,18) Ġ(18,19) Ġnice(19,24) .(24,25)
    # + <|im_end|> at the virtual character 25.
    assert response_offsets(tok, TEXT, row_of(tok, TEXT, [])["chosen_ids"]) == [
        (0, 5), (5, 11), (11, 12), (12, 15), (15, 18), (18, 19), (19, 24), (24, 25), (25, 26),
    ]  # fmt: skip
    source = SpanRewards()
    # starts inside "Ġworld" (at the w; the token's leading space is its character 5)
    assert values(source, tok, TEXT, [span(6, 8, -0.5)]) == [0, -0.5, 0, 0, 0, 0, 0, 0, 0]
    # ends inside "Hello"; covers the end-of-turn token (end = len + 1)
    assert values(source, tok, TEXT, [span(0, 2, 0.25), span(20, 26, -0.25)]) == [
        0.25, 0, 0, 0, 0, 0, -0.25, -0.25, -0.25,
    ]  # fmt: skip
    # a span ending at len(text) stops before the end-of-turn token
    assert values(source, tok, TEXT, [span(24, 25, -0.5)])[-2:] == [-0.5, 0]
    # only the space of "Ġworld" is inside: still the token's (any character counts)
    assert values(source, tok, TEXT, [span(5, 6, 0.5)])[:2] == [0, 0.5]


def test_sentencepiece_mapping_by_hand():
    tok = sentencepiece_tokenizer()
    ids = row_of(tok, TEXT, [])["chosen_ids"]
    assert tok.convert_ids_to_tokens(ids) == [
        "▁Hello", "▁wor", "ld", ",", "▁it", "▁is", "▁", "▁nice", ".", "<end_of_turn>",
    ]  # fmt: skip
    assert response_offsets(tok, TEXT, ids) == [
        (0, 5), (5, 9), (9, 11), (11, 12), (12, 15), (15, 18), (18, 19), (19, 24), (24, 25),
        (25, 26),
    ]  # fmt: skip
    source = SpanRewards(default=0.125)
    d = 0.125
    # [3, 7) ends inside "▁Hello"'s successor: both tokens it touches get the value
    assert values(source, tok, TEXT, [span(3, 7, -0.5)]) == [-0.5, -0.5, d, d, d, d, d, d, d, d]
    # [10, 11) starts inside "ld" (9, 11)
    assert values(source, tok, TEXT, [span(10, 11, 0.5)])[:4] == [d, d, 0.5, d]
    # "▁wor" (5, 9) touched by two spans: the one covering more characters wins (3 vs 1) ...
    two = [span(0, 6, -0.5), span(6, 11, 0.25)]
    assert values(source, tok, TEXT, two)[:3] == [-0.5, 0.25, 0.25]
    # ... and the earlier one on a tie (2 vs 2)
    tie = [span(0, 7, -0.5), span(7, 11, 0.25)]
    assert values(source, tok, TEXT, tie)[:3] == [-0.5, -0.5, 0.25]
    # the whole response and its end-of-turn token
    assert values(source, tok, TEXT, [span(0, 26, -0.25)]) == [-0.25] * 10


def test_value_range_rescaled_and_same_value_overlap_allowed():
    tok = sentencepiece_tokenizer()
    source = SpanRewards(value_range=(1, 5))  # 1 -> -0.5, 3 -> 0, 5 -> 0.5, 2 -> -0.25
    spans = [span(0, 5, 1), span(3, 9, 1), span(19, 24, 2), span(24, 25, 5)]
    assert values(source, tok, TEXT, spans) == [-0.5, -0.5, 0, 0, 0, 0, 0, -0.25, 0.5, 0]


def test_nested_overlap_with_different_values_is_refused():
    """A [0, 20) -1 holds B [2, 4) -1 and C [8, 12) +1: B and C never touch, so comparing only
    neighbours in start order (A-B, B-C) misses that C overlaps A with another value."""
    tok = sentencepiece_tokenizer()
    source = SpanRewards(value_range=(-1, 1))
    nested = [span(0, 20, -1), span(2, 4, -1), span(8, 12, 1)]
    with pytest.raises(
        SpanAnnotationError,
        match=r"row 7, field 'chosen_spans\[2\]': spans 0 \[0, 20\) and 2 \[8, 12\) overlap "
        "with different rewards",
    ):
        values(source, tok, TEXT, nested)
    # any order in the file, any depth: the long span listed last, a third level inside C
    shuffled = [span(8, 12, -1), span(9, 10, 1), span(2, 4, -1), span(0, 20, -1)]
    with pytest.raises(SpanAnnotationError, match=r"spans 1 \[9, 10\) and 3 \[0, 20\) overlap"):
        values(source, tok, TEXT, shuffled)
    # neighbours: equal values nested keep the documented rule (the same value everywhere) ...
    same = [span(0, 20, -1), span(2, 4, -1), span(8, 12, -1)]
    assert values(source, tok, TEXT, same) == [-0.5] * 8 + [0, 0]
    # ... spans that only touch (end == next start) do not overlap, whatever their values
    touching = [span(0, 5, -1), span(5, 11, 1), span(11, 12, -1)]
    assert values(source, tok, TEXT, touching)[:4] == [-0.5, 0.5, 0.5, -0.5]


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (span(4, 4, -0.5), "span [4, 4) is empty (start equals end, so it covers no character)"),
        (span(0, 0, -0.5), "span [0, 0) is empty"),
        (span(26, 26, -0.5), "span [26, 26) is empty"),  # at the end-of-turn token's place
        (span(9, 3, -0.5), "span [9, 3) ends before it starts"),
        (span(3, 30, -0.5), "span [3, 30) lies outside the response text (25 characters"),
        (span(-1, 3, -0.5), "span [-1, 3) lies outside the response text"),
    ],
)
def test_empty_and_reversed_spans_have_their_own_message(bad, expected):
    tok = sentencepiece_tokenizer()
    with pytest.raises(SpanAnnotationError) as info:
        values(SpanRewards(), tok, TEXT, [span(0, 2, -0.5), bad])
    message = str(info.value)
    assert message.startswith("data row 7, field 'chosen_spans[1]': ") and expected in message
    if "empty" in expected or "before" in expected:
        assert "outside" not in message


def test_no_spans_and_truncated_responses():
    tok = sentencepiece_tokenizer()
    row = row_of(tok, TEXT, None)
    assert SpanRewards(default=-0.1).response_values(row, "chosen", tok).tolist() == pytest.approx(
        [-0.1] * 10
    )
    row = row_of(tok, TEXT, [span(19, 26, 0.5)])
    row["chosen_ids"] = row["chosen_ids"][:8]  # truncated by max_length: the prefix is kept
    assert SpanRewards().response_values(row, "chosen", tok).tolist() == [0] * 7 + [0.5]


def test_changed_response_ids_are_refused():
    tok = sentencepiece_tokenizer()
    row = row_of(tok, TEXT, [span(0, 3, 0.5)])
    row["chosen_ids"] = row["chosen_ids"][:2] + row["chosen_ids"][3:]  # a token went missing
    with pytest.raises(SpanAnnotationError, match="row 7, field 'chosen_spans'.*at token 2"):
        SpanRewards().response_values(row, "chosen", tok)


def test_values_per_piece_of_text():
    tok = sentencepiece_tokenizer()
    pieces = [
        {"text": " Hello", "reward": 0.5},  # a leading space the response lost when stripped
        {"text": " world,", "reward": -0.25},
        {"text": " it is  nice.", "reward": None},  # unannotated
    ]
    row = {**row_of(tok, TEXT, None), "chosen_pieces": pieces}
    got = SpanRewards().response_values(row, "chosen", tok).tolist()
    # ▁Hello ▁wor ld , ▁it ▁is ▁ ▁nice . <end_of_turn>
    assert got == [0.5, -0.25, -0.25, -0.25, 0, 0, 0, 0, 0, 0]
    row["chosen_pieces"] = [{"text": "Hello word, it is  nice.", "reward": 0.1}]
    with pytest.raises(SpanAnnotationError, match="chosen_pieces.*first difference at character 9"):
        SpanRewards().response_values(row, "chosen", tok)
    row["chosen_spans"] = [span(0, 1, 0.1)]
    with pytest.raises(SpanAnnotationError, match="either spans or chosen_pieces"):
        SpanRewards().response_values(row, "chosen", tok)


def test_config_errors():
    with pytest.raises(ConfigError, match="default must be in"):
        SpanRewards(default=0.7)
    with pytest.raises(ConfigError, match="lo < hi"):
        SpanRewards(value_range=(2, 1))


# --- through the data module: spans survive normalization, multi-turn prompts, the cache -----


def multi_turn_pairs(path):
    rows = [
        {
            "prompt": [
                {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Count."},
            ],
            "chosen": [{"role": "assistant", "content": "  one two  "}],  # stripped
            "rejected": [{"role": "assistant", "content": "no"}],
            "chosen_spans": [{"start": 4, "end": 7, "reward": -0.5, "text": "two"}],
            "rejected_spans": [{"start": 0, "end": 3, "reward": 0.5}],  # and end-of-turn
        },
        {"prompt": "Add 1 and 1.", "chosen": "2.", "rejected": "No"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_data_module_serves_span_rewards(tmp_path, tiny_model_dir):
    data = multi_turn_pairs(tmp_path / "pairs.jsonl")
    source = SpanRewards(default=0.0, cache_dir=str(tmp_path / "cache"))
    dm = PreferenceDataModule(
        source=str(data), tokenizer=str(tiny_model_dir), rewards=source, max_length=256,
        max_prompt_length=128,
    )  # fmt: skip
    served = dm.annotate()["train"]
    first = served[0]
    # byte tokenizer: one token per character, then the end-of-turn token
    assert first["chosen_token_rewards"] == [0, 0, 0, 0, -0.5, -0.5, -0.5, 0]
    assert first["rejected_token_rewards"] == [0.5, 0.5, 0.5]
    assert served[1]["chosen_token_rewards"] == [0, 0, 0]
    (folder,) = (tmp_path / "cache").iterdir()
    assert (folder / "meta.json").is_file()
    again = PreferenceDataModule(
        source=str(data), tokenizer=str(tiny_model_dir), rewards=source, max_length=256,
        max_prompt_length=128,
    ).annotate()["train"]  # fmt: skip
    assert again[0]["chosen_token_rewards"] == first["chosen_token_rewards"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # reused
    # other annotations, other fingerprint: another cache folder
    text = data.read_text().replace('"end": 7, "reward": -0.5', '"end": 7, "reward": -0.25')
    data.write_text(text)
    PreferenceDataModule(
        source=str(data), tokenizer=str(tiny_model_dir), rewards=source, max_length=256,
        max_prompt_length=128,
    ).annotate()  # fmt: skip
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_skip_bad_annotations_counts_and_warns(tmp_path):
    tok = sentencepiece_tokenizer()
    rows = [
        {**row_of(tok, TEXT, [span(0, 99, 0.5)]), "rejected": "nice.", "rejected_ids": []},
        {**row_of(tok, TEXT, [span(0, 5, 0.5)], index=8), "rejected": "x", "rejected_ids": []},
    ]
    source = SpanRewards(skip_bad_annotations=True)
    with pytest.warns(UserWarning, match="1 response.*row 7, field 'chosen_spans\\[0\\]'"):
        columns = source.token_values(rows, tok)
    assert source.skipped == {"train": 1}
    assert columns["chosen_token_rewards"][0].tolist() == [0] * 10
    assert columns["chosen_token_rewards"][1].tolist()[:2] == [0.5, 0]


# --- bad annotations stop `treg fit` before anything is trained --------------------------------


BAD = [
    pytest.param(
        [span(0, 9, -0.5)], "field 'rejected_spans[0]': span [0, 9) lies outside", id="outside"
    ),
    pytest.param(
        [span(0, 2, -0.5), span(1, 3, 0.25)],
        "spans 0 [0, 2) and 1 [1, 3) overlap with different rewards",
        id="overlap",
    ),
    pytest.param(
        [span(0, 2, -0.75)], "reward -0.75 is outside the (-0.5, 0.5) scale", id="out_of_range"
    ),
    pytest.param(
        [span(0, 2, -0.5, text="Ye")], "covers 'No' but says text='Ye'", id="text_mismatch"
    ),
    pytest.param([{"start": 0, "reward": 0.1}], "each span needs start, end, reward", id="keys"),
]


LONG = "No, that is wrong: 4 is the sum."  # 32 characters
BAD += [
    pytest.param(
        [span(0, 20, -0.5), span(2, 4, -0.5), span(8, 12, 0.5)],
        "spans 0 [0, 20) and 2 [8, 12) overlap with different rewards",
        LONG,
        id="nested_overlap",
    ),
    pytest.param([span(4, 4, -0.5)], "span [4, 4) is empty", LONG, id="empty"),
]


@pytest.mark.parametrize(("spans", "expected", "rejected"), [
    pytest.param(*p.values, "No", id=p.id) if len(p.values) == 2 else p for p in BAD
])  # fmt: skip
def test_bad_annotation_stops_fit(tmp_path, tiny_model_dir, capsys, spans, expected, rejected):
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "Add 1 and 1.", "chosen": "2.", "rejected": "No"},
        {"prompt": "Add 2 and 2.", "chosen": "4.", "rejected": rejected, "rejected_spans": spans},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = tiny_fit_args(
        tiny_model_dir, data, tmp_path / "run", lr=0.01, alpha=0.1, max_steps=2,
        rewards="treg_lightning.rewards.SpanRewards",
    )  # fmt: skip
    args.append(f"--data.rewards.cache_dir={tmp_path / 'cache'}")
    with mock.patch.object(sys, "argv", ["treg"]), pytest.raises(SystemExit) as info:
        cli_main(["fit", *args])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    assert "data row 1, field 'rejected_spans" in err and expected in err, err
    run = tmp_path / "run"
    assert not list(run.rglob("*.ckpt")) and not (run / "lightning_logs").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_fit_trains_on_span_rewards(tmp_path, tiny_model_dir):
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"Add {i} and {i}.", "chosen": f"{2 * i}.", "rejected": "No" * (i + 1),
         "rejected_spans": [{"start": 0, "end": 2, "reward": -0.5}]}
        for i in range(4)
    ]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = tiny_fit_args(
        tiny_model_dir, data, tmp_path / "run", lr=0.01, alpha=0.1, max_steps=1,
        rewards="treg_lightning.rewards.SpanRewards",
    )  # fmt: skip
    args.append(f"--data.rewards.cache_dir={tmp_path / 'cache'}")
    with mock.patch.object(sys, "argv", ["treg"]):
        cli_main(["fit", *args])
    assert list((tmp_path / "run").rglob("*.ckpt"))
