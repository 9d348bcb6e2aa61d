"""Control token-reward sources of the credit benchmark (``bench/credit.py``), built on the
library's :class:`~treg_lightning.rewards.spans.SpanRewards`: each takes the oracle values that
``SpanRewards`` maps from the defect spans (-0.5 on the defect tokens, 0 elsewhere) and moves
or spreads them, so that a variant trained on them differs from the oracle in one respect only.

- :class:`ShuffledSpanRewards`: the same values on as many tokens, none on the defect (where the
  credit share must drop if the metric can see misplaced credit);
- :class:`UniformSpanRewards`: the same total spread evenly over every token (as much push, no
  location);
- :class:`DenseSignedSpanRewards`: the oracle plus a small positive value on every token no span
  covers, in both responses (the paper's dense rewards are positive on most good tokens: an
  SFT-like anchor the negative-only oracle lacks).

The end-of-turn token keeps the oracle's value (0: it carries no text) in every source. Each
source's settings (and so its cache fingerprint) name the transform, so no two share a cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from treg_lightning.rewards.spans import SpanRewards


def text_tokens(row: Mapping[str, Any], side: str, tokenizer) -> int:
    """How many of the response's tokens carry text: all but a final end-of-turn token."""
    ids = row[f"{side}_ids"]
    return len(ids) - 1 if ids and ids[-1] == tokenizer.eos_token_id else len(ids)


class ShuffledSpanRewards(SpanRewards):
    """The oracle's span values moved off their tokens: a window of as many tokens, chosen at
    random (seeded by the response text) among the windows that touch no spanned token; if no
    such window exists, the next unspanned tokens in order from a random start (wrapping
    around). With fewer unspanned tokens than spanned ones, all of them get a value.

    Args:
        seed: Seeds the placement (with the response text: the same response, the same place).
        **kwargs: :class:`SpanRewards`' arguments.
    """

    def __init__(self, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seed = seed

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "transform": "shuffled", "seed": self.seed}

    def response_values(self, row: Mapping[str, Any], side: str, tokenizer) -> np.ndarray:
        oracle = super().response_values(row, side, tokenizer)
        n = text_tokens(row, side, tokenizer)
        marked = np.isfinite(self.response_marks(row, side, tokenizer)[:n])
        k = int(marked.sum())
        if k == 0:
            return oracle
        digest = hashlib.sha256(f"{self.seed}\0{row[side]}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        windows = [i for i in range(n - k + 1) if not marked[i : i + k].any()]
        if windows:
            start = windows[int(rng.integers(len(windows)))]
            targets = np.arange(start, start + k)
        else:
            free = np.flatnonzero(~marked)
            targets = np.roll(free, -int(rng.integers(len(free))))[:k] if free.size else free
        out = oracle.copy()
        out[:n][marked] = self.default
        out[targets] = oracle[:n][marked][: len(targets)]
        return out


class UniformSpanRewards(SpanRewards):
    """The oracle's total over a response's text tokens, spread evenly over all of them:
    ``sum_t r_t / n`` on each (0 where no span is given, as for every chosen response here)."""

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "transform": "uniform"}

    def response_values(self, row: Mapping[str, Any], side: str, tokenizer) -> np.ndarray:
        oracle = super().response_values(row, side, tokenizer)
        n = text_tokens(row, side, tokenizer)
        out = oracle.copy()
        if n:
            out[:n] = oracle[:n].astype(np.float64).sum() / n
        return out


class DenseSignedSpanRewards(SpanRewards):
    """The oracle's span values, and ``positive`` on every text token no span covers, in both
    responses.

    Args:
        positive: The value of the unspanned text tokens, on the (-0.5, 0.5) scale.
        **kwargs: :class:`SpanRewards`' arguments.
    """

    def __init__(self, positive: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 < positive <= 0.5:
            raise ValueError(f"positive must be in (0, 0.5], got {positive}")
        self.positive = float(positive)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "transform": "dense", "positive": self.positive}

    def response_values(self, row: Mapping[str, Any], side: str, tokenizer) -> np.ndarray:
        oracle = super().response_values(row, side, tokenizer)
        n = text_tokens(row, side, tokenizer)
        unspanned = ~np.isfinite(self.response_marks(row, side, tokenizer)[:n])
        out = oracle.copy()
        out[:n][unspanned] = self.positive
        return out
