"""Builds the credit benchmark: preference pairs whose rejected response carries a known defect.

Real text from two sources, read in place: the HH-RLHF harmless-base test pairs (Anthropic, MIT;
``../shared/data/hh-rlhf-harmless-base-test.jsonl.gz``) and the package's embedded demo set
(written for this project, Apache-2.0). Into each pair's rejected response the builder writes one
defect (texts in ``bench/credit_defects.py``):

- ``insult``: a dismissive remark inserted at a sentence boundary;
- ``wrong_number``: a number of the response replaced by a different one (span = the new number);
- ``irrelevant``: an off-topic sentence inserted at a sentence boundary;
- ``unsafe``: an unsafe instruction appended at the end.

Two conditions: ``minimal`` (rejected = chosen with the defect inserted) and ``non_minimal``
(chosen and rejected are the source pair's two different responses, the defect inserted into
the rejected one). Each row is a conversational pair as ``PreferenceDataModule`` reads it::

    {"id": "hh-0012", "prompt": [{"role": "user", "content": ...}, ...],
     "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}],
     "chosen_spans": [], "rejected_spans": [{"start": 41, "end": 86, "reward": -0.5}],
     "kind": "insult", "condition": "minimal", "source": "hh-rlhf", "defect": "..."}

``start``/``end`` are character offsets into the rejected response text (end exclusive), the
span-annotation format of ``treg_lightning.rewards.spans.SpanRewards``. Pairs are split into
``train`` and ``heldout`` by prompt (no prompt in both). Everything is drawn from ``--seed``: the
same seed gives the same bytes, and the sha256 of each file is recorded.

    python bench/credit_data.py                       # outputs/credit/{train,heldout}.jsonl
    python bench/credit_data.py --datasheet bench/results/credit   # + DATASHEET.md, fingerprint

The data files are rebuilt, not committed; the datasheet and the fingerprint are.

Layouts (``--layout``): ``v1``, the default, is the earlier layout above, byte for byte. ``v2``
(:class:`Layout`) is built so that a credit experiment can tell methods apart: training and
held-out defects come from disjoint parts of each kind's sentences (30 per kind), one kind
(``--unseen-kind``, default ``irrelevant``) occurs in held-out pairs only, the defect goes into
either response of the source pair at random (``host``) with the other kept clean as chosen, each
such pair has a ``minimal`` twin (the clean host as chosen), and ``wrong_number`` spans cover only
the changed characters.

    python bench/credit_data.py --layout v2 --out outputs/credit-v2 \
        --datasheet bench/results/credit/data-v2
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

try:  # run as a script (bench/ on sys.path) or imported by path from the tests
    from credit_defects import ALL_SENTENCES, KINDS, SENTENCES
except ImportError:  # pragma: no cover
    import importlib.util
    import sys

    _spec = importlib.util.spec_from_file_location(
        "credit_defects", Path(__file__).with_name("credit_defects.py")
    )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["credit_defects"] = _module
    _spec.loader.exec_module(_module)
    KINDS, SENTENCES, ALL_SENTENCES = _module.KINDS, _module.SENTENCES, _module.ALL_SENTENCES

HH_RLHF = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
)
REWARD = -0.5  # the value of a defect span, on the regularizer's (-0.5, 0.5) scale
MAX_RESPONSE_CHARS = 600  # longer responses are left out (the CPU runs keep ~100 tokens)
HELDOUT_FRACTION = 0.25
_NUMBER = re.compile(r"(?<![\w.,])\d+(?:[.,]\d+)*(?![\w])")
# A sentence starts after . ! ? (optionally closing quote/bracket) and whitespace.
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=\S)")


@dataclass(frozen=True)
class Defect:
    """One inserted defect: the new text and the span of the inserted part in it."""

    text: str
    start: int
    end: int

    @property
    def inserted(self) -> str:
        return self.text[self.start : self.end]


# --- defects ---------------------------------------------------------------------------------


def sentence_starts(text: str) -> list[int]:
    """Offsets where a sentence of ``text`` starts (0 included)."""
    return [0] + [m.end() for m in _BOUNDARY.finditer(text)]


def insert_sentence(text: str, sentence: str, at: int) -> Defect:
    """``sentence`` inserted before the sentence starting at ``at`` (or appended at the end,
    ``at == len(text)``), one space between them."""
    if at >= len(text):
        new = text + " " + sentence
        return Defect(new, len(text) + 1, len(new))
    new = text[:at] + sentence + " " + text[at:]
    return Defect(new, at, at + len(sentence))


def numbers(text: str) -> list[re.Match]:
    return list(_NUMBER.finditer(text))


def wrong_number(value: str, rng: random.Random) -> str:
    """A different number in the same style (digits only, same separators kept)."""
    digits = re.sub(r"\D", "", value)
    number = int(digits)
    for _ in range(100):
        candidate = number + rng.choice((-1, 1)) * rng.randint(1, max(3, number // 3 + 1))
        if candidate > 0 and str(candidate) != digits:
            break
    else:  # pragma: no cover - the loop above always finds one
        candidate = number + 1
    if "," in value and "." not in value and candidate >= 1000:
        return f"{candidate:,}"
    if "." in value:
        decimals = len(value.rsplit(".", 1)[1])
        scaled = candidate / 10**decimals
        return f"{scaled:.{decimals}f}"
    return str(candidate)


def changed_span(old: str, new: str) -> tuple[int, int]:
    """``(start, end)`` in ``new`` of the characters that differ from ``old``: what is left
    once the longest common prefix and then the longest common suffix are set aside
    (``"1.4" -> "1.6"``: ``(2, 3)``, the ``6``). Empty when ``new`` only drops characters."""
    prefix = 0
    while prefix < min(len(old), len(new)) and old[prefix] == new[prefix]:
        prefix += 1
    suffix = 0
    while (suffix < min(len(old), len(new)) - prefix
           and old[len(old) - 1 - suffix] == new[len(new) - 1 - suffix]):  # fmt: skip
        suffix += 1
    return prefix, len(new) - suffix


def replace_number(text: str, rng: random.Random, changed_only: bool = False) -> Defect | None:
    """``text`` with one of its numbers replaced by a different one; the span covers the whole
    new number, or with ``changed_only`` only its characters that differ from the old one (a
    replacement that only drops characters is drawn again: the span must mark something)."""
    found = numbers(text)
    if not found:
        return None
    match = rng.choice(found)
    old = match.group()
    new_value = wrong_number(old, rng)
    start, end = 0, len(new_value)
    if changed_only:
        start, end = changed_span(old, new_value)
        for _ in range(100):
            if end > start:
                break
            new_value = wrong_number(old, rng)
            start, end = changed_span(old, new_value)
        else:  # pragma: no cover - a bigger number always differs somewhere
            return None
    new = text[: match.start()] + new_value + text[match.end() :]
    return Defect(new, match.start() + start, match.start() + end)


def add_defect(text: str, kind: str, rng: random.Random,
               sentences: dict[str, tuple[str, ...]] | None = None,
               changed_only: bool = False) -> Defect | None:  # fmt: skip
    """``text`` with one defect of ``kind``; None when the kind does not apply (no number).

    Args:
        sentences: the sentences to draw from per kind (default: the v1 layout's fifteen).
        changed_only: a ``wrong_number`` span covers only the changed characters.
    """
    if kind == "wrong_number":
        return replace_number(text, rng, changed_only)
    sentence = rng.choice((sentences or SENTENCES)[kind])
    if kind == "unsafe":
        return insert_sentence(text, sentence, len(text))
    return insert_sentence(text, sentence, rng.choice(sentence_starts(text)))


# --- source pairs ----------------------------------------------------------------------------


def read_hh(path: Path) -> list[dict]:
    """HH-RLHF transcripts -> ``{"prompt": messages, "chosen": str, "rejected": str}``."""
    from treg_lightning.data.formats import normalize_row

    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for index, line in enumerate(f):
            try:
                example = normalize_row(json.loads(line))
            except Exception:  # noqa: BLE001 - rows the data module would skip
                continue
            rows.append({"id": f"hh-{index:04d}", "source": "hh-rlhf", **example})
    return rows


def read_demo() -> list[dict]:
    from treg_lightning.data.formats import normalize_row
    from treg_lightning.data.sources import load_source

    rows = []
    for index, row in enumerate(load_source("demo").rows):
        example = normalize_row(row)
        rows.append({"id": f"demo-{index:03d}", "source": "demo", **example})
    return rows


def usable(example: dict) -> bool:
    return (
        all(
            example[side]
            and len(example[side]) <= MAX_RESPONSE_CHARS
            and example[side].strip() == example[side]
            for side in ("chosen", "rejected")
        )
        and example["chosen"] != example["rejected"]
    )


def prompt_key(prompt: list[dict]) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


# --- the benchmark ---------------------------------------------------------------------------


def make_pair(example: dict, condition: str, kind: str, rng: random.Random) -> dict | None:
    base = example["chosen"] if condition == "minimal" else example["rejected"]
    defect = add_defect(base, kind, rng)
    if defect is None or defect.text == example["chosen"]:
        return None
    return {
        "id": f"{example['id']}-{condition}-{kind}",
        "prompt": example["prompt"],
        "chosen": [{"role": "assistant", "content": example["chosen"]}],
        "rejected": [{"role": "assistant", "content": defect.text}],
        "chosen_spans": [],
        "rejected_spans": [{"start": defect.start, "end": defect.end, "reward": REWARD}],
        "kind": kind,
        "condition": condition,
        "source": example["source"],
        "defect": defect.inserted,
    }


def build_pairs(examples: list[dict], seed: int) -> list[dict]:
    """One benchmark pair per usable source pair: condition alternates in a seeded order, the
    kind is drawn among those that apply (``wrong_number`` only where there is a number)."""
    rng = random.Random(seed)
    pairs = []
    for example in sorted(examples, key=lambda e: e["id"]):
        if not usable(example):
            continue
        condition = rng.choice(("minimal", "non_minimal"))
        base = example["chosen"] if condition == "minimal" else example["rejected"]
        kinds = [k for k in KINDS if k != "wrong_number" or numbers(base)]
        # Numbers are rare in HH-RLHF: take the number defect whenever there is one to change.
        kind = "wrong_number" if "wrong_number" in kinds and rng.random() < 0.8 else None
        kind = kind or rng.choice([k for k in kinds if k != "wrong_number"])
        pair = make_pair(example, condition, kind, rng)
        if pair is not None:
            pairs.append(pair)
    return pairs


def split_by_prompt(pairs: list[dict], seed: int, fraction: float = HELDOUT_FRACTION):
    """(train, heldout): every pair of a prompt on the same side, prompts drawn by ``seed``."""
    keys = sorted({prompt_key(p["prompt"]) for p in pairs})
    random.Random(seed + 1).shuffle(keys)
    heldout_keys = set(keys[: round(fraction * len(keys))])
    train = [p for p in pairs if prompt_key(p["prompt"]) not in heldout_keys]
    heldout = [p for p in pairs if prompt_key(p["prompt"]) in heldout_keys]
    return train, heldout


# --- the v2 layout: unseen sentences, balanced hosts, minimal twins ---------------------------


@dataclass(frozen=True)
class Layout:
    """The builder's options. ``v1`` is the earlier layout (its bytes must not change); ``v2``
    keeps held-out defects unseen and makes the defect the only consistent reason for a label.

    Attributes:
        name: ``"v1"`` or ``"v2"``.
        heldout_sentences: v2: share of each kind's sentences kept for held-out pairs (the
            rest are the training pairs' sentences; no sentence is on both sides).
        unseen_kind: v2: a kind that only held-out pairs carry (the unseen-kind probe); None
            for none.
    """

    name: str = "v1"
    heldout_sentences: float = 1 / 3
    unseen_kind: str | None = "irrelevant"

    def __post_init__(self) -> None:
        if self.name not in ("v1", "v2"):
            raise ValueError(f"layout must be 'v1' or 'v2', got {self.name!r}")
        if not 0 < self.heldout_sentences < 1:
            raise ValueError(f"heldout_sentences must be in (0, 1), got {self.heldout_sentences}")
        if self.unseen_kind is not None and self.unseen_kind not in KINDS:
            raise ValueError(
                f"unseen_kind must be one of {KINDS} or None, got {self.unseen_kind!r}"
            )

    def describe(self) -> dict:
        if self.name == "v1":
            return {"name": "v1"}
        return {"name": "v2", "heldout_sentences": round(self.heldout_sentences, 4),
                "unseen_kind": self.unseen_kind}  # fmt: skip


def sentence_pools(seed: int, heldout_share: float) -> dict[str, dict[str, tuple[str, ...]]]:
    """``{"train": {kind: sentences}, "heldout": {...}}``: each kind's thirty sentences
    (``credit_defects.ALL_SENTENCES``) cut in two disjoint parts, drawn by ``seed``."""
    pools: dict[str, dict[str, tuple[str, ...]]] = {"train": {}, "heldout": {}}
    rng = random.Random(seed + 2)
    for kind, sentences in sorted(ALL_SENTENCES.items()):
        order = list(sentences)
        rng.shuffle(order)
        cut = round(heldout_share * len(order))
        pools["heldout"][kind], pools["train"][kind] = tuple(order[:cut]), tuple(order[cut:])
    return pools


def twin_pairs(example: dict, kinds: list[str], sentences: dict, rng: random.Random) -> list[dict]:
    """The balanced non-minimal pair of one source pair and its minimal twin.

    The defect goes into either response at random (the *host*); the non-minimal pair keeps
    the other response, clean, as chosen, so the defect is the only reason for the label that
    holds across pairs; the twin has the clean host as chosen (rejected = chosen + defect, the
    ceiling control). Both share the rejected text and its span."""
    host = rng.choice(("chosen", "rejected"))
    other = "rejected" if host == "chosen" else "chosen"
    text = example[host]
    applicable = [k for k in kinds if k != "wrong_number" or numbers(text)]
    # Numbers are rare in HH-RLHF: take the number defect whenever there is one to change.
    kind = "wrong_number" if "wrong_number" in applicable and rng.random() < 0.8 else None
    kind = kind or rng.choice([k for k in applicable if k != "wrong_number"])
    defect = add_defect(text, kind, rng, sentences, changed_only=True)
    if defect is None or defect.text in (example["chosen"], example["rejected"]):
        return []
    pairs = []
    for condition, chosen in (("non_minimal", example[other]), ("minimal", text)):
        pairs.append({
            "id": f"{example['id']}-{condition}-{kind}", "prompt": example["prompt"],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": defect.text}],
            "chosen_spans": [],
            "rejected_spans": [{"start": defect.start, "end": defect.end, "reward": REWARD}],
            "kind": kind, "condition": condition, "host": host, "source": example["source"],
            "defect": defect.inserted,
        })  # fmt: skip
    return pairs


def build_v2(examples: list[dict], seed: int, layout: Layout) -> tuple[list[dict], list[dict]]:
    """(train, heldout) of the v2 layout: the source pairs split by prompt first, then each
    split's pairs drawn from its own sentences; the unseen kind only in the held-out split."""
    kept = sorted((e for e in examples if usable(e)), key=lambda e: e["id"])
    splits = dict(zip(("train", "heldout"), split_by_prompt(kept, seed), strict=True))
    pools = sentence_pools(seed, layout.heldout_sentences)
    kinds = {"train": [k for k in KINDS if k != layout.unseen_kind], "heldout": list(KINDS)}
    rng = random.Random(seed)
    out = {}
    for split, split_examples in splits.items():
        out[split] = [pair for example in split_examples
                      for pair in twin_pairs(example, kinds[split], pools[split], rng)]  # fmt: skip
    return out["train"], out["heldout"]


def dumps(rows: list[dict]) -> bytes:
    return "".join(
        json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows
    ).encode()


def build(out: Path, seed: int = 0, hh_path: Path | None = HH_RLHF, demo: bool = True,
          overwrite: bool = False, layout: Layout | None = None) -> dict:  # fmt: skip
    """Writes ``out/train.jsonl`` and ``out/heldout.jsonl``; returns the fingerprint record.

    ``layout`` None or ``Layout("v1")``: the earlier layout, byte for byte."""
    layout = layout or Layout("v1")
    examples = (read_hh(hh_path) if hh_path is not None else []) + (read_demo() if demo else [])
    if layout.name == "v1":
        train, heldout = split_by_prompt(build_pairs(examples, seed), seed)
    else:
        train, heldout = build_v2(examples, seed, layout)
    out.mkdir(parents=True, exist_ok=True)
    files = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl"}
    blobs = {"train": dumps(train), "heldout": dumps(heldout)}
    for split, path in files.items():
        if path.exists() and path.read_bytes() != blobs[split] and not overwrite:
            raise SystemExit(f"{path} exists with other content; pass --overwrite to replace it.")
        path.write_bytes(blobs[split])
    digest = hashlib.sha256(blobs["train"] + blobs["heldout"]).hexdigest()
    return {
        "seed": seed,
        "layout": layout.describe(),
        "sources": {"hh-rlhf": str(hh_path) if hh_path else None, "demo": demo},
        "sha256": {split: hashlib.sha256(b).hexdigest() for split, b in blobs.items()},
        "sha256_all": digest,
        "pairs": {"train": len(train), "heldout": len(heldout)},
        "stats": stats(train, heldout),
    }


def stats(train: list[dict], heldout: list[dict]) -> dict:
    counts = {}
    for split, rows in (("train", train), ("heldout", heldout)):
        counter = Counter((r["condition"], r["kind"]) for r in rows)
        counts[split] = {f"{c}/{k}": n for (c, k), n in sorted(counter.items())}
    rows = train + heldout

    def describe(values):
        values = sorted(values)
        return {"min": values[0], "median": statistics.median(values), "max": values[-1],
                "mean": round(statistics.fmean(values), 1)}  # fmt: skip

    extra = {}
    if any("host" in r for r in rows):  # v2: where the defect went, and the sentence check
        extra["hosts"] = {split: dict(sorted(Counter(r["host"] for r in rs
                                                     if r["condition"] == "non_minimal").items()))
                          for split, rs in (("train", train), ("heldout", heldout))}  # fmt: skip
        trained = {r["defect"] for r in train if r["kind"] != "wrong_number"}
        extra["heldout_defects_trained_on"] = sum(
            r["defect"] in trained for r in heldout if r["kind"] != "wrong_number"
        )
    return {
        **extra,
        "counts": counts,
        "sources": dict(Counter(r["source"] for r in rows)),
        "prompts": {
            s: len({prompt_key(r["prompt"]) for r in rs})
            for s, rs in (("train", train), ("heldout", heldout))
        },  # fmt: skip
        "chars": {
            "chosen": describe([len(r["chosen"][0]["content"]) for r in rows]),
            "rejected": describe([len(r["rejected"][0]["content"]) for r in rows]),
            "span": describe([s["end"] - s["start"] for r in rows for s in r["rejected_spans"]]),
        },
    }


def token_labels(tokenizer, text: str, spans: list[dict], eos: bool = True) -> list[int]:
    """1 for each response token whose characters overlap a span, else 0; one entry per token of
    ``tokenizer(text, add_special_tokens=False)`` (the ids the data module trains on) plus the
    end-of-turn token (0) when ``eos``. A token half inside a span counts as inside."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        int(any(start < span["end"] and end > span["start"] for span in spans))
        for start, end in encoded["offset_mapping"]
    ]
    return labels + [0] if eos else labels


def datasheet(record: dict) -> str:
    st = record["stats"]
    kinds = [f"{c}/{k}" for c in ("minimal", "non_minimal") for k in KINDS]
    lines = [
        "# Credit benchmark: datasheet",
        "",
        "Written by `bench/credit_data.py` (do not edit by hand). Preference pairs whose rejected",
        "response carries one known defect span (`rejected_spans`, character offsets into the",
        "rejected response, reward -0.5); `chosen_spans` is empty.",
        "",
        f"- seed {record['seed']}; sha256 of train+heldout: `{record['sha256_all']}`",
        f"- pairs: {record['pairs']['train']} train, {record['pairs']['heldout']} held out; "
        f"prompts: {st['prompts']['train']} train, {st['prompts']['heldout']} held out "
        "(split by prompt: none in both)",
        f"- sources: {st['sources']}",
        f"- responses longer than {MAX_RESPONSE_CHARS} characters are left out",
        "",
        "| condition/kind | train | held out |",
        "|---|---:|---:|",
    ]
    for key in kinds:
        lines.append(f"| {key} | {st['counts']['train'].get(key, 0)} | "
                     f"{st['counts']['heldout'].get(key, 0)} |")  # fmt: skip
    lines += ["", "| characters | min | median | mean | max |", "|---|---:|---:|---:|---:|"]
    for name, d in st["chars"].items():
        lines.append(f"| {name} | {d['min']} | {d['median']} | {d['mean']} | {d['max']} |")
    lines += [
        "",
        "## Kinds and conditions",
        "",
        "- `insult`: a dismissive remark inserted before a sentence of the response; "
        "`irrelevant`: an off-topic sentence inserted the same way; `unsafe`: an unsafe "
        "instruction appended; `wrong_number`: one number of the response replaced by a "
        "different one (span = the new number; chosen for 80% of the responses that have a "
        "number, so this kind is rarer: HH-RLHF answers seldom contain numbers).",
        "- `minimal`: rejected = chosen + defect (the two differ only in the span); "
        "`non_minimal`: chosen and rejected are the source pair's two responses, the defect "
        "inserted into the rejected one (the responses differ everywhere).",
        "",
        *v2_notes(record),
        "## Licence",
        "",
        "- HH-RLHF (Anthropic, `hh-rlhf` harmless-base test split): MIT licence. The texts are",
        "  read from `../shared/data/` at build time; the built files are not redistributed here.",
        "  HH-RLHF contains offensive and harmful content by design (red-teaming transcripts).",
        "- The embedded demo set and the defect texts (`bench/credit_defects.py`): written for",
        "  this project, Apache-2.0.",
        "",
        f"Rebuild: `python bench/credit_data.py --seed {record['seed']}{layout_flags(record)} "
        "--datasheet <this folder>`.",
    ]
    return "\n".join(lines) + "\n"


def layout_flags(record: dict) -> str:
    """The builder flags that rebuild ``record``'s layout (nothing for v1, the default)."""
    layout = record.get("layout", {"name": "v1"})
    if layout["name"] == "v1":
        return ""
    return (f" --layout v2 --unseen-kind {layout['unseen_kind'] or 'none'} "
            f"--heldout-sentences {layout['heldout_sentences']}")  # fmt: skip


def v2_notes(record: dict) -> list[str]:
    """The datasheet's paragraph on the v2 layout (nothing for v1)."""
    layout, st = record.get("layout", {"name": "v1"}), record["stats"]
    if layout["name"] != "v2":
        return []
    share = layout["heldout_sentences"]
    return [
        "## Layout v2 (what differs from the list above)",
        "",
        f"- Sentence-disjoint: each kind's 30 sentences (`credit_defects.ALL_SENTENCES`) are cut "
        f"in two by the seed, {share:.0%} for held-out pairs and the rest for training pairs; "
        f"held-out defect sentences that also occur in a training pair: "
        f"{st['heldout_defects_trained_on']}.",
        f"- Unseen kind: `{layout['unseen_kind']}` occurs in held-out pairs only."
        if layout["unseen_kind"]
        else "- No unseen kind: every kind occurs in both splits.",
        "- Balanced hosts: the defect goes into either response of the source pair at random "
        "(`host`), the other response stays clean as chosen (`non_minimal`); hosts "
        f"(chosen/rejected of the source pair): train {st['hosts']['train']}, held out "
        f"{st['hosts']['heldout']}. Every non-minimal pair has a `minimal` twin (same id stem, "
        "same rejected text and span, the clean host as chosen): the ceiling control.",
        "- `wrong_number` spans cover only the characters that changed (`1.4 -> 1.6` marks the "
        "`6`).",
        "",
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/credit"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hh", type=Path, default=HH_RLHF, help="HH-RLHF .jsonl.gz")
    parser.add_argument("--no-hh", action="store_true", help="the demo set only")
    parser.add_argument("--datasheet", type=Path, default=None,
                        help="folder for DATASHEET.md and fingerprint.json")  # fmt: skip
    parser.add_argument("--layout", choices=("v1", "v2"), default="v1",
                        help="v1: the earlier layout (shared sentences, defect always in the "
                        "source's rejected response, whole-number spans); v2: sentence-disjoint "
                        "splits, an unseen kind, balanced hosts with minimal twins, "
                        "changed-character number spans")  # fmt: skip
    parser.add_argument(
        "--unseen-kind",
        default="irrelevant",
        choices=(*KINDS, "none"),
        help="v2: the kind only held-out pairs carry ('none': every kind in both)",
    )
    parser.add_argument(
        "--heldout-sentences",
        type=float,
        default=1 / 3,
        help="v2: share of each kind's sentences kept for held-out pairs",
    )
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    hh = None if args.no_hh else args.hh
    if hh is not None and not hh.exists():
        raise SystemExit(f"{hh} not found: pass --hh, or --no-hh for the demo set only.")
    if not 0 < args.heldout_sentences < 1:
        parser.error(f"--heldout-sentences must be between 0 and 1, got {args.heldout_sentences}")
    unseen = None if args.unseen_kind == "none" else args.unseen_kind
    layout = Layout(args.layout, args.heldout_sentences, unseen)
    record = build(args.out, args.seed, hh, overwrite=args.overwrite, layout=layout)
    (args.out / "fingerprint.json").write_text(json.dumps(record, indent=1) + "\n")
    if args.datasheet is not None:
        args.datasheet.mkdir(parents=True, exist_ok=True)
        (args.datasheet / "DATASHEET.md").write_text(datasheet(record))
        (args.datasheet / "fingerprint.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("pairs", "sha256_all")}))
    return record


if __name__ == "__main__":
    main()
