"""The metrics and data of an exported checkpoint, for its model card
(:mod:`treg_lightning.training.model_card`).

``treg export`` reads them from the checkpoint it exports, never from its own config: the data
from the checkpoint's saved datamodule hyperparameters, the metrics from the ``metrics.csv``
beside it, up to the checkpoint's global step (an earlier checkpoint gets the values of its own
step, not the run's last ones), each metric once. Lightning logs the metrics of the n-th
optimizer step (and a validation or epoch end right after it) at logger step n - 1, so the
values of a checkpoint at global step N are those logged at steps below N; the card names each
by the global step it describes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Lightning logs a metric logged with on_step and on_epoch under these two names (and keeps the
# plain name in callback_metrics); a card shows it once, the step's own value first.
FORKS = ("_step", "", "_epoch")


@dataclass
class StepMetrics:
    """The metrics of the exported weights, each metric once.

    Attributes:
        step: the global step (optimizer steps taken) of the exported weights.
        epoch: the epoch of the exported weights, as the checkpoint's name counts it.
        values: ``{metric: (value, global step it describes)}``.
        source: where they were read (a ``metrics.csv``, or the run's live metrics).
    """

    step: int | None
    epoch: int | None = None
    values: dict[str, tuple[float, int | None]] = field(default_factory=dict)
    source: str | None = None


def checkpoint_record(ckpt_path: str | Path) -> dict[str, Any]:
    """The non-tensor entries of a checkpoint (``global_step``, ``epoch``,
    ``datamodule_hyper_parameters``, ...): from a ``.ckpt`` file, or the ``meta.pt`` of a sharded
    folder; ``{}`` where there is none. Tensors are memory-mapped, not read."""
    from treg_lightning.models.checkpoints import load_checkpoint

    path = Path(ckpt_path).expanduser()
    source = path / "meta.pt" if path.is_dir() else path
    if not source.is_file():
        return {}
    saved = load_checkpoint(source)
    return {k: v for k, v in saved.items() if k not in ("state_dict", "optimizer_states")}


def trained_data(record: Mapping[str, Any]) -> str | None:
    """``data.source`` of the run that wrote the checkpoint (its datamodule hyperparameters)."""
    data = record.get("datamodule_hyper_parameters") or {}
    source = data.get("source") if isinstance(data, Mapping) else None
    return None if source is None else str(source)


def metrics_beside(ckpt_path: str | Path | None) -> Path | None:
    """The ``metrics.csv`` of the run that wrote ``ckpt_path`` (``<log_dir>/checkpoints/x.ckpt``
    -> ``<log_dir>/metrics.csv``), or None."""
    if ckpt_path is None:
        return None
    for folder in Path(ckpt_path).expanduser().resolve().parents[:3]:
        if (folder / "metrics.csv").is_file():
            return folder / "metrics.csv"
    return None


def metrics_at_step(metrics_csv: str | Path | None, record: Mapping[str, Any]) -> StepMetrics:
    """The metrics of the checkpoint ``record`` describes, from its run's ``metrics.csv``: each
    metric's last finite value logged up to its global step (see the module docstring)."""
    step, epoch = record.get("global_step"), record.get("epoch")
    metrics = StepMetrics(_int(step), _int(epoch), source=None)
    if metrics_csv is None or not Path(metrics_csv).is_file():
        return metrics
    from treg_lightning.answers.plots import read_metrics

    metrics.source = str(metrics_csv)
    limit = math.inf if metrics.step is None else metrics.step
    last = {}
    for key, points in read_metrics(metrics_csv).items():
        # Logger step s holds the metrics of global step s + 1.
        kept = [(s + 1, v) for s, v in points if s + 1 <= limit and math.isfinite(v)]
        if kept:
            last[key] = (kept[-1][1], kept[-1][0])
    metrics.values = once_each(last)
    return metrics


def live_metrics(trainer) -> StepMetrics:
    """The metrics of a live run's weights (``ExportOnFitEnd`` after ``fit``): its
    ``callback_metrics``, all describing its last global step."""
    step = int(trainer.global_step)
    values = {k: (v, step) for k, v in plain_metrics(trainer.callback_metrics).items()}
    return StepMetrics(step, None, once_each(values), "the run's last logged values")


def once_each(values: Mapping[str, tuple[float, int | None]]) -> dict:
    """Each metric once: of ``x_step``, ``x`` and ``x_epoch`` (one metric Lightning logs under
    three names), the first present, named ``x``; sorted by name."""
    chosen: dict[str, tuple[float, int | None]] = {}
    for name in sorted(values):
        base = _base_name(name)
        if base in chosen:
            continue
        for fork in FORKS:
            if base + fork in values:
                chosen[base] = values[base + fork]
                break
    return dict(sorted(chosen.items()))


def _base_name(name: str) -> str:
    for suffix in ("_step", "_epoch"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def plain_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``trainer.callback_metrics`` (tensors) as sorted finite floats."""
    out = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return dict(sorted(out.items()))
