"""Outputs: where a verb writes (:class:`Output`), checked at start-up, and a clear message when
the disk fills up.

A long run must not die after hours because its checkpoint folder is read-only, nor with a bare
``OSError: [Errno 28]`` from deep inside a writer. :func:`check_writable` runs before any model is
loaded or any pair annotated; :func:`disk_full_hint` turns "no space left on device" into a
message naming the file and what to do.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from treg_lightning.errors import ConfigError, UserError

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@dataclass(frozen=True)
class Output:
    """Where a verb writes its result (``--output.path``, ``--output.overwrite``); the verbs that
    write one result (export, predict, evaluate, audit, pairs) share it, each with its own
    default path."""

    path: str = ""
    """The file (predict, pairs) or folder (export, evaluate, audit) the verb writes (each verb
    has its own default)."""

    overwrite: bool = False
    """Replace an earlier result at ``path``; without it an existing result is never written
    over."""

    def __post_init__(self) -> None:
        if not str(self.path).strip():
            raise ConfigError(
                "--output.path is empty: give the file or folder to write, e.g. "
                "--output.path results/answers.jsonl."
            )


class OutputFolderError(UserError, OSError):
    """An output folder cannot be created or written (the message names it and the setting)."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message alone, without OSError's "[Errno 28]" prefix


def check_writable(folders: Iterable[tuple[str, str | os.PathLike | None]]) -> None:
    """Create each folder if needed and write a probe file in it.

    Args:
        folders: ``(setting, folder)`` pairs, e.g. ``("trainer.default_root_dir", "runs/")``;
            ``None`` folders are skipped. The setting is named in the error.

    Raises:
        OutputFolderError: a folder cannot be created or written.
    """
    for setting, folder in folders:
        if folder is None or str(folder).startswith(("s3://", "gs://", "hdfs://", "http")):
            continue  # remote filesystems are checked by their own clients
        path = Path(folder).expanduser()
        probe = path / f".treg-write-check-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise OutputFolderError(
                err.errno,
                f"cannot write to {path} ({setting}): {err.strerror or err}. Make the folder "
                f"writable (check its permissions, free space and that no part of the path is a "
                f"file), or set {setting} to a folder you can write.",
            ) from err


def check_not_overwriting(
    path: str | os.PathLike | None, setting: str, overwrite: bool, how_to_allow: str
) -> None:
    """Refuse, at start-up, to write into a folder that holds files or over an existing file.

    Args:
        path: the output folder (or file); None is skipped. An empty folder is fine.
        setting: the setting that names it, e.g. "--output.path" (named in the error).
        overwrite: the user allowed replacing what is there.
        how_to_allow: the setting that allows it, e.g. "--output.overwrite".

    Raises:
        OutputFolderError: something is there and ``overwrite`` is False.
    """
    if path is None or overwrite:
        return
    path = Path(path).expanduser()
    if path.is_dir():
        held = sorted(p.name for p in path.iterdir())
        if not held:
            return
        what = f"already holds {len(held)} entries (e.g. {', '.join(held[:3])})"
    elif path.exists():
        what = "already exists"
    else:
        return
    raise OutputFolderError(
        errno.EEXIST,
        f"{path} ({setting}) {what}; writing there would replace files of an earlier run. "
        f"Choose a new or empty folder, or set {how_to_allow} to replace them.",
    )


@contextmanager
def disk_full_hint(path: str | os.PathLike, advice: str) -> Iterator[None]:
    """Re-raise "no space left on device" (or quota exceeded) while writing ``path`` clearly.

    Args:
        path: the file or folder being written (named in the message).
        advice: what the user should do, e.g. "free space or point cache_dir elsewhere".
    """
    try:
        yield
    except OSError as err:
        if err.errno not in _DISK_FULL or isinstance(err, OutputFolderError):
            raise
        raise OutputFolderError(
            err.errno, f"no space left on device while writing {path}: {advice}"
        ) from err
