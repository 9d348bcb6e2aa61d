"""Where each split's pairs come from, and the checks that keep evaluation honest.

- :func:`plan_splits`: the (source, split) of ``train``, ``val`` and ``test`` from the data
  settings, with the settings' own words for messages (``data.val_split 'test' of data.source
  'pairs.jsonl'``).
- :func:`check_overlaps`: validation or test pairs that are also training pairs (or test pairs
  that are validation pairs) are refused, naming both settings and the count, unless
  ``allow_overlap`` is set (then a loud warning). Pairs are compared by a digest of their
  normalized prompt, chosen and rejected, so a copy of the training file under another name, in
  another format, or read through another split of a source that has none (a single file) is
  found as well. Duplicates inside one split are counted for the report, not refused.
- :func:`with_copies`: a ``val_fraction`` hold-out keeps every copy of a pair on the same side.
- :func:`require_split`: ``validate`` / ``test`` with no such data configured is an error.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from treg_lightning.data.errors import DataFormatError
from treg_lightning.data.sources import DEMO_SOURCE, RawSource, load_source
from treg_lightning.errors import ConfigError

LABELS = {"train": "training", "val": "validation", "test": "test"}
# Split pairs checked for shared pairs: (reference, checked).
_COMPARED = (("train", "val"), ("train", "test"), ("val", "test"))


@dataclass(frozen=True)
class SplitSource:
    """The rows of one split: ``source`` read at ``split``.

    Attributes:
        source: the source string (file, folder, hub id, "demo").
        split: the split read from it (ignored by single files and saved Datasets).
        settings: the settings that chose these rows, as the user wrote them.
        held_out: the rows are the ``val_fraction`` hold-out of the training source.
    """

    source: str
    split: str
    settings: str
    held_out: bool = False


def plan_splits(
    source: str,
    split: str,
    val_source: str | None,
    val_split: str | None,
    val_fraction: float,
    test_source: str | None,
    test_split: str | None,
) -> dict[str, SplitSource]:
    """``{"train": ..., "val": ..., "test": ...}`` for the splits the settings configure."""
    plan = {"train": SplitSource(source, split, f"data.source {source!r}")}
    for name, other_source, other_split in (
        ("val", val_source, val_split),
        ("test", test_source, test_split),
    ):
        if other_source is None and other_split is None:
            continue
        if other_source is None:
            settings = f"data.{name}_split {other_split!r} of data.source {source!r}"
        else:
            settings = f"data.{name}_source {other_source!r}"
            if other_split is not None:
                settings += f" (data.{name}_split {other_split!r})"
        plan[name] = SplitSource(other_source or source, other_split or split, settings)
    if "val" not in plan and val_fraction > 0:
        settings = f"data.val_fraction {val_fraction} of data.source {source!r}"
        plan["val"] = SplitSource(source, split, settings, held_out=True)
    return {name: plan[name] for name in LABELS if name in plan}


def load_split(split: str, where: SplitSource, limit: int | None) -> RawSource:
    """The raw rows of one split; an empty source is an error naming the setting."""
    raw = load_source(where.source, where.split, limit)
    if not raw.rows:
        raise DataFormatError(
            f"the file (or split) holds no rows, so there are no {LABELS[split]} pairs "
            f"({where.settings})",
            file=raw.name,
            hint="Point that setting at a file (or split) of preference pairs.",
        )
    if limit is not None and len(raw.rows) < limit:
        rank_zero_info(f"data.limit {limit}: {raw.name} has only {len(raw.rows)} rows.")
    return raw


def hold_out(train: RawSource, fraction: float, seed: int) -> tuple[RawSource, RawSource]:
    """``(training rows, validation rows)``: ``fraction`` of ``train``'s rows held out.

    Chosen among the source rows by ``seed`` alone, so the split does not move when skip
    settings or lengths change; every copy of a held-out pair is held out with it.

    Raises:
        ConfigError: nothing would be left to train on.
    """
    num_rows = len(train.rows)
    generator = torch.Generator().manual_seed(seed)
    count = max(1, math.ceil(num_rows * fraction))
    held = with_copies(
        train.rows, set(torch.randperm(num_rows, generator=generator)[:count].tolist())
    )
    if len(held) == num_rows:
        raise ConfigError(
            f"data.val_fraction {fraction} holds out {len(held)} of the {num_rows} rows of "
            f"{train.name}, which leaves no training pair: use more rows, a smaller "
            "val_fraction, or a validation file of its own (data.val_source)."
        )
    kept = [i for i in range(num_rows) if i not in held]
    return train.subset(kept), train.subset(sorted(held))


def duplicates_note(repeats: list[int]) -> str:
    """The report's note on pairs repeated inside a split ("" when none)."""
    if not repeats:
        return ""
    shown = ", ".join(map(str, repeats[:3])) + (", ..." if len(repeats) > 3 else "")
    return (
        f"; {len(repeats)} duplicate pairs (rows {shown} repeat an earlier row's prompt, chosen "
        "and rejected; each copy is used)"
    )


def require_split(plan: dict[str, SplitSource], split: str, command: str) -> None:
    """Raise :class:`ConfigError` when ``command`` needs ``split`` and none is configured."""
    if split in plan:
        return
    if split == "val":
        how = (
            "data.val_source (a file, folder or hub id), data.val_split (another split of "
            "data.source) or data.val_fraction (hold out part of data.source)"
        )
    else:
        how = (
            "data.test_source (a file, folder or hub id) or data.test_split (another split of "
            "data.source, e.g. test)"
        )
    raise ConfigError(f"{command} needs {LABELS[split]} pairs, but none are configured: set {how}.")


def rows_identity(source: str, split: str) -> tuple:
    """What decides the rows read: a file's (or plain saved Dataset's) real path alone, since
    those have no splits; the real path or hub id plus the split otherwise. Two spellings of one
    path (relative and absolute, through a symlink, with ``~``) give the same identity."""
    if source == DEMO_SOURCE:
        return ("file", DEMO_SOURCE)
    path = Path(source).expanduser()
    if path.is_file():
        return ("file", str(path.resolve()))
    if path.is_dir():
        resolved = str(path.resolve())
        if (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
            return ("file", resolved)
        return ("split", resolved, split)
    return ("split", source, split)


def pair_digest(example: dict) -> str:
    """Digest of a normalized pair's prompt messages, chosen and rejected text."""
    content = [example["prompt"], example["chosen"], example["rejected"]]
    text = json.dumps(content, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def digests_of(examples: list[dict]) -> tuple[dict[str, int], list[int]]:
    """``({digest: source row of its first copy}, [source rows repeating an earlier pair])``."""
    first: dict[str, int] = {}
    repeats = []
    for example in examples:
        digest = pair_digest(example)
        if digest in first:
            repeats.append(example["index"])
        else:
            first[digest] = example["index"]
    return first, repeats


def check_overlaps(
    examples: dict[str, list[dict]], plan: dict[str, SplitSource], allow_overlap: bool
) -> dict[str, list[int]]:
    """Refuse (or, with ``allow_overlap``, warn about) pairs shared between splits.

    Args:
        examples: normalized examples per split (each with its source ``index``).
        plan: where each split comes from (:func:`plan_splits`).
        allow_overlap: warn with the count instead of raising.

    Returns:
        ``{split: source rows that repeat an earlier pair of the same split}``, for the report.

    Raises:
        ConfigError: a validation or test pair is also a training (or validation) pair.
    """
    found = {split: digests_of(rows) for split, rows in examples.items()}
    for reference, checked in _COMPARED:
        if reference not in found or checked not in found:
            continue
        first = found[reference][0]
        shared = [
            (e["index"], first[d]) for e in examples[checked] if (d := pair_digest(e)) in first
        ]
        if not shared:
            continue
        message = _overlap_message(
            reference, plan[reference], checked, plan[checked], shared, len(examples[checked])
        )
        if not allow_overlap:
            raise ConfigError(f"{message} {_advice(plan[reference], plan[checked], checked)}")
        rank_zero_warn(f"data.allow_overlap is true: {message}")
    return {split: repeats for split, (_, repeats) in found.items()}


def _overlap_message(
    reference: str,
    reference_source: SplitSource,
    checked: str,
    checked_source: SplitSource,
    shared: list[tuple[int, int]],
    total: int,
) -> str:
    label, reference_label = LABELS[checked], LABELS[reference]
    count = f"{len(shared)} of {total} {label} pairs"
    reason = _same_rows_reason(reference_source, checked_source)
    if reason is not None:
        return (
            f"the {label} data ({checked_source.settings}) reads the same rows as the "
            f"{reference_label} data ({reference_source.settings}): {reason}; {count} are "
            f"{reference_label} pairs, so {checked}/* would measure the {reference_label} rows."
        )
    row, reference_row = shared[0]
    return (
        f"{count} ({checked_source.settings}) are also {reference_label} pairs "
        f"({reference_source.settings}): same prompt, chosen and rejected (e.g. {label} row "
        f"{row} = {reference_label} row {reference_row}), so {checked}/* would partly measure "
        f"the {reference_label} rows."
    )


def _same_rows_reason(first: SplitSource, second: SplitSource) -> str | None:
    if first.held_out or second.held_out:
        return None
    identity = rows_identity(first.source, first.split)
    if identity != rows_identity(second.source, second.split):
        return None
    if identity[0] == "split":
        return f"both read split {first.split!r} of {first.source!r}"
    name = DEMO_SOURCE if identity[1] == DEMO_SOURCE else Path(identity[1]).name
    if first.split != second.split:
        return (
            f"{name} is a single file (or saved Dataset) without splits, so data.split and the "
            "split settings all read the whole of it"
        )
    return f"both read {name}"


def _advice(reference: SplitSource, checked: SplitSource, split: str) -> str:
    same = rows_identity(reference.source, reference.split) == rows_identity(
        checked.source, checked.split
    )
    if checked.held_out:
        what = "Remove the duplicate rows from the file"
    elif same:
        what = f"Evaluate on other rows: give them a file of their own (data.{split}_source)"
        if split == "val":
            what += ", or hold some out of data.source with data.val_fraction"
    else:
        what = "Remove the shared pairs from one of the two sources"
    return f"{what}; or set data.allow_overlap: true to run anyway."


def with_copies(rows: list[dict], held_out: set[int]) -> set[int]:
    """``held_out`` plus every row holding the same prompt, chosen and rejected as a held-out
    row, so a duplicated pair is never both trained on and validated on."""
    keys = [_raw_key(row) for row in rows]
    held_keys = {keys[i] for i in held_out}
    return {i for i, key in enumerate(keys) if key in held_keys}


def _raw_key(row: dict) -> str:
    values = [row.get("prompt"), row.get("chosen"), row.get("rejected")]
    return json.dumps(values, ensure_ascii=False, sort_keys=True, default=str)
