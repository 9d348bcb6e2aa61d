"""The resumable, distributed build of a token-reward cache: chunk files, rank split, merge.

Rows are cut into chunks of ``chunk_pairs`` consecutive pairs; chunk ``c`` is scored by rank
``c % world_size`` and written to ``work_dir/chunk-{c:06d}.safetensors`` with a key (a digest of
its rows and of the build's fingerprint) in its metadata. A rerun skips every chunk whose file
holds the right key, so a killed build continues where it stopped, and a leftover chunk of other
inputs is scored again. Rank 0 merges all chunks into one Arrow dataset after a barrier.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from treg_lightning.outputs import disk_full_hint
from treg_lightning.pairs import ID_FIELDS
from treg_lightning.rewards.cache.fingerprint import rows_digest

Rows = Sequence[Mapping[str, Any]]
# Per-token value columns of some rows: {"chosen_token_rewards": [one array per row], ...}.
Columns = dict[str, list[np.ndarray]]


def distributed(
    rank: int | None = None, world_size: int | None = None
) -> tuple[int, int, Callable[[], None]]:
    """``(rank, world_size, barrier)``: torch.distributed's when it is initialized, else
    ``(0, 1, no-op)``; explicit ``rank`` / ``world_size`` override (tests, custom launchers)."""
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
    world_size = (
        world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
    )
    if world_size > 1 and not initialized:
        raise RuntimeError(
            f"world_size={world_size} needs torch.distributed initialized (Fabric/Trainer or "
            "init_process_group) so rank 0 can wait for the other ranks before merging."
        )
    return rank, world_size, (dist.barrier if initialized else lambda: None)


def my_chunks(num_rows: int, chunk_pairs: int, rank: int, world_size: int) -> list[int]:
    """The chunk numbers rank ``rank`` of ``world_size`` scores: ``c % world_size == rank``."""
    return list(range(rank, -(-num_rows // chunk_pairs), world_size))


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
    rank, world_size, barrier = distributed(rank, world_size)
    rows = rows if isinstance(rows, list) else list(rows)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    def chunk_rows(c: int) -> list:
        return rows[c * chunk_pairs : (c + 1) * chunk_pairs]

    todo = [
        c
        for c in my_chunks(len(rows), chunk_pairs, rank, world_size)
        if not _chunk_done(work_dir / _chunk_name(c), rows_digest(chunk_rows(c), salt))
    ]
    if on_start is not None:
        on_start(sum(len(chunk_rows(c)) for c in todo))
    for c in todo:
        columns = score_chunk(chunk_rows(c))
        _write_chunk(work_dir / _chunk_name(c), columns, rows_digest(chunk_rows(c), salt))
        if on_chunk_done is not None:
            on_chunk_done(c)
    barrier()
    return merge_chunks(rows, work_dir, chunk_pairs) if rank == 0 else None


def merge_chunks(rows: Rows, work_dir: str | Path, chunk_pairs: int) -> datasets.Dataset:
    """The dataset of ``rows`` with the value columns of all chunk files (raises if one is
    missing). Columns: ``index``, the id lists and the per-token values (float32)."""
    work_dir = Path(work_dir)
    values: dict[str, list[np.ndarray]] = {}
    for c in range(-(-len(rows) // chunk_pairs)):
        path = work_dir / _chunk_name(c)
        if not path.is_file():
            raise FileNotFoundError(f"Annotation chunk {path} is missing; rerun annotate.")
        chunk = _read_chunk(path)
        if values and set(chunk) != set(values):
            raise ValueError(
                f"Annotation chunk {path} holds {sorted(chunk)}, not {sorted(values)}."
            )
        for name, arrays in chunk.items():
            values.setdefault(name, []).extend(arrays)
    table = {
        "index": pa.array([r.get("index", i) for i, r in enumerate(rows)], pa.int64()),
        **{k: _list_array([r[k] for r in rows], np.int32) for k in ID_FIELDS},
        **{k: _list_array(v, np.float32) for k, v in sorted(values.items())},
    }
    return datasets.Dataset(pa.table(table))


def _chunk_name(c: int) -> str:
    return f"chunk-{c:06d}.safetensors"


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
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    advice = "free space or point cache_dir elsewhere; finished chunks are kept"
    try:
        with disk_full_hint(path, advice):
            save_file(tensors, str(tmp), metadata={"key": key})
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a partial chunk (disk full, error) is never left behind


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
