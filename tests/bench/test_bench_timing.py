"""bench/timing.py: the median of repeats with its spread, and timed windows of a minimum
length (what keeps the benchmark's ratios from moving with a moment's load)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import timing  # noqa: E402


def test_spread_by_hand():
    stats = timing.spread([4.0, 1.0, 2.0])
    assert stats == {"median": 2.0, "min": 1.0, "max": 4.0, "relative_spread": 1.5, "n": 3}
    assert timing.format_spread(stats) == "x2.00 (min 1.00, max 4.00, n 3)"


def test_timed_window_repeats_until_the_minimum(monkeypatch):
    clock = iter(range(100))  # every perf_counter call advances one second
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))
    calls = []
    count, seconds = timing.timed_window(lambda: calls.append(1), min_seconds=5)
    assert (count, seconds, len(calls)) == (5, 5.0, 5)


def test_timed_window_runs_at_least_once():
    assert timing.timed_window(lambda: None, min_seconds=0)[0] == 1


@pytest.mark.parametrize(("seconds", "noted"), [(19.9, True), (20.0, False)])
def test_short_window_note(seconds, noted):
    note = timing.short_window_note(seconds, "ours")
    assert (note is not None) == noted
    if noted:
        assert note.startswith("note: ours was timed over 19.9 s only (< 20 s)")
