"""Stable timing for the benchmarks: the median of alternating repeats with its spread, and a
timed window of at least ``MIN_WINDOW_S`` seconds per side where a script can repeat its work.

A figure from one short window moves with whatever else the machine runs (a 2-core machine
shared with other jobs moved the README's ratios up to 10x between runs); the median of several
alternating repeats, each long enough, does not, and its spread says how far to trust it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

MIN_WINDOW_S = 20.0  # seconds of timed work per side and repeat, where the work can be repeated
# On a GPU a step's time hardly moves with other processes' load; 10 s of steps (dozens of them
# at the GPU check's sizes) measure the kernels rather than launch overhead.
MIN_GPU_WINDOW_S = 10.0


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and relative spread ``(max - min) / median`` of ``values``."""
    median = statistics.median(values)
    low, high = min(values), max(values)
    return {
        "median": median,
        "min": low,
        "max": high,
        "relative_spread": (high - low) / median if median else float("nan"),
        "n": len(values),
    }


def timed_window(fn: Callable[[], object], min_seconds: float = MIN_WINDOW_S) -> tuple[int, float]:
    """Call ``fn`` until at least ``min_seconds`` of wall time passed (at least once); returns
    ``(calls, seconds)``, so ``seconds / calls`` is the time of one call."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        seconds = time.perf_counter() - start
        if seconds >= min_seconds:
            return calls, seconds


def short_window_note(seconds: float, what: str, min_seconds: float = MIN_WINDOW_S) -> str | None:
    """A warning when a timed window is shorter than ``min_seconds`` (else None)."""
    if seconds >= min_seconds:
        return None
    return (
        f"note: {what} was timed over {seconds:.1f} s only (< {min_seconds:.0f} s): its figure "
        "moves with the machine's load; time it longer (--window-s / --min-seconds)."
    )


def format_spread(stats: dict[str, float], digits: int = 2) -> str:
    """``x1.23 (min 1.10, max 1.31, n 3)``."""
    return (
        f"x{stats['median']:.{digits}f} (min {stats['min']:.{digits}f}, "
        f"max {stats['max']:.{digits}f}, n {stats['n']})"
    )
