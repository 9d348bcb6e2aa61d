"""bench/credit_data.py, layout v2: sentence-disjoint splits with an unseen kind, balanced hosts
with minimal twins, number spans over the changed characters only, determinism; and the v1
layout still gives the bytes of its committed fingerprint."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def credit():
    spec = importlib.util.spec_from_file_location("credit_data", ROOT / "bench" / "credit_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def built(credit, tmp_path_factory):
    """The v2 layout over the demo set (no shared data needed)."""
    out = tmp_path_factory.mktemp("credit-v2")
    record = credit.build(out, seed=0, hh_path=None, layout=credit.Layout("v2"))
    return record, read(out / "train.jsonl"), read(out / "heldout.jsonl")


def test_held_out_sentences_were_never_trained_on(credit, built):
    record, train, heldout = built
    trained = {r["defect"] for r in train}
    sentences = [r["defect"] for r in heldout if r["kind"] != "wrong_number"]
    assert sentences and not set(sentences) & trained
    for r in train + heldout:  # no held-out sentence even inside a training text
        if r["kind"] != "wrong_number":
            assert r["defect"] in credit.ALL_SENTENCES[r["kind"]]
    texts = " ".join(r["rejected"][0]["content"] for r in train)
    assert not any(s in texts for s in set(sentences))
    pools = credit.sentence_pools(0, 1 / 3)
    for kind in pools["train"]:
        assert not set(pools["train"][kind]) & set(pools["heldout"][kind])
        assert len(pools["heldout"][kind]) == 10 and len(pools["train"][kind]) == 20
    assert record["stats"]["heldout_defects_trained_on"] == 0


def test_the_unseen_kind_is_held_out_only(credit, built):
    _, train, heldout = built
    assert "irrelevant" not in {r["kind"] for r in train}
    assert {r["kind"] for r in heldout} >= {"irrelevant", "insult", "unsafe"}
    keys = [{credit.prompt_key(r["prompt"]) for r in rows} for rows in (train, heldout)]
    assert keys[0].isdisjoint(keys[1])


def test_hosts_are_balanced_and_twins_share_the_defect(credit, built):
    _, train, heldout = built
    demo = {r["id"]: r for r in credit.read_demo()}
    rows = train + heldout
    by_id = {r["id"]: r for r in rows}
    hosts = Counter(r["host"] for r in rows if r["condition"] == "non_minimal")
    assert set(hosts) == {"chosen", "rejected"}
    assert abs(hosts["chosen"] - hosts["rejected"]) <= 0.25 * sum(hosts.values())
    for r in rows:
        if r["condition"] != "non_minimal":
            continue
        source = demo[r["id"].split("-non_minimal")[0]]
        other = "rejected" if r["host"] == "chosen" else "chosen"
        assert r["chosen"][0]["content"] == source[other]  # the clean other response
        twin = by_id[r["id"].replace("-non_minimal-", "-minimal-")]
        assert twin["chosen"][0]["content"] == source[r["host"]]  # the clean host
        assert twin["rejected"] == r["rejected"] and twin["rejected_spans"] == r["rejected_spans"]
        text, (span,) = r["rejected"][0]["content"], r["rejected_spans"]
        if r["kind"] != "wrong_number":  # the host is the rejected text without the sentence
            removed = text[: span["start"]] + text[span["end"] :]
            assert " ".join(removed.split()) == " ".join(source[r["host"]].split())


def test_twin_pairs_put_the_defect_where_the_draw_says(credit):
    """The host is a fair coin: over many draws each side hosts about half of the defects."""
    example = {
        "id": "x",
        "source": "demo",
        "prompt": [{"role": "user", "content": "Hi?"}],
        "chosen": "Hello there. How are you?",
        "rejected": "Go away. I am busy.",
    }
    rng = random.Random(0)
    pools = credit.sentence_pools(0, 1 / 3)["train"]
    hosts = Counter(credit.twin_pairs(example, ["insult", "unsafe"], pools, rng)[0]["host"]
                    for _ in range(400))  # fmt: skip
    assert 160 <= hosts["chosen"] <= 240


@pytest.mark.parametrize(("old", "new", "span"), [
    ("1.4", "1.6", (2, 3)), ("100", "150", (1, 2)), ("1,000", "1,250", (2, 4)),
    ("12", "9", (0, 1)), ("7", "17", (0, 1)), ("25", "125", (0, 1)), ("100", "10", (2, 2)),
])  # fmt: skip
def test_changed_span_by_hand(credit, old, new, span):
    assert credit.changed_span(old, new) == span


def test_number_spans_cover_only_changed_characters(credit, built):
    _, train, heldout = built
    text = "It costs 1.4 dollars, or 1,000 cents."
    for seed in range(30):
        defect = credit.replace_number(text, random.Random(seed), changed_only=True)
        assert defect.end > defect.start
        new, tail = defect.text, len(defect.text) - defect.end
        start = defect.start
        assert new[:start] == text[:start] and new[defect.end :] == text[len(text) - tail :]
        # minimal: the first and the last marked characters differ from the old text
        old_end = len(text) - tail
        assert new[start] != text[start] or old_end == start
        assert new[defect.end - 1] != text[old_end - 1] or old_end == start
    demo = {r["id"]: r for r in credit.read_demo()}
    numbers = [r for r in train + heldout if r["kind"] == "wrong_number"]
    assert numbers
    for r in numbers:  # the built rows: the span starts and ends at a changed character
        host = demo[r["id"].split("-non_minimal")[0].split("-minimal")[0]][r["host"]]
        new, ((span),) = r["rejected"][0]["content"], r["rejected_spans"]
        start, end, tail = span["start"], span["end"], len(new) - span["end"]
        assert new[:start] == host[:start] and new[end:] == host[len(host) - tail :]
        assert new[start] != host[start] and new[end - 1] != host[len(host) - tail - 1]


def test_same_seed_same_bytes(credit, tmp_path):
    layout = credit.Layout("v2")
    first = credit.build(tmp_path / "a", seed=5, hh_path=None, layout=layout)
    second = credit.build(tmp_path / "b", seed=5, hh_path=None, layout=layout)
    other = credit.build(tmp_path / "c", seed=6, hh_path=None, layout=layout)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first["sha256_all"] == second["sha256_all"] != other["sha256_all"]
    blob = (tmp_path / "a" / "heldout.jsonl").read_bytes()
    assert first["sha256"]["heldout"] == hashlib.sha256(blob).hexdigest()


def test_no_unseen_kind_and_the_layout_checks(credit, tmp_path):
    record = credit.build(tmp_path, seed=0, hh_path=None, layout=credit.Layout("v2", 0.5, None))
    train = read(tmp_path / "train.jsonl")
    assert "irrelevant" in {r["kind"] for r in train}
    assert record["layout"] == {"name": "v2", "heldout_sentences": 0.5, "unseen_kind": None}
    with pytest.raises(ValueError, match="unseen_kind"):
        credit.Layout("v2", unseen_kind="rude")
    with pytest.raises(ValueError, match="heldout_sentences"):
        credit.Layout("v2", heldout_sentences=1.0)


def test_v1_layout_is_unchanged(credit, tmp_path):
    """The earlier layout rebuilds to the sha256 its committed fingerprint records."""
    if not credit.HH_RLHF.exists():
        pytest.skip(f"{credit.HH_RLHF} not on this machine")
    committed = json.loads((ROOT / "bench" / "results" / "credit" / "fingerprint.json").read_text())
    record = credit.build(tmp_path, seed=committed["seed"], hh_path=credit.HH_RLHF)
    assert record["sha256_all"] == committed["sha256_all"]
    assert record["layout"] == {"name": "v1"}
