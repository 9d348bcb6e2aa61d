"""`treg test` and `treg validate` end to end through `cli_main` on a checkpoint of the tiny Llama:
the test split is annotated into its own cache folder, and `treg test` on held-out pairs reports
the same metrics, with the same values, as `treg validate` on those pairs."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from unittest import mock

import pytest

from builders import tiny_fit_args, write_pairs
from treg_lightning.cli.main import cli_main

TRAIN = [
    ("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5, surely."),
    ("Name a color.", "Blue.", "A color is a number."),
    ("Say hi.", "Hi!", "No."),
    ("Spell cat.", "C-A-T.", "K-A-T."),
    ("Is ice cold?", "Yes, ice is cold.", "Ice is hot."),
    ("Count to three.", "1, 2, 3.", "1, 3, 2."),
]
HELD_OUT = [
    ("What is 3 * 3?", "9.", "6."),
    ("Opposite of up?", "Down.", "Left."),
    ("Is the sky green?", "No, it is usually blue.", "Yes."),
]


def common_args(model_dir: Path, root: Path) -> list[str]:
    """DPO with contrastive token rewards (the default source) at a constant lr of 0.01."""
    return tiny_fit_args(
        model_dir,
        write_pairs(root / "train.jsonl", rows=TRAIN),
        root,
        "--model.live_reference=false",  # reference log-probs from each split's cache
        "--model.scheduler=null",
        f"--data.rewards.cache_dir={root / 'cache'}",
        loss="treg_lightning.losses.DPOLoss",
        alpha=None,
        lr=0.01,
        rewards=None,
        max_length=64,
        max_prompt_length=32,
        max_steps=None,
        logger=None,
    )


def treg(args: list[str]) -> None:
    with mock.patch.object(sys, "argv", ["treg"]):
        assert cli_main(args) is None


def logged(root: Path, name: str) -> dict[str, float]:
    """The metrics one run logged with CSVLogger under ``root/name``."""
    (path,) = (root / name).rglob("metrics.csv")
    (row,) = list(csv.DictReader(path.read_text().splitlines()))
    return {key: float(value) for key, value in row.items() if value}


def logger(root: Path, name: str) -> list[str]:
    return [
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={root}",
        f"--trainer.logger.name={name}",
    ]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    args = common_args(tiny_model_dir, root)
    treg(["fit", *args, "--trainer.max_steps=3", "--trainer.logger=false"])
    (ckpt,) = (root / "checkpoints").glob("*.ckpt")
    held_out = write_pairs(root / "held_out.jsonl", rows=HELD_OUT)
    return {"root": root, "args": args, "ckpt": ckpt, "held_out": held_out}


def test_test_reports_what_validate_reports_on_the_same_pairs(trained):
    root, args, ckpt, held_out = (trained[k] for k in ("root", "args", "ckpt", "held_out"))
    treg(
        ["test", *args, f"--data.test_source={held_out}", f"--ckpt_path={ckpt}", *logger(root, "t")]
    )
    treg(
        ["validate", *args, f"--data.val_source={held_out}", f"--ckpt_path={ckpt}"]
        + logger(root, "v")
    )
    test, val = logged(root, "t"), logged(root, "v")
    assert {k.removeprefix("test/") for k in test} == {k.removeprefix("val/") for k in val}
    assert {"test/loss", "test/reward_accuracy", "test/margin", "test/treg"} <= set(test)
    for name, value in test.items():
        assert math.isfinite(value), name
        assert value == pytest.approx(val[name.replace("test/", "val/", 1)], rel=1e-6), name
    # Each split has its own complete cache: the test split was annotated, not served train's.
    splits = sorted(p.parent.name.split("-")[0] for p in (root / "cache").glob("*/meta.json"))
    assert splits == ["test", "train", "val"]


def test_test_loads_the_checkpoint(trained):
    """Without --ckpt_path the untrained policy is tested: another loss (3 steps at lr 0.01)."""
    root, args, ckpt, held_out = (trained[k] for k in ("root", "args", "ckpt", "held_out"))
    source = f"--data.test_source={held_out}"
    treg(["test", *args, source, f"--ckpt_path={ckpt}", *logger(root, "trained")])
    treg(["test", *args, source, *logger(root, "untrained")])
    trained, untrained = logged(root, "trained"), logged(root, "untrained")
    # Policy = reference: every DPO margin is 0, the DPO loss -log sigmoid(0) = log 2, and the
    # total loss adds the T-REG term.
    assert untrained["test/margin"] == pytest.approx(0.0, abs=1e-4)
    assert untrained["test/loss"] - untrained["test/treg"] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(trained["test/margin"]) > 1e-3
    assert abs(trained["test/loss"] - untrained["test/loss"]) > 1e-3
