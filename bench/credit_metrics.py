"""Metrics of the credit experiment (``bench/credit.py``): AUROC at the defect tokens and 95%
intervals by a bootstrap over seeds and pairs.

A *record* is one held-out pair under one trained run: ``labels`` (1 on the rejected response's
defect tokens, 0 elsewhere; the end-of-turn token is left out) and per-token ``scores`` of that
response, where a *higher* score should mean *more likely a defect* (e.g. ``-(log pi - log
pi_ref)``, ``-r_hat``). The AUROC pools the tokens of the pairs it is given.
"""

from __future__ import annotations

import numpy as np

from treg_lightning.rewards.audit import auroc as audit_auroc


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a marked token > score of an unmarked one), ties counted half: ``treg
    audit``'s AUROC (``treg_lightning.rewards.audit.auroc``); NaN without both classes."""
    return audit_auroc(scores, labels)


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
