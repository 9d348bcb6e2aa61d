"""Start-up checks of the data module's loader settings (batch sizes, workers, limit).

Each would otherwise fail only once the first batch is drawn, after the model (and the
evaluator) loaded, as a raw torch error, or worse, run: a negative ``limit`` silently drops the
last rows (``rows[:-3]``) and ``eval_batch_size: 0`` silently falls back to ``batch_size``.
"""

from __future__ import annotations

from treg_lightning.errors import ConfigError


def check_loader_settings(
    batch_size: int,
    eval_batch_size: int | None,
    num_workers: int,
    megabatch_size: int,
    limit: int | None,
) -> None:
    """Raise :class:`ConfigError` naming the first setting out of range."""
    minimums = (
        ("batch_size", batch_size, 1, "pairs per training batch and device"),
        (
            "eval_batch_size",
            eval_batch_size,
            1,
            "pairs per validation/test batch; null: batch_size",
        ),
        ("num_workers", num_workers, 0, "DataLoader worker processes; 0: the main process"),
        ("megabatch_size", megabatch_size, 1, "global batches per length-sorted group"),
        ("limit", limit, 1, "the first N rows of each source; null: all rows"),
    )
    for name, value, minimum, meaning in minimums:
        if value is not None and value < minimum:
            raise ConfigError(f"data.{name} must be >= {minimum} ({meaning}), got {value}.")
