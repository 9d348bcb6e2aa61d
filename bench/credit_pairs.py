"""The pairs of a credit run (``bench/credit.py``): which built pairs are trained and scored,
and the checks on an external held-out file.

Built pairs (``bench/credit_data.py --layout v2``): the training pairs are balanced non-minimal
pairs (the minimal twins of the same pairs train the ceiling control), the held-out pairs are
balanced non-minimal pairs with sentences never trained on, the kinds taken in turn so that
each kind (the unseen one too) has its share. Only pairs whose prompt and responses fit
``max_length`` untruncated are used, so every defect span is trained and scored whole.

An external held-out file is JSONL in the span format of ``SpanRewards`` (the rows the builder
writes): ``prompt``, ``chosen``, ``rejected`` in any layout ``treg`` reads, ``rejected_spans``
with at least one span of negative reward (its tokens are the defect), optionally ``id`` and
``kind``. Every row is checked before anything trains.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import credit_data
from treg_lightning.data.errors import DataFormatError
from treg_lightning.errors import MissingFileError
from treg_lightning.pairs import SIDES
from treg_lightning.rewards.spans import SpanAnnotationError, SpanRewards

ORDER_SEED = 1234  # the fixed order the pairs are taken in (not a training seed)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def pair_tokenizer(size, tokenizer):
    from treg_lightning.data.tokenize import PairTokenizer

    return PairTokenizer(tokenizer, size.max_length, size.max_prompt_length)


def token_counts(tokenize, row: dict) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) token counts, untruncated (responses with end-of-turn)."""
    prompt = row["prompt"] if isinstance(row["prompt"], list) else [
        {"role": "user", "content": row["prompt"]}]  # fmt: skip
    sides = [row[s][0]["content"] if isinstance(row[s], list) else row[s]
             for s in ("chosen", "rejected")]  # fmt: skip
    return (len(tokenize.prompt_ids(prompt)), *(len(tokenize.response_ids(t)) for t in sides))


def fits(tokenize, row: dict, size) -> bool:
    prompt, chosen, rejected = token_counts(tokenize, row)
    return prompt <= size.max_prompt_length and max(chosen, rejected) <= size.max_length - prompt


def in_turn(rows: list[dict], n: int) -> list[dict]:
    """Up to ``n`` rows, one kind after the other (kinds in ``credit_data.KINDS`` order, each
    kind's rows in a fixed shuffled order); a kind that runs out leaves its turn to the rest."""
    rows = list(rows)
    random.Random(ORDER_SEED).shuffle(rows)
    queues = [[r for r in rows if r["kind"] == kind] for kind in credit_data.KINDS]
    out = []
    while len(out) < n and any(queues):
        for queue in queues:
            if queue and len(out) < n:
                out.append(queue.pop(0))
    return out


def select_pairs(size, data_dir: Path, work: Path, tokenizer) -> dict[str, Path]:
    """``{"train", "train_minimal", "heldout"}`` -> files under ``work/pairs``: the training
    pairs, their minimal twins in the same order, and the held-out pairs."""
    tokenize = pair_tokenizer(size, tokenizer)
    rows = {split: read_rows(data_dir / f"{split}.jsonl") for split in ("train", "heldout")}
    twins = {r["id"].replace("-minimal-", "-non_minimal-"): r for r in rows["train"]
             if r["condition"] == "minimal"}  # fmt: skip
    train = in_turn([r for r in rows["train"] if r["condition"] == "non_minimal"
                     and fits(tokenize, r, size) and fits(tokenize, twins[r["id"]], size)],
                    size.train_pairs)  # fmt: skip
    heldout = in_turn([r for r in rows["heldout"] if r["condition"] == "non_minimal"
                       and fits(tokenize, r, size)], size.heldout_pairs)  # fmt: skip
    for name, got, wanted in (("train", train, size.train_pairs),
                              ("held-out", heldout, size.heldout_pairs)):  # fmt: skip
        if len(got) < wanted:
            raise DataFormatError(
                f"only {len(got)} {name} pairs of {data_dir} fit max_length {size.max_length} "
                f"untruncated, {wanted} wanted",
                hint="raise --max-length, or ask for fewer pairs",
            )
    files = {"train": train, "train_minimal": [twins[r["id"]] for r in train], "heldout": heldout}
    out = {}
    for name, chosen in files.items():
        out[name] = work / "pairs" / f"{name}.jsonl"
        out[name].parent.mkdir(parents=True, exist_ok=True)
        out[name].write_bytes(credit_data.dumps(chosen))
    return out


def external_heldout(path: Path, size, tokenizer, work: Path) -> Path:
    """Checks every row of a span-annotated held-out file (see the module docstring) and
    writes a copy with ``id`` and ``kind`` filled in to ``work/pairs/heldout-external.jsonl``.

    Raises:
        MissingFileError: no such file.
        DataFormatError: a row that cannot be read, has no defect span, has spans that do not
            fit its text, or does not fit ``max_length`` untruncated (the message names the
            file, row and field).
    """
    if not path.is_file():
        raise MissingFileError(f"--heldout {path}: no such file (a JSONL of span-annotated "
                               "pairs, the format bench/credit_data.py writes).")  # fmt: skip
    from treg_lightning.data.datamodule import PreferenceDataModule
    from treg_lightning.data.sources import load_source

    data = PreferenceDataModule(str(path), tokenizer=size.model, max_length=size.max_length,
                                max_prompt_length=size.max_prompt_length, rewards=None,
                                skip_invalid_rows=False)  # fmt: skip
    rows = data.tokenized_rows()["train"]
    tokenize = pair_tokenizer(size, tokenizer)
    raw = load_source(str(path))
    spans = SpanRewards()
    copies = []
    for row in rows:
        where = {"file": str(path), "row": row["index"], "line": raw.line_of(row["index"])}
        negative = [s for s in row.get("rejected_spans") or []
                    if isinstance(s, dict) and isinstance(s.get("reward"), (int, float))
                    and s["reward"] < 0]  # fmt: skip
        if not negative:
            raise DataFormatError(
                "no defect span: the credit metrics need the defect's characters in the "
                "rejected response", field="rejected_spans", **where,
                hint='add e.g. "rejected_spans": [{"start": 10, "end": 42, "reward": -0.5}] '
                "(character offsets into the rejected text, surrounding whitespace stripped)",
            )  # fmt: skip
        counts = (len(tokenize.prompt_ids(row["prompt"])),
                  *(len(tokenize.response_ids(row[side])) for side in SIDES))  # fmt: skip
        if counts[0] > size.max_prompt_length or max(counts[1:]) > size.max_length - counts[0]:
            raise DataFormatError(
                f"does not fit untruncated: prompt {counts[0]} tokens (max "
                f"{size.max_prompt_length}), chosen {counts[1]} and rejected {counts[2]} "
                f"tokens (room {size.max_length - min(counts[0], size.max_prompt_length)})",
                field="rejected", **where,
                hint="pass a larger --max-length (and --max-prompt-length), or shorten the row",
            )  # fmt: skip
        try:
            marks = spans.response_marks(row, "rejected", tokenizer)
        except SpanAnnotationError as error:
            problem = str(error).split(". Fix the annotation")[0]
            raise DataFormatError(problem, field="rejected_spans", **where,
                                  hint="fix the span offsets") from None  # fmt: skip
        if not (marks < 0).any():
            raise DataFormatError("the negative spans cover no token of the rejected response",
                                  field="rejected_spans", **where,
                                  hint="widen the span over the defect's characters")  # fmt: skip
        source = raw.rows[row["index"]]
        copies.append({**source, "id": str(source.get("id", f"row-{row['index']}")),
                       "kind": str(source.get("kind", "unknown")),
                       "condition": "non_minimal"})  # fmt: skip
    out = work / "pairs" / "heldout-external.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(credit_data.dumps(copies))
    return out
