"""Storage of a token-reward cache: the folder layout, reuse when the fingerprint matches,
refusal with the reason when it does not, atomic saving. See docs/cache-format.md."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import datasets

from treg_lightning.errors import UserError
from treg_lightning.outputs import disk_full_hint
from treg_lightning.pairs import ID_FIELDS
from treg_lightning.passes import Ranks, atomic_path, distributed, write_json
from treg_lightning.rewards.cache.checksum import table_checksum
from treg_lightning.rewards.cache.chunks import Columns, build_in_chunks
from treg_lightning.rewards.cache.fingerprint import FORMAT, FORMAT_VERSION, Fingerprint

log = logging.getLogger(__name__)


class CacheError(UserError, RuntimeError):
    """A token-reward cache exists but cannot be used (the message says why and what to do)."""


@contextlib.contextmanager
def build_lock(cache_dir: Path, hold: bool = True):
    """An exclusive ``flock`` on the folder ``cache_dir`` (created if missing) while the block
    runs: a second process building or loading the same cache waits until the first is done,
    then finds the finished cache. The lock is on the folder itself, so no file is added to it;
    the kernel releases it when the process ends, however it ends. ``hold=False``: no lock
    (the other ranks of one job, which rank 0 holds it for)."""
    if not hold:
        yield
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning(
                "token-reward cache %s is being built or read by another process; waiting for "
                "it to finish",
                cache_dir,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_meta(cache_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a finished cache; :class:`CacheError` if unreadable or foreign."""
    path = Path(cache_dir) / "meta.json"
    meta = _read_json(path, f"Token-reward cache at {cache_dir}")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CacheError(
            f"{path} is not a treg-lightning token-reward cache (no format={FORMAT!r}); point "
            "cache_dir at a new or empty folder."
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"Token-reward cache at {cache_dir} has format version {meta.get('format_version')}, "
            f"this treg-lightning reads version {FORMAT_VERSION}: delete it and rerun."
        )
    return meta


def load_or_build(
    rows: list[Mapping[str, Any]],
    cache_dir: str | Path,
    fingerprint: Fingerprint | str,
    score_chunk: Callable[[list[Mapping[str, Any]]], Columns],
    chunk_pairs: int = 32,
    check_rows: int | None = None,
    on_start: Callable[[int], None] | None = None,
    on_chunk_done: Callable[[int], None] | None = None,
) -> datasets.Dataset:
    """Reuse the cache at ``cache_dir`` if its fingerprint matches, else build it.

    Args:
        rows: the tokenized pairs, in order (the cache has one row per pair, same order).
        cache_dir: folder of the cache; created if missing.
        fingerprint: from :func:`compute_fingerprint` (or a plain digest string).
        score_chunk: per-token value columns of a list of rows (see
            :func:`~treg_lightning.rewards.cache.chunks.build_in_chunks`); called on every
            rank, for that rank's unfinished chunks.
        chunk_pairs: pairs per resumable chunk.
        check_rows: compare the stored token ids with ``rows`` on this many rows (evenly
            spread); None checks all.

    Raises:
        CacheError: the folder holds a cache for other inputs, one whose token ids differ from
            ``rows``, a damaged cache, or files that are not ours.
    """
    fp = fingerprint if isinstance(fingerprint, Fingerprint) else Fingerprint(str(fingerprint))
    cache_dir = Path(cache_dir)
    ranks = distributed()
    with contextlib.ExitStack() as held:
        with ranks.step("cache-lock"):  # rank 0 holds the lock before any rank looks
            held.enter_context(build_lock(cache_dir, hold=ranks.rank == 0))
        if not (cache_dir / "meta.json").exists():
            _build(rows, cache_dir, fp, score_chunk, chunk_pairs, on_start, on_chunk_done, ranks)
        with ranks.step("cache-load"):
            return _load_checked(rows, cache_dir, fp, check_rows)


def _build(rows, cache_dir, fp, score_chunk, chunk_pairs, on_start, on_chunk_done, ranks: Ranks):
    work_dir = cache_dir / "work"
    with ranks.step("cache-check"):  # every rank has looked before rank 0 writes anything
        _check_buildable(cache_dir, fp)

    def start() -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        write_json(work_dir / "fingerprint.json", _fp_record(fp), sort_keys=True)

    ranks.on_rank_zero("cache-start", start)
    dataset = build_in_chunks(
        rows,
        work_dir,
        score_chunk,
        chunk_pairs,
        salt=fp.digest,
        on_start=on_start,
        on_chunk_done=on_chunk_done,
    )
    ranks.on_rank_zero("cache-save", lambda: _save(dataset, cache_dir, fp))


def _fp_record(fp: Fingerprint) -> dict[str, Any]:
    return {"fingerprint": fp.digest, "parts": fp.parts, "description": fp.description}


def _mismatch(cache_dir: Path, stored: Mapping[str, Any], fp: Fingerprint, what: str) -> str:
    old, new = stored.get("description", {}), fp.description
    changed = [k for k, v in fp.parts.items() if stored.get("parts", {}).get(k) != v]
    return (
        f"{what} at {cache_dir} was built for model {old.get('model', '?')!r} / template "
        f"{old.get('template', '?')!r} (settings {old.get('settings', '?')}), but the current run "
        f"uses model {new.get('model', '?')!r} / template {new.get('template', '?')!r} (settings "
        f"{new.get('settings', '?')}); differing inputs: {', '.join(changed) or 'fingerprint'}. "
        "Delete it or point cache_dir elsewhere."
    )


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(
            f"{what} is damaged: {path} is unreadable ({err}). Delete the folder and rerun the "
            "annotation."
        ) from err


def _check_buildable(cache_dir: Path, fp: Fingerprint) -> None:
    """Building may start in a missing/empty folder or resume an unfinished build of ours."""
    if not cache_dir.exists() or not any(cache_dir.iterdir()):
        return
    record_path = cache_dir / "work" / "fingerprint.json"
    if not record_path.is_file() and (cache_dir / "data").exists():
        raise CacheError(
            f"Token-reward cache at {cache_dir} is damaged: it has data/ but no meta.json (the "
            "build was cut off while saving, or files were deleted). Delete the folder and rerun."
        )
    if not record_path.is_file():
        raise CacheError(
            f"cache_dir {cache_dir} is not empty and holds no token-reward cache (no meta.json, "
            "no unfinished work/): point cache_dir at a new or empty folder."
        )
    record = _read_json(record_path, f"Unfinished token-reward cache at {cache_dir}")
    if record.get("fingerprint") != fp.digest:
        raise CacheError(_mismatch(cache_dir, record, fp, "The unfinished token-reward cache"))


def _save(dataset: datasets.Dataset | None, cache_dir: Path, fp: Fingerprint) -> None:
    """Write data/ then meta.json (each atomically), then drop the work folder."""
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"the build must return a datasets.Dataset on rank 0, got {dataset!r}.")
    advice = "free space or point cache_dir elsewhere; finished chunks are kept in work/"
    with atomic_path(cache_dir / "data") as tmp:
        with disk_full_hint(tmp, advice):
            dataset.save_to_disk(str(tmp))
        shutil.rmtree(cache_dir / "data", ignore_errors=True)  # left by a run killed right here
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **_fp_record(fp),
        "num_rows": len(dataset),
        "columns": dataset.column_names,
        "data_sha256": table_checksum(dataset.data.table),
    }
    write_json(cache_dir / "meta.json", meta, sort_keys=True)
    shutil.rmtree(cache_dir / "work", ignore_errors=True)


def _load_checked(rows, cache_dir: Path, fp: Fingerprint, check_rows: int | None):
    meta = read_meta(cache_dir)
    if meta.get("fingerprint") != fp.digest:
        raise CacheError(_mismatch(cache_dir, meta, fp, "The token-reward cache"))
    try:
        dataset = datasets.load_from_disk(str(cache_dir / "data"))
    except Exception as err:  # noqa: BLE001 -- any read failure means a damaged cache
        raise CacheError(
            f"Token-reward cache at {cache_dir} is damaged: its Arrow data in {cache_dir / 'data'} "
            f"cannot be read ({type(err).__name__}: {err}). Delete the folder and rerun."
        ) from err
    if len(dataset) != meta.get("num_rows") or len(dataset) != len(rows):
        raise CacheError(
            f"Token-reward cache at {cache_dir} has {len(dataset)} rows, its meta.json says "
            f"{meta.get('num_rows')} and the data has {len(rows)} pairs: delete it and rerun."
        )
    _check_ids(rows, dataset, cache_dir, check_rows)
    stored = meta.get("data_sha256")  # absent in caches written before checksums
    if stored is not None and table_checksum(dataset.data.table) != stored:
        raise CacheError(
            f"Token-reward cache at {cache_dir} is damaged: the values in {cache_dir / 'data'} "
            "do not match the checksum its meta.json recorded when it was built (the files "
            "were changed or corrupted after the build). Delete the folder and rerun the "
            "annotation."
        )
    return dataset


def _check_ids(rows, dataset: datasets.Dataset, cache_dir: Path, check_rows: int | None) -> None:
    n = len(rows)
    step = 1 if check_rows is None or check_rows >= n else max(n // max(check_rows, 1), 1)
    picks = list(range(0, n, step))
    stored = dataset.select_columns(list(ID_FIELDS)).select(picks).to_dict()
    for j, i in enumerate(picks):
        for column in ID_FIELDS:
            if list(rows[i][column]) != stored[column][j]:
                raise CacheError(
                    f"Token-reward cache at {cache_dir} is stale: row {i} (source index "
                    f"{rows[i].get('index', i)}) has different {column} than the current "
                    "tokenization (tokenizer or truncation changed). Delete it and rerun."
                )
