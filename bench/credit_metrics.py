"""Metrics of the credit experiment (``bench/credit.py``): AUROC at the defect tokens and 95%
intervals by a bootstrap over seeds and pairs.

A *record* is one held-out pair under one trained run: ``labels`` (1 on the rejected response's
defect tokens, 0 elsewhere; the end-of-turn token is left out) and per-token ``scores`` of that
response, where a *higher* score should mean *more likely a defect* (e.g. ``-(log pi - log
pi_ref)``, ``-r_hat``). The AUROC pools the tokens of the pairs it is given.
"""

from __future__ import annotations

import numpy as np


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a marked token > score of an unmarked one), ties counted half (Mann-Whitney
    U from average ranks); NaN without both classes."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks of tied groups (1-based)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[labels].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def pooled_auroc(records: list[dict], key: str) -> float:
    if not records:
        return float("nan")
    labels = np.concatenate([r["labels"] for r in records])
    scores = np.concatenate([r[key] for r in records])
    return auroc(labels, scores)


def mean_over(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if np.isfinite(r[key])]
    return float(np.mean(values)) if values else float("nan")


def bootstrap(per_seed: list[list[dict]], statistic, draws: int = 400, seed: int = 0) -> dict:
    """``statistic(records) -> float`` averaged over seeds, with a 95% percentile interval from
    resampling seeds and, inside each, the held-out pairs (the same pair draw for every seed:
    the pairs are shared).

    Args:
        per_seed: one list of records per seed, the same pairs in the same order in each.
        statistic: a function of a list of records.
    """
    point = float(np.nanmean([statistic(records) for records in per_seed]))
    rng = np.random.default_rng(seed)
    n_seeds, n_pairs = len(per_seed), len(per_seed[0])
    values = []
    for _ in range(draws):
        seeds = rng.integers(0, n_seeds, n_seeds)
        pairs = rng.integers(0, n_pairs, n_pairs)
        values.append(np.nanmean([statistic([per_seed[s][p] for p in pairs]) for s in seeds]))
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return {"mean": point, "low": float(low), "high": float(high), "seeds": n_seeds,
            "pairs": n_pairs}  # fmt: skip
