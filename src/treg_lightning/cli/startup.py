"""Settings the ``treg`` command completes or checks once the trainer exists, before any model,
evaluator or data loads.

- :func:`fill_data_parallel_size`: ``ModelParallelStrategy(data_parallel_size="auto")`` would
  mean one data-parallel group per node (Lightning's default puts every device of a node into
  tensor parallelism); for FSDP2 it must be devices x nodes / tensor_parallel_size. The configs
  leave it out, so it follows ``--trainer.devices`` and ``--trainer.num_nodes``.
- :func:`skip_validation_without_data`: a datamodule configured with no validation data gets
  ``limit_val_batches=0``, so Lightning runs no validation loop and does not warn "Total length
  of `list` across ranks is zero" about the empty loader.
- :func:`check_run_outputs`: the run's ``ExportOnFitEnd`` outputs must not exist yet.
- :func:`require_data`: ``treg validate`` / ``treg test`` without such data configured is an
  error (Lightning would run no loop and exit 0, reporting nothing).
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy

from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.data.splits import require_split
from treg_lightning.errors import ConfigError


def fill_data_parallel_size(trainer: Trainer) -> None:
    """Set an "auto" ``data_parallel_size`` of ``ModelParallelStrategy`` to the device count
    (devices x nodes) divided by ``tensor_parallel_size``.

    Raises:
        ConfigError: the device count is not a multiple of ``tensor_parallel_size``.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, ModelParallelStrategy):
        return
    # Private attributes: ModelParallelStrategy resolves "auto" only at process-group set-up.
    tensor = strategy._tensor_parallel_size
    if strategy._data_parallel_size != "auto" or tensor == "auto":
        return
    world = trainer.num_devices * trainer.num_nodes
    if world % tensor:
        raise ConfigError(
            f"ModelParallelStrategy: {world} devices (trainer.devices x trainer.num_nodes) "
            f"cannot be split into groups of tensor_parallel_size={tensor}; choose a divisor "
            f"of {world}, or set data_parallel_size yourself."
        )
    strategy._data_parallel_size = world // tensor


def has_validation_data(datamodule) -> bool | None:
    """Whether the datamodule is configured with validation pairs (None: cannot tell)."""
    names = ("val_source", "val_split", "val_fraction")
    if datamodule is None or not all(hasattr(datamodule, name) for name in names):
        return None
    return bool(
        datamodule.val_source is not None
        or datamodule.val_split is not None
        or datamodule.val_fraction > 0
    )


def skip_validation_without_data(trainer: Trainer, datamodule) -> None:
    """``limit_val_batches = 0`` when the datamodule is configured without validation data."""
    if has_validation_data(datamodule) is False:
        trainer.limit_val_batches = 0


def check_run_outputs(trainer: Trainer) -> None:
    """Refuse ``ExportOnFitEnd`` outputs that exist already (unless its ``overwrite`` is set)."""
    for callback in trainer.callbacks:
        check = getattr(callback, "check_outputs", None)
        if callable(check):
            check(trainer)


def require_data(datamodule, split: str, command: str) -> None:
    """Refuse ``command`` when the datamodule configures no ``split`` ("val", "test") data."""
    if isinstance(datamodule, PreferenceDataModule):
        require_split(datamodule.split_plan(), split, command)
