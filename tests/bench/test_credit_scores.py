"""bench/credit_metrics.py, credit_report.py and credit_decision.py: the per-pair metrics, the
paired bootstrap and the decision rule against hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest

from builders import load_bench


@pytest.fixture(scope="module")
def cm():
    return load_bench("credit_metrics")


# d_t on five rejected tokens, the defect on tokens 0 and 3:
#   drops max(0, -d) = [1, 0.5, 0, 0.5, 0]: 2.0 in all, 1.5 on the defect -> share 0.75;
#   chance |D|/|R| = 2/5; AUROC of -d: defect scores {1, 0.5} vs {0.5, -0.25, -0.1}: 1 beats 3,
#   0.5 ties one and beats 2 -> (3 + 2.5) / 6; first-defect drop 1.0; defect drop 1.5;
#   rest mean (-0.5 + 0.25 + 0.1) / 3 = -0.05.
DELTA = np.array([-1.0, -0.5, 0.25, -0.5, 0.1])
LABELS = np.array([1, 0, 0, 1, 0])


def test_credit_share_and_friends_by_hand(cm):
    assert cm.credit_share(DELTA, LABELS) == pytest.approx(0.75)
    assert cm.chance_share(LABELS) == pytest.approx(0.4)
    assert cm.auroc(LABELS, -DELTA) == pytest.approx(5.5 / 6)
    assert cm.first_defect_drop(DELTA, LABELS) == pytest.approx(1.0)
    assert cm.defect_drop(DELTA, LABELS) == pytest.approx(1.5)
    assert cm.rest_change(DELTA, LABELS) == pytest.approx(-0.05)
    record = {"delta": DELTA, "labels": LABELS, "chosen_delta": np.array([0.2, -0.4]),
              "margin": 0.3}  # fmt: skip
    values = {name: f(record) for name, (f, _) in cm.PAIR_METRICS.items()}
    assert values == pytest.approx({"credit_share": 0.75, "auroc": 5.5 / 6,
                                    "first_defect_drop": 1.0, "defect_drop": 1.5,
                                    "rest_change": -0.05, "chosen_change": -0.1,
                                    "accuracy": 1.0, "margin": 0.3})  # fmt: skip


def test_credit_share_is_undefined_without_a_decrease(cm):
    assert np.isnan(cm.credit_share(np.array([0.1, 0.0, 0.3]), np.array([1, 0, 0])))
    # only the defect lowered: all the credit is there; only the rest lowered: none
    assert cm.credit_share(np.array([-0.2, 0.1]), np.array([1, 0])) == 1.0
    assert cm.credit_share(np.array([0.2, -0.1]), np.array([1, 0])) == 0.0


def test_bootstrap_by_hand(cm):
    """Two seeds, one pair, differences 0.2 and 0.4: resampled means are 0.2, 0.3, 0.4 with
    probabilities 1/4, 1/2, 1/4, so the 2.5th / 97.5th percentiles are 0.2 and 0.4.
    One seed, two pairs with differences 0 and 1: means 0, 0.5, 1 likewise -> [0, 1]."""
    m = cm.paired_bootstrap(np.array([[0.3], [0.5]]), np.array([[0.1], [0.1]]), draws=4000)
    assert m["mean"] == pytest.approx(0.3)
    assert (m["low"], m["high"]) == pytest.approx((0.2, 0.4))
    m = cm.paired_bootstrap(np.array([[0.0, 1.0]]), draws=4000)
    assert (m["mean"], m["low"], m["high"]) == pytest.approx((0.5, 0.0, 1.0))
    # an undefined cell is left out of the means: (1 + 0.5) / 2
    m = cm.paired_bootstrap(np.array([[np.nan, 1.0], [0.5, np.nan]]), draws=200)
    assert m["mean"] == pytest.approx(0.75)


def test_bootstrap_is_paired(cm):
    """A variant that adds exactly 0.1 to every (seed, pair) cell of a noisy baseline: the
    paired difference is 0.1 with a zero-width interval; resampling the two apart would give
    an interval as wide as the baseline's spread."""
    base = np.random.default_rng(0).normal(0.0, 1.0, (5, 40))
    m = cm.paired_bootstrap(base + 0.1, base, draws=500)
    assert m["mean"] == pytest.approx(0.1)
    assert m["low"] == pytest.approx(0.1, abs=1e-12) and m["high"] == pytest.approx(0.1, abs=1e-12)


def test_matrix_refuses_seeds_with_other_pairs(cm):
    a = [{"id": "x", "v": 1.0}, {"id": "y", "v": 2.0}]
    assert cm.matrix([a, a], lambda r: r["v"]).tolist() == [[1.0, 2.0], [1.0, 2.0]]
    with pytest.raises(ValueError, match="same held-out pairs"):
        cm.matrix([a, a[::-1]], lambda r: r["v"])


def test_report_tables_pair_each_seed_and_pair_with_dpo():
    """Two seeds x two pairs; the oracle's credit share minus DPO's per cell, by hand:
    DPO shares: seed 0 (0.5, 0.0), seed 1 (0.25, 1.0); oracle: (0.75, 0.5), (0.25, 1.0);
    differences (0.25, 0.5), (0.0, 0.0): mean 0.1875. Seen kinds only in pair 0."""
    report = load_bench("credit_report")

    def record(pair: int, delta, chosen=(0.0,)):
        return {"id": f"p{pair}", "kind": "insult" if pair == 0 else "irrelevant",
                "seen": pair == 0, "labels": np.array([1, 0]), "delta": np.array(delta),
                "chosen_delta": np.array(chosen), "margin": 0.1, "margin_before": 0.0}  # fmt: skip

    dpo = [[record(0, [-1.0, -1.0]), record(1, [0.5, -2.0])],
           [record(0, [-1.0, -3.0]), record(1, [-1.0, 0.0])]]  # fmt: skip
    oracle = [[record(0, [-3.0, -1.0]), record(1, [-1.0, -1.0])],
              [record(0, [-1.0, -3.0]), record(1, [-2.0, 0.5])]]  # fmt: skip
    table = report.tables({report.BASE: dpo, report.ORACLE: oracle}, draws=300)
    paired = table["paired"][report.ORACLE]
    assert paired["all"]["credit_share"]["mean"] == pytest.approx(0.1875)
    assert paired["seen"]["credit_share"]["mean"] == pytest.approx(0.125)  # (0.25 + 0) / 2
    assert paired["unseen"]["credit_share"]["mean"] == pytest.approx(0.25)  # (0.5 + 0) / 2
    assert table["levels"][report.BASE]["all"]["credit_share"]["mean"] == pytest.approx(0.4375)
    assert table["chance"]["all"]["mean"] == pytest.approx(0.5)
    assert table["decision"] is None  # the controls were not run


@pytest.mark.parametrize(
    ("oracle", "uniform", "shuffled", "verdict"),
    [
        ((0.05, 0.01, 0.09), (0.02, 0.001, 0.04), (-0.05, -0.08, -0.02), "supported"),
        # as large, but the uniform control does as well: push, not location
        ((0.08, 0.03, 0.12), (0.0, -0.02, 0.02), (-0.05, -0.08, -0.02), "undecided"),
        ((0.049, 0.01, 0.09), (0.02, 0.001, 0.04), (-0.05, -0.08, -0.02), "undecided"),
        ((0.0, -0.02, 0.02), (0.0, -0.01, 0.01), (-0.05, -0.08, -0.02), "refuted"),
        ((-0.04, -0.07, -0.01), (0.0, -0.01, 0.01), (0.03, 0.01, 0.05), "refuted"),
        ((0.0, -0.02, 0.021), (0.0, -0.01, 0.01), (-0.05, -0.08, -0.02), "undecided"),
        ((0.0, -0.02, 0.02), (0.0, -0.01, 0.01), (-0.01, -0.03, 0.01), "inconclusive"),
    ],
)
def test_decision_rule(oracle, uniform, shuffled, verdict):
    decide = load_bench("credit_decision").decide

    def interval(t):
        return dict(zip(("mean", "low", "high"), t, strict=True))

    got = decide(interval(oracle), interval(uniform), interval(shuffled))
    assert got["verdict"] == verdict
    assert f"{oracle[0]:+.3f}" in got["why"]
