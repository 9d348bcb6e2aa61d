"""bench/credit_data.py: the credit benchmark is deterministic, its spans point at the inserted
text (in characters and after tokenization), chosen is untouched in minimal pairs, and the
train / held-out split shares no prompt."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

from builders import byte_tokenizer

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "credit_data.py"


@pytest.fixture(scope="module")
def credit():
    spec = importlib.util.spec_from_file_location("credit_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_bytes_and_fingerprint(credit, tmp_path):
    first = credit.build(tmp_path / "a", seed=3, hh_path=None)
    second = credit.build(tmp_path / "b", seed=3, hh_path=None)
    other = credit.build(tmp_path / "c", seed=4, hh_path=None)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first["sha256_all"] == second["sha256_all"]
    assert other["sha256_all"] != first["sha256_all"]  # the seed does change the draw
    import hashlib

    blob = (tmp_path / "a" / "train.jsonl").read_bytes()
    assert first["sha256"]["train"] == hashlib.sha256(blob).hexdigest()


def test_hand_checked_insertions(credit):
    text = "Paris is the capital. It has 2,100,000 people."
    inserted = credit.insert_sentence(text, "What a lazy question.", 22)
    assert inserted.text == "Paris is the capital. What a lazy question. It has 2,100,000 people."
    assert (inserted.start, inserted.end) == (22, 43)
    assert inserted.text[22:43] == "What a lazy question."
    appended = credit.insert_sentence(text, "Swim out past the flags.", len(text))
    assert appended.text == text + " Swim out past the flags."
    assert appended.text[appended.start : appended.end] == "Swim out past the flags."
    assert credit.sentence_starts(text) == [0, 22]
    number = credit.replace_number(text, random.Random(0))
    assert number.text[: number.start] == "Paris is the capital. It has "
    assert number.text[number.end :] == " people."
    assert number.inserted != "2,100,000" and number.inserted.replace(",", "").isdigit()


def test_rows_point_at_the_inserted_text(credit, tmp_path):
    credit.build(tmp_path, seed=0, hh_path=None)
    rows = read(tmp_path / "train.jsonl") + read(tmp_path / "heldout.jsonl")
    demo = {r["id"]: r for r in credit.read_demo()}
    assert {r["condition"] for r in rows} == {"minimal", "non_minimal"}
    assert {r["kind"] for r in rows} == set(credit.KINDS)
    for row in rows:
        source = demo[row["id"].split("-minimal")[0].split("-non_minimal")[0]]
        rejected = row["rejected"][0]["content"]
        (span,) = row["rejected_spans"]
        assert row["chosen_spans"] == [] and span["reward"] == -0.5
        assert rejected[span["start"] : span["end"]] == row["defect"]
        assert row["chosen"][0]["content"] == source["chosen"]  # chosen never changes
        base = source["chosen"] if row["condition"] == "minimal" else source["rejected"]
        if row["kind"] == "wrong_number":
            # the rest of the text is the base's, around a different number
            assert rejected[: span["start"]] == base[: span["start"]]
            tail = len(rejected) - span["end"]
            assert rejected[span["end"] :] == base[len(base) - tail :]
        else:  # removing the span and one space gives the base back
            removed = rejected[: span["start"]] + rejected[span["end"] :]
            assert " ".join(removed.split()) == " ".join(base.split())
            assert row["defect"] in credit.SENTENCES[row["kind"]]


def test_split_by_prompt_has_no_overlap(credit, tmp_path):
    credit.build(tmp_path, seed=0, hh_path=None)
    train, heldout = read(tmp_path / "train.jsonl"), read(tmp_path / "heldout.jsonl")
    keys = {split: {credit.prompt_key(r["prompt"]) for r in rows}
            for split, rows in (("train", train), ("heldout", heldout))}  # fmt: skip
    assert keys["train"].isdisjoint(keys["heldout"])
    assert len(heldout) == pytest.approx(0.25 * (len(train) + len(heldout)), abs=2)


def test_rows_read_by_the_data_module(credit, tmp_path):
    from treg_lightning.data.formats import normalize_row

    credit.build(tmp_path, seed=0, hh_path=None)
    row = read(tmp_path / "train.jsonl")[0]
    example = normalize_row(row)
    assert example["rejected"] == row["rejected"][0]["content"]  # offsets stay valid
    assert example["prompt"] == row["prompt"]


@pytest.mark.parametrize("tokenizer_name", ["bytes", "smollm2"])
def test_tokens_over_the_span_decode_to_the_inserted_text(credit, tokenizer_name):
    if tokenizer_name == "bytes":
        tokenizer = byte_tokenizer()
    else:
        from treg_lightning.models.loading import load_tokenizer

        try:
            tokenizer = load_tokenizer("smollm2")
        except Exception as error:  # noqa: BLE001 - converted tokenizer not on this machine
            pytest.skip(f"smollm2 tokenizer not available: {error}")
    text = "Paris is the capital. It has 2,100,000 people."
    for defect in (credit.insert_sentence(text, "What a lazy question.", 22),
                   credit.insert_sentence(text, "Swim out past the flags.", len(text)),
                   credit.replace_number(text, random.Random(1))):  # fmt: skip
        spans = [{"start": defect.start, "end": defect.end, "reward": -0.5}]
        labels = credit.token_labels(tokenizer, defect.text, spans)
        ids = tokenizer(defect.text, add_special_tokens=False)["input_ids"]
        assert len(labels) == len(ids) + 1 and labels[-1] == 0  # the end-of-turn token
        marked = [i for i, label in zip(ids, labels) if label]
        inside = [i for i, label in enumerate(labels[:-1]) if label]
        assert inside == list(range(inside[0], inside[-1] + 1))  # one contiguous run
        assert tokenizer.decode(marked).strip() == defect.inserted
        unmarked = tokenizer.decode([i for i, label in zip(ids, labels) if not label])
        assert defect.inserted not in unmarked
