"""Wall time per named phase of a benchmark run: ``with clock("train: DPO"): ...`` prints the
phase's start and end and records its seconds in ``clock.seconds`` (for ``timings.json``)."""

from __future__ import annotations

import time


class Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        clock = self

        class _Phase:
            def __enter__(self):
                self.start = time.perf_counter()
                print(f"--- {name}", flush=True)

            def __exit__(self, *exc):
                clock.seconds[name] = round(time.perf_counter() - self.start, 1)
                print(f"--- {name}: {clock.seconds[name]} s", flush=True)

        return _Phase()
