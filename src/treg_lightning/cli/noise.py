"""Known third-party noise that ``treg`` hides: one list, applied at the CLI entry only.

Each entry matches one message by its start and its category (or logger), never a whole
category, so a new warning from the same library still shows. Library users of
treg_lightning see everything as before; only the ``treg`` command filters.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

import lightning_utilities.core.rank_zero as rank_zero

# (category, start of the message, why it is noise for a treg user)
KNOWN_WARNINGS: list[tuple[type[Warning], str, str]] = [
    (
        UserWarning,
        "No seed found, seed set to",
        "seed_everything: true picks a seed; Lightning logs 'Seed set to N' right after",
    ),
    (
        UserWarning,
        "Starting from v1.9.0, `tensorboardX` has been removed",
        "the default CSVLogger is intended; TensorBoard is the `tensorboard` extra",
    ),
    (
        FutureWarning,
        "`isinstance(treespec, LeafSpec)` is deprecated",
        "raised inside Lightning's own pytree helper on torch >= 2.10; nothing to do for users",
    ),
    (
        UserWarning,
        "`loftq_config` specified but will be ignored",
        "the parser fills every field of peft.LoraConfig (loftq_config with its defaults)",
    ),
]

# (logger name prefix, start of the message, why)
KNOWN_LOG_LINES: list[tuple[str, str, str]] = [
    ("lightning", "💡 Tip:", "advertisements for Lightning's cloud services"),
]


class _DropKnownLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg).lstrip()
        return not any(
            record.name.startswith(name) and message.startswith(start)
            for name, start, _ in KNOWN_LOG_LINES
        )


@contextlib.contextmanager
def known_noise_hidden() -> Iterator[None]:
    """Within the block, the known warnings and log lines above are not shown."""
    # rank_zero_info logs through whichever logger Lightning last assigned to this module.
    loggers = {
        rank_zero.log,
        logging.getLogger("lightning.pytorch.utilities.rank_zero"),
        logging.getLogger("lightning.fabric.utilities.rank_zero"),
    }
    line_filter = _DropKnownLines()
    with warnings.catch_warnings():
        for category, start, _ in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=re.escape(start), category=category)
        for logger in loggers:
            logger.addFilter(line_filter)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(line_filter)
