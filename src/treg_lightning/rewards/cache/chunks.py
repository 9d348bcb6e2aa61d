"""The resumable, distributed build of a token-reward cache: one pass of
:mod:`treg_lightning.passes` whose parts are chunk files.

Rows are cut into chunks of ``chunk_pairs`` consecutive pairs; chunk ``c`` is scored by rank
``c % world_size`` and written to ``work_dir/chunk-{c:06d}.safetensors`` with a key (a digest of
its rows and of the build's fingerprint) in its metadata. A rerun skips every chunk whose file
holds the right key, so a killed build continues where it stopped, and a leftover chunk of other
inputs is scored again. Rank 0 merges all chunks into one Arrow dataset once every rank is
through; a rank that raises stops every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from treg_lightning.outputs import disk_full_hint
from treg_lightning.pairs import ID_FIELDS
from treg_lightning.passes import Parts, ShardPlan, atomic_path, distributed, foreign_part
from treg_lightning.rewards.cache.fingerprint import rows_digest

Rows = Sequence[Mapping[str, Any]]
# Per-token value columns of some rows: {"chosen_token_rewards": [one array per row], ...}.
Columns = dict[str, list[np.ndarray]]


def chunk_parts(work_dir: str | Path) -> Parts:
    return Parts(Path(work_dir), "chunk-{:06d}.safetensors")


def build_in_chunks(
    rows: Rows,
    work_dir: str | Path,
    score_chunk: Callable[[list[Mapping[str, Any]]], Columns],
    chunk_pairs: int = 32,
    salt: str = "",
    rank: int | None = None,
    world_size: int | None = None,
    on_start: Callable[[int], None] | None = None,
    on_chunk_done: Callable[[int], None] | None = None,
) -> datasets.Dataset | None:
    """Score this rank's unfinished chunks, then (rank 0) merge all chunks into a dataset.

    Args:
        rows: tokenized pairs (``index``, ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ...).
        work_dir: folder of the chunk files.
        score_chunk: per-token value columns of a list of rows.
        chunk_pairs: pairs per chunk (one file each, the unit of resumption).
        salt: mixed into every chunk key (the build's fingerprint digest): chunk files of a
            build with other inputs are never taken for finished.
        rank, world_size: default to torch.distributed's when initialized, else 0 and 1.
        on_start: called once with the number of pairs this rank still has to score.
        on_chunk_done: called with the chunk number after each chunk file is written.

    Returns:
        On rank 0 the merged dataset; None on other ranks.
    """
    if chunk_pairs < 1:
        raise ValueError(f"chunk_pairs must be >= 1, got {chunk_pairs}.")
    ranks = distributed(rank, world_size)
    rows = rows if isinstance(rows, list) else list(rows)
    plan, parts = ShardPlan(len(rows), chunk_pairs), chunk_parts(work_dir)
    parts.folder.mkdir(parents=True, exist_ok=True)

    def key(c: int) -> str:
        return rows_digest(rows[plan.slice(c)], salt)

    with ranks.step("annotate-chunks"):
        todo = parts.todo(plan, ranks, lambda c: _chunk_done(parts.path(c), key(c)))
        if on_start is not None:
            on_start(sum(plan.size(c) for c in todo))
        for c in todo:
            _write_chunk(parts.path(c), score_chunk(rows[plan.slice(c)]), key(c))
            if on_chunk_done is not None:
                on_chunk_done(c)
    return ranks.on_rank_zero("annotate-merge", lambda: merge_chunks(rows, work_dir, chunk_pairs))


def merge_chunks(rows: Rows, work_dir: str | Path, chunk_pairs: int) -> datasets.Dataset:
    """The dataset of ``rows`` with the value columns of all chunk files (raises if one is
    missing). Columns: ``index``, the id lists and the per-token values (float32)."""
    plan, parts = ShardPlan(len(rows), chunk_pairs), chunk_parts(work_dir)
    values: dict[str, list[np.ndarray]] = {}
    for c in range(plan.count):
        chunk = parts.read(c, _read_chunk)
        if values and set(chunk) != set(values):
            raise foreign_part(parts.path(c), f"the columns {sorted(chunk)}, not {sorted(values)}")
        for name, arrays in chunk.items():
            values.setdefault(name, []).extend(arrays)
    table = {
        "index": pa.array([r.get("index", i) for i, r in enumerate(rows)], pa.int64()),
        **{k: _list_array([r[k] for r in rows], np.int32) for k in ID_FIELDS},
        **{k: _list_array(v, np.float32) for k, v in sorted(values.items())},
    }
    return datasets.Dataset(pa.table(table))


def _chunk_done(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.metadata().get("key") == key
    except Exception:  # noqa: BLE001 -- an unreadable chunk is simply redone
        return False


def _write_chunk(path: Path, columns: Columns, key: str) -> None:
    """One safetensors file: per column the concatenated values and the per-row lengths."""
    tensors = {}
    for name, arrays in columns.items():
        tensors[f"{name}.values"] = np.concatenate(arrays).astype(np.float32)
        tensors[f"{name}.lengths"] = np.array([len(a) for a in arrays], np.int64)
    advice = "free space or point cache_dir elsewhere; finished chunks are kept"
    with disk_full_hint(path, advice), atomic_path(path) as tmp:  # never a partial chunk
        save_file(tensors, str(tmp), metadata={"key": key})


def _read_chunk(path: Path) -> Columns:
    tensors = load_file(str(path))
    columns = {}
    for name in {k.rsplit(".", 1)[0] for k in tensors}:
        splits = np.cumsum(tensors[f"{name}.lengths"])[:-1]
        columns[name] = np.split(tensors[f"{name}.values"], splits)
    return columns


def _list_array(arrays: Sequence[Sequence], dtype) -> pa.ListArray:
    lengths = np.array([len(a) for a in arrays], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate([np.asarray(a, dtype) for a in arrays]) if len(arrays) else []
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.asarray(values, dtype)))
