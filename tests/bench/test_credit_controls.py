"""bench/credit_controls.py: where the control sources put their token rewards, on a byte-level
tokenizer (one token per character, so the expected values are written by hand)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from builders import byte_tokenizer

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def controls():
    spec = importlib.util.spec_from_file_location("credit_controls", BENCH / "credit_controls.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def row(tokenizer, rejected: str, start: int, end: int, chosen: str = "Fine, thanks.") -> dict:
    ids = {s: tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
           for s, t in (("chosen", chosen), ("rejected", rejected))}  # fmt: skip
    return {"index": 0, "chosen": chosen, "rejected": rejected, "chosen_ids": ids["chosen"],
            "rejected_ids": ids["rejected"], "chosen_spans": [],
            "rejected_spans": [{"start": start, "end": end, "reward": -0.5}]}  # fmt: skip


def values(source, r, tokenizer):
    columns = source.token_values([r], tokenizer)  # the path annotate() takes
    return columns["chosen_token_rewards"][0], columns["rejected_token_rewards"][0]


# 40 characters of text, then the defect (15 characters: tokens 40-54), then 11 more, then the
# end-of-turn token (index 66): a window of 15 clean tokens fits before the defect.
LONG = "This is a clean opening sentence, fine. Bad words here. More text."
SHORT = "Good answer. Bad words here. More text."  # defect at 13-27; no clean window of 15


def test_the_oracle_as_spans_map_it(controls, tokenizer):
    from treg_lightning.rewards.spans import SpanRewards

    chosen, rejected = values(SpanRewards(), row(tokenizer, LONG, 40, 55), tokenizer)
    expected = np.zeros(len(LONG) + 1)
    expected[40:55] = -0.5
    np.testing.assert_array_equal(rejected, expected)
    np.testing.assert_array_equal(chosen, np.zeros(len("Fine, thanks.") + 1))


@pytest.mark.parametrize(("text", "start", "end"), [(LONG, 40, 55), (SHORT, 13, 28)])
def test_shuffled_keeps_the_count_off_the_defect(controls, tokenizer, text, start, end):
    r = row(tokenizer, text, start, end)
    chosen, rejected = values(controls.ShuffledSpanRewards(seed=0), r, tokenizer)
    moved = np.flatnonzero(rejected)
    assert len(moved) == end - start and np.all(rejected[moved] == -0.5)  # the same count
    assert not set(moved) & set(range(start, end))  # none on the defect
    assert rejected[-1] == 0.0 and not chosen.any()  # end-of-turn and chosen untouched
    if text == LONG:  # a window of clean tokens exists: one contiguous run, before the defect
        assert moved.tolist() == list(range(moved[0], moved[0] + 15)) and moved[-1] < start
    again = values(controls.ShuffledSpanRewards(seed=0), r, tokenizer)[1]
    np.testing.assert_array_equal(again, rejected)  # seeded by the text: the same place


def test_shuffled_moves_with_its_seed(controls, tokenizer):
    r = row(tokenizer, LONG + " " + LONG, 40, 55)  # many clean windows to choose from
    places = {tuple(np.flatnonzero(values(controls.ShuffledSpanRewards(seed=s), r, tokenizer)[1]))
              for s in range(6)}  # fmt: skip
    assert len(places) > 1


def test_uniform_keeps_the_total(controls, tokenizer):
    r = row(tokenizer, SHORT, 13, 28)
    chosen, rejected = values(controls.UniformSpanRewards(), r, tokenizer)
    n = len(SHORT)  # text tokens; the end-of-turn token keeps 0
    np.testing.assert_allclose(rejected[:n], np.full(n, -0.5 * 15 / n), rtol=1e-6)
    assert rejected[-1] == 0.0
    assert rejected.sum() == pytest.approx(-0.5 * 15, rel=1e-6)  # the oracle's total
    assert not chosen.any()


def test_dense_signed_adds_the_anchor(controls, tokenizer):
    r = row(tokenizer, SHORT, 13, 28)
    chosen, rejected = values(controls.DenseSignedSpanRewards(positive=0.1), r, tokenizer)
    expected = np.full(len(SHORT) + 1, 0.1, np.float32)
    expected[13:28] = -0.5
    expected[-1] = 0.0
    np.testing.assert_array_equal(rejected, expected)
    np.testing.assert_array_equal(chosen, np.r_[np.full(len("Fine, thanks."), 0.1, np.float32),
                                                0.0])  # fmt: skip
    with pytest.raises(ValueError, match="positive"):
        controls.DenseSignedSpanRewards(positive=0.0)


def test_each_control_has_its_own_cache(controls):
    from treg_lightning.rewards.spans import SpanRewards

    settings = [SpanRewards().settings(), controls.ShuffledSpanRewards().settings(),
                controls.ShuffledSpanRewards(seed=1).settings(),
                controls.UniformSpanRewards().settings(),
                controls.DenseSignedSpanRewards().settings(),
                controls.DenseSignedSpanRewards(positive=0.2).settings()]  # fmt: skip
    assert len({repr(sorted(s.items())) for s in settings}) == len(settings)
