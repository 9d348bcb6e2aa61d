"""One way to write a file (or a folder) that readers never see half written.

Everything is written under a hidden temporary name beside its target, ``.<name>.tmp-<pid>-<8
hex>``, and renamed onto the target when complete (``os.replace``: atomic on POSIX within one
folder). A write that raises, or a process killed mid-write, never leaves a partial target; a
write that raises also removes its temporary file. The process id in the name lets a cleaner
tell the leftovers of dead processes from a live writer's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write into, moved onto ``path`` when the block ends
    without error and removed otherwise.

    The block may write a file or a folder at the temporary path (e.g. with a library's own
    writer: ``save_file``, ``save_to_disk``). A file is flushed to disk before the rename, so a
    power cut leaves the old or the new content, never a mix. A folder replaces only a missing
    or empty ``path`` (``os.replace`` refuses a non-empty one: remove it inside the block).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if tmp.is_file():
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any, sort_keys: bool = False, end: str = "") -> Path:
    """``value`` as JSON indented by one space (objects it cannot encode as their ``str``),
    followed by ``end``, written atomically."""
    return write_text(path, json.dumps(value, indent=1, sort_keys=sort_keys, default=str) + end)


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line (non-ASCII kept as it is), written atomically; ``rows`` is
    streamed, so a long iterable is never held as one string."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)
