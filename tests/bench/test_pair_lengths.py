"""bench/pair_lengths.py and bench/data/hh_lengths.json: the benchmark's pairs come from a file in
the checkout (a GPU machine has no ../shared), derived by the library's own tokenization."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import derive_hh_lengths  # noqa: E402
import pair_lengths  # noqa: E402


def test_the_committed_lengths_are_a_fresh_derivation(tmp_path):
    """Re-derived from ../shared (HH-RLHF test split) with the SmolLM2 tokenizer: the same
    file, byte for byte; the first pair checked by hand against the library's tokenizer."""
    if not derive_hh_lengths.SOURCE.is_file():
        pytest.skip(f"{derive_hh_lengths.SOURCE} is absent")
    assert derive_hh_lengths.main(["--check"]) == 0
    table = json.loads(pair_lengths.LENGTHS_FILE.read_text())
    assert table["rows_read"] == 1500
    assert len(table["lengths"]) == 1500 - sum(table["rows_skipped"].values())
    # Lengths only, never the text.
    assert all(len(row) == 3 and all(isinstance(n, int) for n in row) for row in table["lengths"])
    assert set(table) == {
        "source", "source_sha256", "tokenizer", "rule", "derived_by", "rows_read",
        "rows_skipped", "lengths",
    }  # fmt: skip


def test_first_pair_by_plain_tokenizer_calls():
    """Row 0 of the file against the tokenizer called directly: the prompt's chat template with
    the generation prompt, each response + its EOS."""
    import gzip

    from treg_lightning.data.formats import normalize_row
    from treg_lightning.models.loading import load_tokenizer

    if not derive_hh_lengths.SOURCE.is_file():
        pytest.skip(f"{derive_hh_lengths.SOURCE} is absent")
    with gzip.open(derive_hh_lengths.SOURCE, "rt") as handle:
        first = normalize_row(json.loads(handle.readline()))
    tokenizer = load_tokenizer("smollm2")
    prompt = tokenizer.apply_chat_template(
        first["prompt"], tokenize=False, add_generation_prompt=True
    )
    want = [
        len(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
        len(tokenizer(first["chosen"], add_special_tokens=False)["input_ids"]) + 1,
        len(tokenizer(first["rejected"], add_special_tokens=False)["input_ids"]) + 1,
    ]
    assert list(pair_lengths.load_table()[0]) == want


@pytest.mark.parametrize(
    ("lengths", "max_length", "want"),
    [
        ((100, 30, 40), 1024, (100, 30, 40)),  # fits: unchanged
        ((900, 300, 40), 1024, (512, 300, 40)),  # prompt cut to 1024 // 2, responses fit beside
        ((300, 900, 10), 1024, (300, 724, 10)),  # chosen cut to 1024 - 300
        ((1, 5, 5), 64, (2, 5, 5)),  # at least BOS + one prompt token
    ],
)
def test_truncate_by_hand(lengths, max_length, want):
    assert pair_lengths.truncate(lengths, max_length) == want


def test_sample_is_seeded_and_rows_have_the_lengths():
    a = pair_lengths.sample(8, 1024, seed=3)
    assert a == pair_lengths.sample(8, 1024, seed=3) != pair_lengths.sample(8, 1024, seed=4)
    assert all(p + max(c, r) <= 1024 for p, c, r in a)
    rows = pair_lengths.make_rows(a, vocab_size=50, seed=0)
    assert [pair_lengths.triple(r) for r in rows] == a
    assert all(r["prompt_ids"][0] == pair_lengths.BOS_ID for r in rows)
    assert all(r["chosen_ids"][-1] == r["rejected_ids"][-1] == pair_lengths.EOS_ID for r in rows)


def test_token_counts_by_hand():
    """Pairs (3, 2, 1) and (5, 1, 4): pair tokens 6 + 10 = 16. One padded [2B, T] batch:
    T = max(3 + 2, 5 + 4) = 9, 2 x 2 x 9 = 36 positions. One shared [B, W] batch:
    W = max(3 + 2 + 1 + 1, 5 + 1 + 4 + 1) = 11, 2 x 11 = 22."""
    rows = pair_lengths.make_rows([(3, 2, 1), (5, 1, 4)], vocab_size=50, seed=0)
    assert pair_lengths.pair_tokens(rows) == 16
    assert pair_lengths.padded_tokens([rows]) == 36
    assert pair_lengths.shared_padded_tokens([rows]) == 22
