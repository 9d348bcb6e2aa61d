"""Errors that are the user's to fix, told apart from bugs.

``treg`` prints a :class:`UserError` as its message alone and exits with status 2; any other
exception is a bug and keeps its traceback (``TREG_DEBUG=1`` shows the traceback for both).
The marker is explicit: an error is a user error because our code raised it as one, never
because of its built-in type, so a ``ValueError`` from deep inside torch stays a bug.

Every user-facing error type of the package derives from :class:`UserError` as well as from the
built-in type callers already catch (``ConfigError`` is a ``ValueError``, ``MissingFileError`` a
``FileNotFoundError``), so ``except ValueError`` code keeps working.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


class UserError(Exception):
    """Marker base: a problem with the user's settings, data, files or folders.

    The message names what is wrong (file, row, field or setting) and what to do.
    """


class ConfigError(UserError, ValueError):
    """A setting has a value we cannot run with (raised at start-up where possible)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the settings name does not exist or lacks what it must hold."""

    def __str__(self) -> str:
        # FileNotFoundError(msg) prints msg; FileNotFoundError(errno, msg) would print "[Errno]".
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class CheckpointError(UserError, ValueError):
    """A checkpoint given by ``--ckpt_path`` is empty, truncated, foreign or of another model."""


_PACKAGE = str(Path(__file__).resolve().parent) + os.sep


def user_error_in(error: BaseException) -> BaseException | None:
    """The user error behind ``error``: itself, or one it was raised from (its cause chain).

    jsonargparse wraps the error of a constructor it calls ("Does not validate against any of the
    Union subtypes ...") and keeps ours as the cause; this finds ours.

    A ``ValueError`` raised by the body of a treg_lightning ``__init__`` counts too: that is a
    constructor refusing a setting. (The constructors of module.py and data/datamodule.py still
    raise plain ``ValueError``; this rule covers them until they raise :class:`ConfigError`.)
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if is_user_error(current):
            return current
        if isinstance(current, ValueError) and _raised_by_our_constructor(current):
            return ConfigError(str(current))
        # Only explicit `raise ... from ...`: a bug raised while handling a user error (its
        # __context__) stays a bug.
        current = current.__cause__
    return None


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is marked as the user's to fix (ours, or Lightning's own marker)."""
    if isinstance(error, UserError):
        return True
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    # Lightning raises MisconfigurationException exactly for invalid Trainer settings; the
    # parser raises ArgumentError instead of exiting when JSONARGPARSE_DEBUG is set.
    return isinstance(error, (MisconfigurationException, argparse.ArgumentError))


def _raised_by_our_constructor(error: BaseException) -> bool:
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    code = traceback.tb_frame.f_code
    return code.co_name == "__init__" and code.co_filename.startswith(_PACKAGE)
