"""Metrics of the credit experiment (``bench/credit.py``), per held-out pair, and paired
differences between variants with a 95% bootstrap interval over seeds and pairs.

A *record* is one held-out pair under one trained run:

- ``labels``: 1 on the rejected response's defect tokens, 0 on its other tokens;
- ``delta``: ``d_t = log pi - log pi_ref`` on the same rejected tokens (what training changed);
- ``chosen_delta``: ``d_t`` on the chosen response's tokens;
- ``margin``: the pair's margin under the variant's loss after training;
- ``kind``, ``seen``: the defect kind and whether training pairs carried that kind.

The end-of-turn token is left out of every array (no text, no defect). Every metric is computed
per pair and then averaged over pairs and seeds, so a long response counts as much as a short one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from treg_lightning.rewards.audit import auroc as audit_auroc


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a marked token > score of an unmarked one), ties counted half: ``treg
    audit``'s AUROC (``treg_lightning.rewards.audit.auroc``); NaN without both classes."""
    return audit_auroc(scores, labels)


def credit_share(delta: np.ndarray, labels: np.ndarray) -> float:
    """Of the log-prob decrease over the rejected response, the share on the defect tokens:
    ``sum_D max(0, -d_t) / sum_R max(0, -d_t)``; NaN when no token was lowered. Chance level
    (a decrease spread evenly) is ``|D| / |R|`` (:func:`chance_share`)."""
    drop = np.maximum(0.0, -np.asarray(delta, np.float64))
    total = drop.sum()
    return float(drop[np.asarray(labels) == 1].sum() / total) if total > 0 else float("nan")


def chance_share(labels: np.ndarray) -> float:
    """``|D| / |R|``: the credit share of a decrease that ignores where the defect is."""
    return float(np.mean(np.asarray(labels) == 1))


def first_defect_drop(delta: np.ndarray, labels: np.ndarray) -> float:
    """``-d_t`` at the first defect token (where the defect becomes visible to the model)."""
    return float(-np.asarray(delta)[int(np.argmax(np.asarray(labels) == 1))])


def defect_drop(delta: np.ndarray, labels: np.ndarray) -> float:
    """``sum_D -d_t``: how far the defect span's log-prob went down, in nats."""
    return float(-np.asarray(delta, np.float64)[np.asarray(labels) == 1].sum())


def rest_change(delta: np.ndarray, labels: np.ndarray) -> float:
    """Mean ``d_t`` over the rejected tokens outside the defect (collateral); NaN if none."""
    rest = np.asarray(delta, np.float64)[np.asarray(labels) == 0]
    return float(rest.mean()) if rest.size else float("nan")


# name -> (function of a record, what it says); higher credit share / AUROC / drops = the
# decrease sits more on the defect; collateral below 0 = other tokens lowered too.
PAIR_METRICS: dict[str, tuple[Callable[[dict], float], str]] = {
    "credit_share": (lambda r: credit_share(r["delta"], r["labels"]),
                     "credit share: sum_D max(0,-d) / sum_R max(0,-d)"),
    "auroc": (lambda r: auroc(r["labels"], -np.asarray(r["delta"])),
              "per-pair AUROC of -d_t at the defect tokens"),
    "first_defect_drop": (lambda r: first_defect_drop(r["delta"], r["labels"]),
                          "-d_t at the first defect token"),
    "defect_drop": (lambda r: defect_drop(r["delta"], r["labels"]),
                    "sum over the defect of -d_t (nats)"),
    "rest_change": (lambda r: rest_change(r["delta"], r["labels"]),
                    "collateral: mean d_t, other rejected tokens"),
    "chosen_change": (lambda r: float(np.mean(r["chosen_delta"])),
                      "collateral: mean d_t, chosen tokens"),
    "accuracy": (lambda r: float(r["margin"] > 0), "held-out accuracy (margin > 0)"),
    "margin": (lambda r: float(r["margin"]), "held-out margin under the loss"),
}  # fmt: skip


def matrix(per_seed: list[list[dict]], metric: Callable[[dict], float]) -> np.ndarray:
    """``[seeds, pairs]`` values of ``metric``; every seed must hold the same pairs in order."""
    ids = [[r["id"] for r in records] for records in per_seed]
    if any(i != ids[0] for i in ids):
        raise ValueError("every seed must score the same held-out pairs in the same order")
    return np.array([[metric(r) for r in records] for records in per_seed], np.float64)


def paired_bootstrap(values: np.ndarray, base: np.ndarray | None = None, draws: int = 2000,
                     seed: int = 0) -> dict:  # fmt: skip
    """Mean of ``values - base`` (``[seeds, pairs]``, the same seed and pair in both) with a
    95% percentile interval: each draw resamples seeds and, for all of them alike, pairs (the
    pairs are shared), and takes the mean over the drawn cells. ``base`` None: the level of
    ``values`` itself. NaN cells (a pair where a metric is undefined) are left out of means."""
    values = np.asarray(values, np.float64)
    diff = values if base is None else values - np.asarray(base, np.float64)
    n_seeds, n_pairs = diff.shape
    point = float(np.nanmean(diff))
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, (draws, n_seeds))
    pairs = rng.integers(0, n_pairs, (draws, n_pairs))
    drawn = diff[seeds[:, :, None], pairs[:, None, :]]  # [draws, seeds, pairs]
    with warnings.catch_warnings():  # a draw of only undefined cells is NaN, left out below
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(drawn.reshape(draws, -1), axis=1)
    low, high = np.nanpercentile(means, [2.5, 97.5])
    return {"mean": point, "low": float(low), "high": float(high), "seeds": n_seeds,
            "pairs": n_pairs}  # fmt: skip
