"""How ``treg`` ends: one paragraph and status 2 for a user error, a short note and status 130
(143 for SIGTERM) for an interrupted run, the traceback for a bug.

- A :class:`~treg_lightning.errors.UserError` (or one it was raised from, see
  :func:`~treg_lightning.errors.user_error_in`) prints ``error: <message>`` alone: the message
  already names the file, row or setting and what to do; the traceback would bury it.
- Ctrl-C / SIGTERM print what was kept (the last checkpoint, finished annotation chunks) and
  how to resume, instead of Lightning's shutdown traceback.
- Anything else is a bug: its traceback is shown, as Python would.
- ``TREG_DEBUG=1`` (or ``--debug``) adds the traceback to the first two as well.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.errors import user_error_in

EXIT_USER_ERROR = 2
DEBUG_ENV = "TREG_DEBUG"
DEBUG_FLAG = "--debug"


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; ``str()`` says what was kept and how to resume."""


def debug_requested(args: Sequence[str] | None) -> bool:
    """``TREG_DEBUG`` set to a true value, or ``--debug`` among the arguments."""
    value = os.environ.get(DEBUG_ENV, "").strip().lower()
    argv = sys.argv[1:] if args is None else args
    return value not in ("", "0", "false", "no", "off") or DEBUG_FLAG in (argv or ())


@contextlib.contextmanager
def exit_statuses(debug: bool = False) -> Iterator[None]:
    """Turn user errors and interrupts raised in the block into a message and an exit status.

    Raises:
        SystemExit: 2 for a user error; 128 + signal number for Ctrl-C (130) or SIGTERM (143).
    """
    received: list[int] = []
    with _signals_as_interrupts(received):
        try:
            yield
        except KeyboardInterrupt as interrupt:
            if debug:
                traceback.print_exc()
            message = str(interrupt) if isinstance(interrupt, RunInterrupted) else ""
            _say(message or "Interrupted before the run started: nothing was written.", False)
            raise SystemExit(128 + (received[-1] if received else signal.SIGINT)) from None
        except Exception as error:
            found = user_error_in(error)
            if found is None:
                raise
            if debug:
                traceback.print_exc()
            _say(f"error: {found}", True)
            raise SystemExit(EXIT_USER_ERROR) from None


@contextlib.contextmanager
def _signals_as_interrupts(received: list[int]) -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (recording which came), so Lightning's
    graceful shutdown runs for both and the caller can say how the run ended."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _say(message: str, all_ranks: bool) -> None:
    """Write ``message`` to stderr; on rank 0 only unless ``all_ranks``."""
    rank = _global_rank()
    if rank and not all_ranks:
        return
    prefix = f"[rank {rank}] " if rank else ""
    sys.stdout.flush()
    sys.stderr.write(prefix + message.rstrip() + "\n")
    sys.stderr.flush()


def _global_rank() -> int:
    return int(getattr(rank_zero_only, "rank", 0) or 0)


# --- what an interrupted run kept -------------------------------------------------------------


def interrupted_message(subcommand: str, trainer=None, datamodule=None) -> str:
    """Two or three lines: where the run stopped, what was kept, how to resume."""
    step = getattr(trainer, "global_step", None)
    where = f" at global step {step}" if subcommand == "fit" and step is not None else ""
    lines = [f"Interrupted: `treg {subcommand}` stopped{where}."]
    checkpoint = last_checkpoint(trainer)
    chunks = annotation_chunks(datamodule)
    if checkpoint is not None:
        lines.append(
            f"Kept: the last checkpoint {checkpoint}. Resume with the same command plus "
            f"--ckpt_path {checkpoint}."
        )
    if chunks:
        count = sum(n for _, n in chunks)
        folders = ", ".join(str(folder) for folder, _ in chunks)
        lines.append(
            f"Kept: {count} finished annotation chunk(s) in {folders}; rerun the same command "
            "(or `treg annotate`) and only the missing chunks are computed."
        )
    if checkpoint is None and not chunks:
        hint = (
            " (save often with ModelCheckpoint(every_n_train_steps=N, save_last=true))"
            if subcommand == "fit"
            else ""
        )
        lines.append(f"Nothing to resume from was written{hint}; rerun the command to start over.")
    return "\n".join(lines)


def last_checkpoint(trainer) -> Path | None:
    """The most recent checkpoint file the trainer's checkpoint callbacks know, if any."""
    paths = []
    for callback in getattr(trainer, "checkpoint_callbacks", None) or []:
        for name in ("last_model_path", "best_model_path"):
            path = getattr(callback, name, "")
            if path and Path(path).exists():
                paths.append(Path(path))
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


def annotation_chunks(datamodule) -> list[tuple[Path, int]]:
    """``(work folder, finished chunk files)`` of unfinished token-reward caches."""
    root = _cache_dir(datamodule)
    if root is None or not root.is_dir():
        return []
    found = []
    for work in sorted(root.glob("*/work")):
        count = len(list(work.glob("chunk-*.safetensors")))
        if count:
            found.append((work, count))
    return found


def _cache_dir(datamodule) -> Path | None:
    if not isinstance(datamodule, PreferenceDataModule) or datamodule.rewards is None:
        return None
    folder = datamodule.rewards.cache_folder
    return Path(folder).expanduser() if folder is not None else None
