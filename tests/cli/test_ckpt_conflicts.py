"""`--ckpt_path` with model settings that contradict the checkpoint's: refused at start-up by
every verb, naming the flag's value and the checkpoint's; nothing loaded, trained or written."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest

from builders import refused_before_training, tiny_fit_args, write_pairs
from treg_lightning.cli.ckpt_conflicts import conflicting_settings, flatten, keep_given_locations
from treg_lightning.cli.main import TRegCLI

SIMPO = "treg_lightning.losses.SimPOLoss"
DPO = "treg_lightning.losses.DPOLoss"


def args_for(model_dir: Path, root: Path, **keywords) -> list[str]:
    data = write_pairs(root / "pairs.jsonl", n=4)
    return tiny_fit_args(model_dir, data, root, **keywords)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> Path:
    """A checkpoint of a 1-step `treg fit`: SimPO (beta 2.0 by default), regularizer alpha 0."""
    root = tmp_path_factory.mktemp("trained")
    with mock.patch.object(sys, "argv", ["treg"]):
        cli = TRegCLI(args=["fit", *args_for(tiny_model_dir, root, loss=SIMPO)])
    return Path(cli.trainer.checkpoint_callback.best_model_path)


def refused(args: list[str], root: Path, capsys) -> str:
    """`treg ARGS`: exit 2 with no traceback, no model loaded, nothing written under root."""
    before = sorted(p.name for p in root.iterdir())
    err = refused_before_training(args, capsys)
    assert sorted(p.name for p in root.iterdir()) == before  # no logs, checkpoints or export
    return err.strip().splitlines()[-1].removeprefix("error: ")


def test_fit_with_another_loss_is_refused(trained, tiny_model_dir, tmp_path, capsys):
    args = ["fit", *args_for(tiny_model_dir, tmp_path, loss=DPO), f"--ckpt_path={trained}"]
    message = refused(args, tmp_path, capsys)
    assert message == (
        f"--ckpt_path {trained} was trained with other model settings than the ones given: "
        f"--model.loss.class_path={DPO} but the checkpoint has {SIMPO}. A checkpoint's settings "
        "cannot be changed by a flag (the run would silently use the checkpoint's): drop "
        "--model.loss.class_path (from the command line or the --config file) to use the "
        "checkpoint's settings, or start a new run without --ckpt_path."
    )


def test_fit_with_another_loss_argument_is_refused(trained, tiny_model_dir, tmp_path, capsys):
    extra = ["--model.loss.beta=7.5", f"--ckpt_path={trained}"]
    message = refused(["fit", *args_for(tiny_model_dir, tmp_path), *extra], tmp_path, capsys)
    assert "--model.loss.init_args.beta=7.5 but the checkpoint has 2.0." in message


def test_fit_with_lora_over_a_full_checkpoint_is_refused(trained, tiny_model_dir, tmp_path, capsys):
    extra = ["--model.peft=peft.LoraConfig", "--model.peft.r=4", f"--ckpt_path={trained}"]
    message = refused(["fit", *args_for(tiny_model_dir, tmp_path), *extra], tmp_path, capsys)
    assert "--model.peft" in message and "but the checkpoint has null" in message


def test_validate_with_another_regularizer_is_refused(trained, tiny_model_dir, tmp_path, capsys):
    args = ["validate", *args_for(tiny_model_dir, tmp_path, alpha=0.25), f"--ckpt_path={trained}"]
    message = refused(args, tmp_path, capsys)
    assert "--model.regularizer.init_args.alpha=0.25 but the checkpoint has 0.0." in message


def test_export_with_another_loss_is_refused(trained, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    args = ["export", *args_for(tiny_model_dir, tmp_path, loss=DPO), f"--ckpt_path={trained}"]
    message = refused([*args, f"--output.path={out}"], tmp_path, capsys)
    assert f"--model.loss.class_path={DPO} but the checkpoint has {SIMPO}" in message
    assert not out.exists()


def test_the_checkpoints_own_settings_pass(trained, tiny_model_dir, tmp_path):
    """The same loss and regularizer as the checkpoint's: no conflict, the verb runs."""
    args = ["validate", *args_for(tiny_model_dir, tmp_path, loss=SIMPO), f"--ckpt_path={trained}"]
    args += ["--model.loss.beta=2.0", "--data.val_fraction=0.5"]
    with mock.patch.object(sys, "argv", ["treg"]):
        cli = TRegCLI(args=args)
    assert cli.model.loss.beta == 2.0


def test_unit_conflicts_of_trees_and_lists():
    merged = flatten({"peft": None, "loss": {"class_path": SIMPO, "init_args": {"beta": 2.0}}})
    given = {"peft.init_args.r": 4, "loss.init_args.beta": 2}
    assert conflicting_settings(given, merged) == [("peft.init_args.r", 4, None)]
    saved = flatten({"peft": {"init_args": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}})
    assert conflicting_settings({"peft": None}, saved) == [
        ("peft", None, {"init_args.r": 8, "init_args.target_modules": ["q_proj", "v_proj"]})
    ]
    reordered = {"peft.init_args.target_modules": ["v_proj", "q_proj"]}
    assert conflicting_settings(reordered, saved) == []


def test_a_given_model_folder_is_used(caplog):
    hparams = {"model": "/cluster/smollm2", "loss": {"class_path": SIMPO}}
    kept = keep_given_locations(hparams, {"model": "/laptop/smollm2"}, "x.ckpt")
    assert kept == {"loss": {"class_path": SIMPO}}
    assert "using /laptop/smollm2 (given) instead of /cluster/smollm2" in caplog.text


def test_predict_with_another_loss_is_refused(trained, tiny_model_dir, tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    args = ["predict", *args_for(tiny_model_dir, tmp_path, loss=DPO), f"--ckpt_path={trained}"]
    message = refused([*args, f"--output.path={answers}"], tmp_path, capsys)
    assert f"--model.loss.class_path={DPO} but the checkpoint has {SIMPO}" in message
    assert not answers.exists()
