"""PNG plots: training curves from a run's logs and evaluation bars (matplotlib: the ``plots``
extra).

Training curves read Lightning's ``CSVLogger`` ``metrics.csv`` or TensorBoard event files::

    python -m treg_lightning.answers.plots outputs/demo/logs --out curves.png
    python -m treg_lightning.answers.plots dpo=runs/dpo/logs treg=runs/treg/logs --out compare.png
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure  # no pyplot: no global backend switch for the caller

from treg_lightning.errors import MissingFileError

CURVES = (
    ("loss", "loss"),
    ("reward_accuracy", "reward accuracy"),
    ("margin", "reward margin"),
    ("treg", "T-REG term"),
    ("token_reward_pearson", "token-reward correlation"),
)
Series = dict[str, list[tuple[int, float]]]


def _latest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


def read_metrics(log: str | Path) -> Series:
    """``{metric: [(step, value), ...]}`` of a ``metrics.csv``, a folder holding one (the newest
    ``version_*`` wins) or a folder of TensorBoard event files."""
    path = Path(log)
    csv_file = path if path.is_file() else _latest(sorted(path.rglob("metrics.csv")))
    if csv_file is not None and csv_file.suffix == ".csv":
        return _read_csv(csv_file)
    events = sorted(path.rglob("events.out.tfevents.*")) if path.is_dir() else []
    if events:
        return _read_events(_latest(events).parent)
    raise MissingFileError(
        f"{path} holds no metrics.csv (CSVLogger) and no TensorBoard event file: give the "
        "run's log folder (trainer.logger save_dir) or its metrics.csv."
    )


def _read_csv(path: Path) -> Series:
    series: Series = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def _read_events(folder: Path) -> Series:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, float(event.value)) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(runs: Mapping[str, Series], path: str | Path, title: str | None = None) -> Path:
    """One panel per metric (loss, reward accuracy, margin, T-REG term), one colour per run:
    training steps as a thin line with a running mean, validation as dots."""
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(4.2 * len(CURVES), 3.4))
    axes = fig.subplots(1, len(CURVES), squeeze=False)
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    # Runs can coincide (e.g. a regularizer whose term is tiny): dashes keep each one visible.
    dashes = ("-", "--", ":", "-.")
    markers = ("o", "s", "^", "D", "v", "P")
    for axis, (metric, label) in zip(axes[0], CURVES, strict=True):
        for j, (name, series) in enumerate(runs.items()):
            colour, dash = colours[j % len(colours)], dashes[j % len(dashes)]
            train = series.get(f"train/{metric}_step") or series.get(f"train/{metric}") or []
            if train:
                steps, values = zip(*train, strict=True)
                window = max(1, len(values) // 15)
                if window > 1:
                    axis.plot(steps, values, color=colour, alpha=0.2, linewidth=0.7)
                axis.plot(steps, _smooth(list(values), window), color=colour, linestyle=dash,
                          linewidth=1.6, label=name)  # fmt: skip
            val = series.get(f"val/{metric}") or []
            if val:
                steps, values = zip(*val, strict=True)
                axis.plot(steps, values, markers[j % len(markers)], color=colour, markersize=6,
                          markeredgecolor="black", markeredgewidth=0.6, alpha=0.85,
                          label=None if train else name)  # fmt: skip
        axis.set_title(label)
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if not handles:
        for axis in axes[0][1:]:
            handles, labels = axis.get_legend_handles_labels()
            if handles:
                break
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False)
    fig.suptitle(title or "training curves (lines: train steps, dots: validation)")
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    return _save(fig, path)


BARS = (
    ("pairs", "reward_accuracy", "held-out reward accuracy"),
    ("pairs", "margin", "held-out reward margin"),
    ("pairs", "token_sign_agreement", "token-reward sign agreement"),
    ("reward", "mean", "mean reward (reward model)"),
    ("reward", "win_rate", "win rate vs reference"),
    ("answers", "tokens", "answer length (tokens, mean)"),
)


def _bar_value(result: Mapping[str, Any], group: str, key: str) -> float | None:
    value = (result.get(group) or {}).get(key)
    if isinstance(value, Mapping):  # length statistics
        value = value.get("mean")
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def plot_evaluation(results: list[Mapping[str, Any]], path: str | Path) -> Path:
    """Bars per metric, one bar per run; the win rate with its 95% interval."""
    shown = [b for b in BARS if any(_bar_value(r, b[0], b[1]) is not None for r in results)]
    if not shown:
        shown = BARS[:1]
    fig = Figure(figsize=(3.6 * len(shown), 3.6))
    axes = fig.subplots(1, len(shown), squeeze=False)
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (group, key, label) in zip(axes[0], shown, strict=True):
        names, values, errors = [], [], []
        for result in results:
            value = _bar_value(result, group, key)
            if value is None:
                continue
            names.append(result["run"])
            values.append(value)
            reward = result.get("reward") or {}
            if key == "win_rate":
                errors.append((value - reward["ci_low"], reward["ci_high"] - value))
        positions = range(len(names))
        yerr = list(zip(*errors, strict=True)) if errors else None
        bars = axis.bar(positions, values, color=[colours[i % len(colours)] for i in positions],
                        yerr=yerr, capsize=4, ecolor="#333333")  # fmt: skip
        if key == "win_rate":  # the value inside the bar: the interval's cap sits above it
            axis.bar_label(bars, fmt="%.2f", fontsize=8, label_type="center", color="white",
                           weight="bold")  # fmt: skip
            axis.axhline(0.5, color="grey", linestyle="--", linewidth=1)
            axis.set_ylim(0, 1.05)
        else:
            axis.bar_label(bars, fmt="%.3g", fontsize=8, padding=2)
            axis.margins(y=0.15)
        axis.set_xticks(list(positions), names, rotation=30, ha="right")
        axis.set_title(label, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> Path:
    """``python -m treg_lightning.answers.plots LOG [NAME=LOG ...] --out curves.png``."""
    parser = argparse.ArgumentParser(
        prog="python -m treg_lightning.answers.plots",
        description="Draw training curves (loss, reward accuracy, margin, T-REG term) from "
        "CSVLogger / TensorBoard logs into a PNG.",
    )
    parser.add_argument("logs", nargs="+", help="log folder or metrics.csv; NAME=PATH names it")
    parser.add_argument("--out", default="curves.png", help="PNG file written")
    parser.add_argument("--title", default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not args.overwrite:
        parser.error(
            f"{args.out} (--out) exists; the plot would replace it. Choose another --out or "
            "pass --overwrite."
        )
    runs = {}
    for item in args.logs:
        name, _, log = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
        runs[name] = read_metrics(log)
    path = plot_curves(runs, args.out, args.title)
    print(f"training curves written to {path.resolve()}")
    return path


if __name__ == "__main__":
    main()
