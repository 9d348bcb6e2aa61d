"""Checkpoints written before the regularizer's targets became objects (``token_rewards: self |
sft | implicit``) and before modules moved (``treg_lightning.training.schedulers``) still load:
their hyperparameters are upgraded to today's names, for ``.ckpt`` files and sharded checkpoint
folders alike, under ``treg`` and ``PreferenceModule.load_from_checkpoint``; a name no version
wrote is refused, naming the file."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from builders import one_step_fit_args
from treg_lightning.cli.main import TRegCLI, cli_main
from treg_lightning.losses.targets import ChosenSFT, ImplicitRewards, SelfGeneratedRewards
from treg_lightning.models.renames import upgrade_hparams
from treg_lightning.module import PreferenceModule
from treg_lightning.module.schedulers import WarmupCosineLR

OLD_REGULARIZER = {
    "class_path": "treg_lightning.losses.TokenRewardRegularizer",
    "init_args": {"alpha": 0.5, "weighting": "static", "token_rewards": "sft"},
}
OLD_SCHEDULER = "treg_lightning.training.schedulers.WarmupCosineLR"


@pytest.fixture(scope="module")
def old_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    """A real 1-step checkpoint whose saved regularizer is in the old form."""
    root = tmp_path_factory.mktemp("old")
    with mock.patch.object(sys, "argv", ["treg"]):
        cli = TRegCLI(args=["fit", *one_step_fit_args(tiny_model_dir, root)])
    checkpoint = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert "targets" in hparams["regularizer"]["init_args"]  # today's form
    assert hparams["scheduler"]["class_path"] == "treg_lightning.module.schedulers.WarmupCosineLR"
    hparams["regularizer"] = OLD_REGULARIZER
    hparams["scheduler"] = {**hparams["scheduler"], "class_path": OLD_SCHEDULER}
    path = root / "old.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("old", "target"),
    [("self", SelfGeneratedRewards), ("sft", ChosenSFT), ("implicit", ImplicitRewards)],
)
def test_each_old_name_becomes_its_target_class(old, target):
    hparams = {"loss": {"class_path": "x"}, "regularizer": {**OLD_REGULARIZER}}
    hparams["regularizer"]["init_args"] = {**OLD_REGULARIZER["init_args"], "token_rewards": old}
    upgraded = upgrade_hparams(hparams)
    assert upgraded["regularizer"]["init_args"] == {
        "alpha": 0.5,
        "weighting": "static",
        "targets": {"class_path": f"{target.__module__}.{target.__name__}"},
    }
    assert upgraded["loss"] == {"class_path": "x"}
    assert hparams["regularizer"]["init_args"]["token_rewards"] == old  # the input is not changed


def test_todays_hparams_pass_unchanged():
    hparams = {"regularizer": {"class_path": "r", "init_args": {"targets": {"class_path": "t"}}}}
    assert upgrade_hparams(hparams) == hparams
    assert upgrade_hparams({"regularizer": None}) == {"regularizer": None}


def _validate(ckpt: Path, model_dir: Path, root: Path) -> TRegCLI:
    args = [
        "validate",
        *one_step_fit_args(model_dir, root),
        "--data.val_fraction=0.34",
        f"--ckpt_path={ckpt}",
    ]
    args.remove("--model.regularizer.alpha=0")  # the checkpoint's settings must win
    with mock.patch.object(sys, "argv", ["treg"]):
        return TRegCLI(args=args)


def test_old_ckpt_file_validates_with_its_settings(old_checkpoint, tiny_model_dir, tmp_path):
    cli = _validate(old_checkpoint, tiny_model_dir, tmp_path)
    regularizer = cli.model.regularizer
    assert isinstance(regularizer.targets, ChosenSFT)
    assert (regularizer.alpha, regularizer.weighting) == (0.5, "static")
    assert cli.trainer.callback_metrics["val/loss"].isfinite()
    optimizer = torch.optim.SGD(cli.model.policy.parameters(), lr=0.1)
    assert isinstance(cli.model.scheduler_factory(optimizer), WarmupCosineLR)


def test_old_ckpt_file_loads_without_the_cli(old_checkpoint):
    """``PreferenceModule.load_from_checkpoint`` upgrades the names as the verbs do; a keyword
    argument still overrides the checkpoint."""
    module = PreferenceModule.load_from_checkpoint(old_checkpoint)
    assert isinstance(module.regularizer.targets, ChosenSFT)
    assert module.regularizer.alpha == 0.5
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    assert isinstance(module.scheduler_factory(optimizer), WarmupCosineLR)
    plain = PreferenceModule.load_from_checkpoint(old_checkpoint, regularizer=None)
    assert plain.regularizer is None


def test_old_sharded_folder_meta_is_upgraded(old_checkpoint, tiny_model_dir, tmp_path):
    """A sharded folder's hyperparameters live in meta.pt: the same upgrade applies there (the
    model section is filled before any weight loads, so the folder needs no shards here)."""
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    torch.save({"hyper_parameters": {"regularizer": OLD_REGULARIZER}}, folder / "meta.pt")
    with (
        mock.patch("treg_lightning.models.checkpoints.check_checkpoint_file"),
        mock.patch.object(TRegCLI, "_run_subcommand"),
        mock.patch.object(sys, "argv", ["treg"]),
    ):
        args = ["validate", *one_step_fit_args(tiny_model_dir, tmp_path), f"--ckpt_path={folder}"]
        args.remove("--model.regularizer.alpha=0")  # would contradict the checkpoint's 0.5
        cli = TRegCLI(args=args)
    assert isinstance(cli.model.regularizer.targets, ChosenSFT)
    assert cli.model.regularizer.alpha == 0.5


def test_unknown_old_name_is_refused(old_checkpoint, tiny_model_dir, tmp_path, capsys):
    checkpoint = torch.load(old_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["regularizer"]["init_args"]["token_rewards"] = "oracle"
    ckpt = tmp_path / "odd.ckpt"
    torch.save(checkpoint, ckpt)
    args = ["validate", *one_step_fit_args(tiny_model_dir, tmp_path), f"--ckpt_path={ckpt}"]
    with mock.patch.object(sys, "argv", ["treg"]), pytest.raises(SystemExit) as info:
        cli_main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert f"{ckpt}: its hyperparameters say regularizer.token_rewards='oracle'" in err
