"""The audit: AUROC and precision@k against hand counts and scikit-learn, the other figures on
hand-made rows, and `treg audit` end to end on a tiny model with SpanRewards."""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from builders import REACHED, no_model_load, tiny_fit_args
from treg_lightning.cli.main import cli_main
from treg_lightning.errors import ConfigError
from treg_lightning.rewards.audit import audit_rows, auroc, markdown, precision_at_k, spearman


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
    assert precision_at_k(scores, labels, 9) == pytest.approx(3 / 5)  # k above n: all tokens
    assert math.isnan(precision_at_k(scores, labels, 0))


def test_precision_at_k_scores_ties_as_ties():
    # k = 2: 0.3 (marked) is in; one of the three tokens tied at 0.1 fills the second place,
    # marked with chance 1/3: (1 + 1/3) / 2
    scores = np.array([0.1, 0.3, 0.1, 0.0, 0.1])
    labels = np.array([0, 1, 1, 0, 0])
    assert precision_at_k(scores, labels, 2) == pytest.approx(2 / 3)
    # a constant score: the share of labels whatever k and wherever the labels sit (a stable sort
    # would give 1.0 for k = 1 here, the first token being labelled)
    for k in (1, 2, 5):
        assert precision_at_k(np.zeros(5), np.array([1, 0, 0, 0, 0]), k) == pytest.approx(0.2)


def expected_precision_by_enumeration(scores, labels, k) -> float:
    """The precision at k averaged over every order of the tokens (all tie-breakings equally
    likely): an independent count of what ``precision_at_k`` computes in closed form."""
    total, count = 0.0, 0
    for order in itertools.permutations(range(len(scores))):
        rank = sorted(order, key=lambda i: -scores[i])  # stable: ties keep the permuted order
        total += sum(labels[i] for i in rank[:k]) / k
        count += 1
    return total / count


def test_precision_at_k_equals_the_average_over_tie_breakings():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(2, 7))
        scores = rng.integers(0, 3, n).astype(float)  # few values: many ties
        labels = rng.random(n) < 0.5
        for k in range(1, n + 1):
            expected = expected_precision_by_enumeration(scores, labels, k)
            assert precision_at_k(scores, labels, k) == pytest.approx(expected, abs=1e-12)


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
    # per response, negative marks vs unmarked: row 0 rejected marked -0.3, -0.2 vs unmarked
    # 0.0, 0.2; row 2 rejected marked -0.4 vs unmarked 0.1: in both every marked token has the
    # lower r_hat, 1.0 each
    assert m["auroc_negative"] == 1.0
    assert m["auroc_positive"] == 1.0  # 0.005 > 0.0 in row 1's chosen response
    # k = each response's number of negatively marked tokens: row 0's 2 lowest are -0.3, -0.2
    # (both marked), row 2's lowest is -0.4 (marked)
    assert result["k"] is None and m["precision_at_k"] == 1.0
    assert m["negative_share"] == pytest.approx((2 / 4 + 1 / 2) / 2)  # per response, then mean
    assert m["pair_agreement"] == pytest.approx(2 / 3)
    assert m["near_zero"] == pytest.approx(3 / 13)  # 0.0, 0.0, 0.005 of 13 tokens
    assert result["disagreeing"] == [1]
    assert sum(result["histogram"]["counts"]) == result["tokens"] == 13
    assert result["metrics"]["auroc_negative"]["pairs"] == 2
    assert result["metrics"]["auroc_negative"]["responses"] == 2
    assert result["metrics"]["auroc_positive"]["pairs"] == 1  # one pair: no interval
    assert result["metrics"]["auroc_positive"]["low"] is None
    for name, v in result["metrics"].items():
        if name != "auroc_positive":
            assert v["low"] <= v["value"] <= v["high"]
    again = audit_rows(ROWS, bootstrap=200, seed=1)
    assert again == result  # seeded
    json.dumps(result)  # JSON-serializable


def pair(rejected, marks, chosen=(0.0,)) -> dict:
    return {"chosen_token_rewards": list(chosen), "rejected_token_rewards": list(rejected),
            "rejected_marks": list(marks)}  # fmt: skip


def test_auroc_is_per_response_so_an_offset_between_responses_counts_for_nothing():
    """The definition in docs/token-rewards.md: a negatively marked token has a lower r_hat
    than an unmarked token *of the same response*. In both responses the marked token has the
    *higher* r_hat: 0.0 each, mean 0.0. Pooling the four tokens would count B's marked token
    (-0.2) below A's unmarked one (0.1) as credit: 1 of the 4 (marked, unmarked) pairs, 0.25."""
    rows = [pair([0.1, 0.2], [NAN, -1.0]), pair([-0.3, -0.2], [NAN, -1.0])]
    result = audit_rows(rows, bootstrap=0)
    assert result["metrics"]["auroc_negative"]["value"] == 0.0
    pooled = auroc(np.array([-0.1, -0.2, 0.3, 0.2]), np.array([0, 1, 0, 1]))
    assert pooled == 0.25  # what a pooled figure would have said
    # the precision at k = 1 per response: the lowest token of each is unmarked
    assert result["metrics"]["precision_at_k"]["value"] == 0.0


def test_a_constant_source_scores_chance_exactly():
    # response A: 5 tokens, the first marked; response B: 2 tokens, the first marked. A stable
    # ranking would put the marked first tokens on top (precision 1.0).
    rows = [pair([0.0] * 5, [-1.0, NAN, NAN, NAN, NAN]), pair([0.0] * 2, [-1.0, NAN])]
    m = audit_rows(rows, bootstrap=0)["metrics"]
    assert m["auroc_negative"]["value"] == 0.5
    chance = (1 / 5 + 1 / 2) / 2
    assert m["negative_share"]["value"] == pytest.approx(chance)
    assert m["precision_at_k"]["value"] == pytest.approx(chance)
    for k in (1, 2, 3):
        m = audit_rows(rows, bootstrap=0, k=k)["metrics"]
        assert m["precision_at_k"]["value"] == pytest.approx(chance)


def test_per_response_auroc_equals_sklearn_per_response():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    rows, expected = [], []
    for i in range(12):
        n = int(rng.integers(4, 15))
        rewards = np.round(rng.normal(size=n) + (i % 3), 1)  # offsets between responses, ties
        marks = np.where(rng.random(n) < 0.3, -1.0, NAN)
        marks[0], marks[1] = -1.0, NAN  # both classes in every response
        if i % 4 == 0:
            marks[2] = 0.0  # marked 0: in neither class
        rows.append(pair(rewards, marks))
        keep = np.isnan(marks) | (marks < 0)
        expected.append(sklearn.roc_auc_score(marks[keep] < 0, -rewards[keep]))
    value = audit_rows(rows, bootstrap=0)["metrics"]["auroc_negative"]["value"]
    assert value == pytest.approx(float(np.mean(expected)), abs=1e-12)
    per_row = [audit_rows([row], bootstrap=0)["metrics"]["auroc_negative"]["value"] for row in rows]
    assert per_row == pytest.approx(expected, abs=1e-12)


def test_intervals_only_over_more_than_one_pair():
    one = [pair([0.1, -0.4], [NAN, -1.0])]
    result = audit_rows(one, bootstrap=100)
    for m in result["metrics"].values():
        assert m["low"] is None and m["high"] is None
    text = markdown(result)
    assert "| 1.000 | n/a |" in text and "[1.000, 1.000]" not in text
    two = one + [pair([0.3, -0.1, 0.2], [NAN, -1.0, NAN])]
    result = audit_rows(two, bootstrap=100)
    assert all(m["low"] is not None for m in result["metrics"].values())
    # no resamples: no intervals, said once in the header
    result = audit_rows(two, bootstrap=0)
    assert all(m["low"] is None for m in result["metrics"].values())
    assert "no intervals (bootstrap 0)" in markdown(result)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ({"k": 0}, "k 0: must be >= 1"),
        ({"k": -3}, "k -3: must be >= 1"),
        ({"near_zero_below": -1.0}, "near_zero_below -1.0: must be >= 0"),
        ({"near_zero_below": math.nan}, "near_zero_below nan: must be >= 0"),
        ({"bootstrap": -5}, "bootstrap -5: must be >= 0"),
        ({"disagreeing": -1}, "disagreeing -1: must be >= 0"),
        ({"bins": 0}, "bins 0: must be >= 1"),
    ],
)
def test_audit_rows_refuses_settings_out_of_range(setting, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        audit_rows(ROWS, **setting)


def test_docs_define_the_figures_as_computed():
    """The audit's reading guide (docs/token-rewards.md) says what these tests count: per
    response, ties one half, a constant source at chance, intervals only over more than one
    pair."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "token-rewards.md").read_text()
    section = page[page.index("## Auditing token rewards") :]
    end = section.find("\n## ", 1)
    section = " ".join((section if end < 0 else section[:end]).split())
    for phrase in (
        "a negatively marked token has a lower `r_hat` than an unmarked token",
        "of the same response",
        "mean over the responses",
        "a tie counts one half",
        "a constant source scores exactly 0.5",
        "tied tokens at the cut are drawn at random",
        "n/a",
    ):
        assert phrase in section, phrase


def test_second_source_rank_correlation():
    flipped = [
        {k: [-x for x in v] if k.endswith("token_rewards") else v for k, v in row.items()}
        for row in ROWS
    ]
    assert audit_rows(ROWS, second=ROWS, bootstrap=0)["metrics"]["spearman"]["value"] == 1.0
    value = audit_rows(ROWS, second=flipped, bootstrap=0)["metrics"]["spearman"]["value"]
    assert value == pytest.approx(-1.0)


def test_bad_audit_inputs():  # (Python API)
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
        f"--output.path={out}",
        "--audit.bootstrap=50",
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
    # --output.overwrite replaces the report as a whole: no heat map asked, none left behind
    with mock.patch.object(sys, "argv", ["treg"]):
        cli_main(["audit", *args, "--output.overwrite=true", "--audit.heatmap_pairs=0"])
    assert json.loads((out / "audit.json").read_text())["disagreeing"] == []
    assert (out / "audit_histogram.png").is_file() and not (out / "audit_disagreeing.png").exists()


# --- `treg audit` refuses bad settings and output folders before the annotate pass ----------


def audit_args(tmp_path, model_dir, *extra: str) -> list[str]:
    data = tmp_path / "pairs.jsonl"
    spans = [{"start": 0, "end": 2, "reward": -1.0}]
    rows = [{"prompt": f"Add {i} and {i}.", "chosen": f"{2 * i}.", "rejected": "No, no",
             "rejected_spans": spans} for i in range(3)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = tiny_fit_args(model_dir, data, tmp_path / "run", alpha=0.1, max_steps=None,
                         rewards="treg_lightning.rewards.SpanRewards")  # fmt: skip
    return [*args, "--data.rewards.value_range=[-1, 1]",
            f"--data.rewards.cache_dir={tmp_path / 'cache'}", *extra]  # fmt: skip


def refused_audit(args: list[str], capsys) -> str:
    """`treg audit ARGS` must exit 2 with one paragraph, before any pair is tokenized
    (the annotate pass starts there) or any model loads; returns stderr."""
    with (
        no_model_load("treg_lightning.data.datamodule.PreferenceDataModule.tokenized_rows"),
        mock.patch.object(sys, "argv", ["treg"]),
        pytest.raises(SystemExit) as info,
    ):
        cli_main(["audit", *args])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err and REACHED.args[0] not in err
    return err


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--audit.heatmap_pairs=-1", "--audit.heatmap_pairs -1: must be >= 0"),
        ("--audit.bootstrap=-5", "--audit.bootstrap -5: must be >= 0 (resamples; 0: no intervals)"),
        ("--audit.precision_k=-3", "--audit.precision_k -3: must be >= 1"),
        ("--audit.precision_k=0", "--audit.precision_k 0: must be >= 1"),
        ("--audit.near_zero_below=-1", "--audit.near_zero_below -1.0: must be >= 0"),
        ("--audit.data_split=valid", "--audit.data_split 'valid': audit one of train, val, test"),
        (
            "--audit.data_split=test",
            "treg audit --audit.data_split test needs test pairs, but none are configured",
        ),
    ],
)
def test_audit_settings_refused_at_start_up(tmp_path, tiny_model_dir, capsys, flag, expected):
    out = tmp_path / "report"
    err = refused_audit(audit_args(tmp_path, tiny_model_dir, f"--output.path={out}", flag), capsys)
    assert expected in err, err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_audit_output_dir_that_is_a_file_is_refused(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "report.md"
    out.write_text("my notes\n")
    err = refused_audit(audit_args(tmp_path, tiny_model_dir, f"--output.path={out}"), capsys)
    assert f"--output.path {out} is a file: the audit writes a folder" in err, err
    assert out.read_text() == "my notes\n" and not (tmp_path / "cache").exists()
    # a folder under that file cannot be created either
    err = refused_audit(audit_args(tmp_path, tiny_model_dir, f"--output.path={out / 'a'}"), capsys)
    assert f"cannot write to {out / 'a'} (--output.path)" in err, err
    assert out.read_text() == "my notes\n"


def refuses_new_entries(folder: Path) -> bool:
    try:
        (folder / "treg-probe").mkdir()
    except OSError:
        return True
    (folder / "treg-probe").rmdir()
    return False


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot create anything in: a chmod 555 folder, or for root (whom
    permissions do not stop) the kernel's /sys, which refuses new entries."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if refuses_new_entries(folder):
            yield folder
        elif Path("/sys").is_dir() and refuses_new_entries(Path("/sys")):
            yield Path("/sys")
        else:
            pytest.skip("no folder here refuses new entries from this user")
    finally:
        folder.chmod(0o755)


def test_audit_output_dir_under_a_read_only_folder_is_refused(
    tmp_path, tiny_model_dir, capsys, read_only_folder
):
    out = read_only_folder / "treg-audit-report"
    err = refused_audit(audit_args(tmp_path, tiny_model_dir, f"--output.path={out}"), capsys)
    assert f"cannot write to {out} (--output.path)" in err, err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_both_responses_of_a_pair_count():
    """A pair whose chosen and rejected responses both carry negative marks gives two responses:
    in the chosen one the marked token has the lowest r_hat (1.0), in the rejected one the
    highest (0.0); the figure is their mean, 0.5, over 2 responses of 1 pair."""
    row = {
        "chosen_token_rewards": [-0.4, 0.1, 0.2],
        "chosen_marks": [-1.0, NAN, NAN],
        "rejected_token_rewards": [0.3, -0.1, 0.0],
        "rejected_marks": [-1.0, NAN, NAN],
    }
    metrics = audit_rows([row], bootstrap=0)["metrics"]
    assert metrics["auroc_negative"]["value"] == 0.5
    assert (metrics["auroc_negative"]["pairs"], metrics["auroc_negative"]["responses"]) == (1, 2)
    # k = 1 per response: the chosen's lowest token is marked (1), the rejected's is not (0)
    assert metrics["precision_at_k"]["value"] == 0.5
