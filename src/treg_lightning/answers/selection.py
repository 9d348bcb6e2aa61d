"""Pick (chosen, rejected) among the scored samples of one prompt, or drop the prompt.

:class:`BestWorst` is the rule of SimPO's on-policy sets: chosen = the highest score, rejected =
the lowest, optionally only when they differ by ``min_margin``. A prompt is dropped, with its
reason counted, when fewer than ``min_samples`` samples are usable (a sample is unusable when
its answer is empty or its score is not finite), when every usable answer is the same text
(``identical``), when all their scores are equal (``tied``) or when the best and worst differ by
less than ``min_margin`` (``margin``). Ties among the best (or the worst) go to the sample that
comes first in the seed order, so the choice never depends on the order of computation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from treg_lightning.errors import ConfigError

DROP_REASONS = ("too_few", "identical", "tied", "margin")


@dataclass(frozen=True)
class Sample:
    """One scored answer to a prompt.

    Attributes:
        position: the sample's place in the seed order (0 .. k - 1).
        text: the answer.
        score: its score (higher is better); None when scoring failed.
    """

    position: int
    text: str
    score: float | None


@dataclass(frozen=True)
class Choice:
    """The outcome for one prompt: ``chosen`` and ``rejected`` positions, or ``dropped``."""

    chosen: int | None = None
    rejected: int | None = None
    dropped: str | None = None

    @property
    def kept(self) -> bool:
        return self.dropped is None


def usable(sample: Sample) -> bool:
    return bool(sample.text.strip()) and sample.score is not None and math.isfinite(sample.score)


class BestWorst:
    """Chosen = the best-scored sample, rejected = the worst.

    Args:
        min_margin: keep a prompt only when best - worst >= ``min_margin`` (0: any positive
            difference, the paper's rule).
        min_samples: usable samples a prompt needs (>= 2).
    """

    def __init__(self, min_margin: float = 0.0, min_samples: int = 2) -> None:
        if min_margin < 0 or not math.isfinite(min_margin):
            raise ConfigError(f"selection min_margin must be finite and >= 0, got {min_margin}.")
        if min_samples < 2:
            raise ConfigError(f"selection min_samples must be >= 2, got {min_samples}.")
        self.min_margin = min_margin
        self.min_samples = min_samples

    def select(self, samples: Sequence[Sample]) -> Choice:
        """The choice for one prompt's samples (see the module doc)."""
        good = [s for s in samples if usable(s)]
        if len(good) < self.min_samples:
            return Choice(dropped="too_few")
        if len({s.text for s in good}) == 1:
            return Choice(dropped="identical")
        # Highest score first, then the earliest seed; lowest score first, then the earliest.
        best = min(good, key=lambda s: (-s.score, s.position))
        worst = min(good, key=lambda s: (s.score, s.position))
        if best.score == worst.score:
            return Choice(dropped="tied")
        if best.score - worst.score < self.min_margin:
            return Choice(dropped="margin")
        return Choice(chosen=best.position, rejected=worst.position)

    def fingerprint(self) -> dict:
        return {"rule": "best-worst", "min_margin": self.min_margin,
                "min_samples": self.min_samples}  # fmt: skip
