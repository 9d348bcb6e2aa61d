"""The audit: AUROC and precision@k against hand counts and scikit-learn, the other figures on
hand-made rows, and `treg audit` end to end on a tiny model with SpanRewards."""

from __future__ import annotations

import itertools
import json
import math
import sys
from unittest import mock

import numpy as np
import pytest

from builders import tiny_fit_args
from treg_lightning.cli import cli_main
from treg_lightning.rewards.audit import audit_rows, auroc, precision_at_k, spearman


def pairwise_auroc(scores, labels) -> float:
    """AUROC by counting every (positive, negative) pair: 1 if ordered, 1/2 on a tie."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_by_hand():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    # a tie counts one half: (1 vs 1) = 1/2, (2 vs 1) = 1
    assert auroc(np.array([1.0, 1.0, 2.0]), np.array([1, 0, 1])) == 0.75
    assert math.isnan(auroc(np.array([1.0, 2.0]), np.array([1, 1])))


def test_auroc_equals_pairwise_count_and_sklearn():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=200), 1)  # rounded: many ties
    labels = rng.random(200) < 0.3
    ours = auroc(scores, labels)
    assert ours == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)
    sklearn = pytest.importorskip("sklearn.metrics")
    assert ours == pytest.approx(sklearn.roc_auc_score(labels, scores), abs=1e-12)


def test_precision_at_k_by_hand():
    scores = np.array([0.9, 0.1, 0.8, 0.7, 0.2])
    labels = np.array([1, 0, 0, 1, 1])
    assert precision_at_k(scores, labels, 1) == 1.0  # 0.9
    assert precision_at_k(scores, labels, 3) == pytest.approx(2 / 3)  # 0.9 0.8 0.7
    assert precision_at_k(scores, labels, 5) == pytest.approx(3 / 5)


def test_spearman_by_hand():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ranks 1 2 3 4 vs 2 1 4 3: 1 - 6 * 4 / (4 * 15) = 0.6
    assert spearman(a, np.array([2.0, 1.0, 4.0, 3.0])) == pytest.approx(0.6)


NAN = math.nan
ROWS = [
    {  # chosen preferred (mean 0.1 > -0.075); rejected has marks
        "chosen_token_rewards": [0.1, 0.1],
        "rejected_token_rewards": [-0.3, 0.0, 0.2, -0.2],
        "rejected_marks": [-1.0, NAN, NAN, -1.0],
    },
    {  # rejected preferred (mean 0.2 > 0.0025): the disagreeing pair
        "chosen_token_rewards": [0.0, 0.005],
        "rejected_token_rewards": [0.2, 0.2],
        "chosen_marks": [NAN, 1.0],
    },
    {
        "chosen_token_rewards": [0.3],
        "rejected_token_rewards": [0.1, -0.4],
        "rejected_marks": [NAN, -1.0],
    },
]


def test_audit_rows_by_hand():
    result = audit_rows(ROWS, bootstrap=200, seed=1)
    m = {name: v["value"] for name, v in result["metrics"].items()}
    # negative marks vs unmarked in rows 0 and 2: marked -0.3, -0.2, -0.4; unmarked 0.0, 0.2,
    # 0.1: -r_hat of every marked token is above every unmarked one
    assert m["auroc_negative"] == 1.0
    assert m["auroc_positive"] == 1.0  # 0.005 > 0.0 in row 1
    # k = 3 negatively marked tokens; the 3 lowest r_hat are -0.4, -0.3, -0.2: all marked
    assert result["k"] == 3 and m["precision_at_k"] == 1.0
    assert m["negative_share"] == pytest.approx(3 / 8)  # of the 8 annotated-response tokens
    assert m["pair_agreement"] == pytest.approx(2 / 3)
    assert m["near_zero"] == pytest.approx(3 / 13)  # 0.0, 0.0, 0.005 of 13 tokens
    assert result["disagreeing"] == [1]
    assert sum(result["histogram"]["counts"]) == result["tokens"] == 13
    for v in result["metrics"].values():
        assert v["low"] <= v["value"] <= v["high"]
    again = audit_rows(ROWS, bootstrap=200, seed=1)
    assert again == result  # seeded
    json.dumps(result)  # JSON-serializable


def test_second_source_rank_correlation():
    flipped = [
        {k: [-x for x in v] if k.endswith("token_rewards") else v for k, v in row.items()}
        for row in ROWS
    ]
    assert audit_rows(ROWS, second=ROWS, bootstrap=0)["metrics"]["spearman"]["value"] == 1.0
    value = audit_rows(ROWS, second=flipped, bootstrap=0)["metrics"]["spearman"]["value"]
    assert value == pytest.approx(-1.0)


def test_bad_audit_inputs():
    with pytest.raises(ValueError, match="at least one pair"):
        audit_rows([])
    with pytest.raises(ValueError, match="second has 1 pairs"):
        audit_rows(ROWS, second=ROWS[:1])


def test_treg_audit_end_to_end(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"Add {i} and {i}.", "chosen": f"{2 * i} it is.", "rejected": "No, no" * (i + 1),
         "rejected_spans": [{"start": 0, "end": 2, "reward": -1.0}]}
        for i in range(5)
    ]  # fmt: skip
    rows[0]["chosen_spans"] = [{"start": 0, "end": 1, "reward": -1.0}]
    rows[0].pop("rejected_spans")  # pair 0: the rewards prefer the rejected response
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = tiny_fit_args(
        tiny_model_dir, data, tmp_path / "run", alpha=0.1,
        rewards="treg_lightning.rewards.SpanRewards",
    )  # fmt: skip
    args = [a for a in args if not a.startswith("--trainer.max_steps")]
    out = tmp_path / "report"
    args += [
        "--data.rewards.value_range=[-1, 1]",
        f"--data.rewards.cache_dir={tmp_path / 'cache'}",
        f"--output_dir={out}",
        "--bootstrap=50",
    ]
    with mock.patch.object(sys, "argv", ["treg"]):
        cli_main(["audit", *args])
    result = json.loads((out / "audit.json").read_text())
    assert result["pairs"] == 5
    # SpanRewards audited against its own spans: marked tokens -0.5, unmarked 0
    assert result["metrics"]["auroc_negative"]["value"] == 1.0
    assert result["metrics"]["precision_at_k"]["value"] == 1.0
    assert result["metrics"]["pair_agreement"]["value"] == 0.8  # chosen 0 > rejected < 0
    assert result["disagreeing"] == [0]
    assert "AUROC of -r_hat" in (out / "audit.md").read_text()
    assert (out / "audit_histogram.png").is_file() and (out / "audit_disagreeing.png").is_file()
    assert not list((tmp_path / "run").rglob("*.ckpt"))
    before = (out / "audit.json").read_text()
    with mock.patch.object(sys, "argv", ["treg"]), pytest.raises(SystemExit) as info:
        cli_main(["audit", *args])
    assert info.value.code == 2
    assert "audit never writes over a report" in capsys.readouterr().err
    assert (out / "audit.json").read_text() == before
