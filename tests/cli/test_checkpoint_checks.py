"""Broken and foreign `--ckpt_path`s: each refused at start-up (before any model loads) with a
message naming the file and what to do, never torch's advice to set `weights_only=False`."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

from builders import no_model_load, one_step_fit_args
from treg_lightning.cli.main import TRegCLI, cli_main
from treg_lightning.models.checkpoints import (
    check_checkpoint_file,
    check_checkpoint_fits,
    policy_shapes,
)


class NotATensor:
    """An object a pickle may hold but weights_only loading refuses."""


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> Path:
    """A real checkpoint of a 1-step `treg fit` on the tiny model."""
    root = tmp_path_factory.mktemp("trained")
    with mock.patch.object(sys, "argv", ["treg"]):
        cli = TRegCLI(args=["fit", *one_step_fit_args(tiny_model_dir, root)])
    return Path(cli.trainer.checkpoint_callback.best_model_path)


def refused(subcommand: str, ckpt: Path, model_dir: Path, root: Path, capsys) -> str:
    """`treg SUBCOMMAND --ckpt_path CKPT`: exit 2, nothing loaded or written; the message."""
    out = root / "exported"
    extra = [f"--output.path={out}"] if subcommand == "export" else []
    args = [subcommand, *one_step_fit_args(model_dir, root), f"--ckpt_path={ckpt}", *extra]
    with (
        no_model_load("treg_lightning.module.PreferenceModule.build_policy"),
        mock.patch.object(sys, "argv", ["treg"]),
        pytest.raises(SystemExit) as info,
    ):
        cli_main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert "weights_only" not in err  # never torch's advice to unpickle untrusted files
    assert not out.exists() and not list(root.glob("lightning_logs"))
    return err.strip().splitlines()[-1].removeprefix("error: ")


def _truncate(src: Path, dest: Path) -> Path:
    dest.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dest


@pytest.mark.parametrize("subcommand", ["export", "validate", "fit"])
def test_empty_file(subcommand, tiny_model_dir, tmp_path, capsys):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"")
    message = refused(subcommand, ckpt, tiny_model_dir, tmp_path, capsys)
    assert message.startswith(
        f"--ckpt_path {ckpt} is empty (0 bytes): the run that wrote it was stopped while saving, "
        "or the disk was full. Use another checkpoint"
    )


def test_truncated_file(trained, tiny_model_dir, tmp_path, capsys):
    ckpt = _truncate(trained, tmp_path / "cut.ckpt")
    message = refused("export", ckpt, tiny_model_dir, tmp_path, capsys)
    assert message.startswith(f"--ckpt_path {ckpt} is truncated (")
    assert "its end is missing" in message


@pytest.mark.parametrize("subcommand", ["export", "fit"])
def test_text_file(subcommand, tiny_model_dir, tmp_path, capsys):
    ckpt = tmp_path / "notes.ckpt"
    ckpt.write_text("epoch 3 looked best\n")
    message = refused(subcommand, ckpt, tiny_model_dir, tmp_path, capsys)
    assert message.startswith(f"--ckpt_path {ckpt} is a text file, not a checkpoint.")


def test_pickle_with_python_objects(tiny_model_dir, tmp_path, capsys):
    ckpt = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {}, "extra": NotATensor()}, ckpt)
    message = refused("export", ckpt, tiny_model_dir, tmp_path, capsys)
    assert message.startswith(
        f"--ckpt_path {ckpt} holds Python objects other than tensors and plain values, so it is "
        "refused: unpickling them could run code from the file."
    )


def test_hugging_face_state_dict_instead_of_a_checkpoint(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "weights.ckpt"
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(), ckpt)
    message = refused("export", ckpt, tiny_model_dir, tmp_path, capsys)
    assert message.startswith(
        f"--ckpt_path {ckpt} is not a Lightning checkpoint: it has no 'state_dict' (it holds "
        "['lm_head.weight', 'model.embed_tokens.weight'"
    )


def test_checkpoint_of_another_lightning_module(tiny_model_dir, tmp_path, capsys):
    ckpt = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2, 2)}, "epoch": 0}, ckpt)
    message = refused("export", ckpt, tiny_model_dir, tmp_path, capsys)
    assert message.startswith(
        f"--ckpt_path {ckpt} holds no policy weights: it was not written by treg-lightning's "
        "PreferenceModule (its weights start with ['encoder'])."
    )


def test_checkpoint_of_another_model(trained, tiny_model_dir, tmp_path, capsys):
    checkpoint = torch.load(trained, weights_only=True)
    key = "policy.model.embed_tokens.weight"
    rows, width = checkpoint["state_dict"][key].shape
    checkpoint["state_dict"][key] = torch.zeros(rows, width * 2)  # another hidden size
    checkpoint.pop("hyper_parameters")  # else its own model.model would be used
    ckpt = tmp_path / "other-model.ckpt"
    torch.save(checkpoint, ckpt)
    message = refused("export", ckpt, tiny_model_dir, tmp_path, capsys)
    assert message == (
        f"--ckpt_path {ckpt} was written for another model than model.model={tiny_model_dir} "
        f"(e.g. model.embed_tokens.weight has shape [{rows}, {width * 2}] in the checkpoint but "
        f"[{rows}, {width}] in {tiny_model_dir}). Use the config of the run that wrote it (its "
        "model.model), or a checkpoint of this model."
    )


def test_folder_without_metadata(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "ckpt-folder"
    folder.mkdir()
    (folder / "__0_0.distcp").write_bytes(b"\0" * 16)
    message = refused("export", folder, tiny_model_dir, tmp_path, capsys)
    assert message.startswith(
        f"--ckpt_path {folder} is a folder but not a sharded (torch.distributed.checkpoint) "
        "checkpoint: it has no .metadata file."
    )


def test_folder_with_damaged_metadata(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "ckpt-folder"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"cut")
    message = refused("validate", folder, tiny_model_dir, tmp_path, capsys)
    assert message.startswith(f"--ckpt_path {folder} has a damaged .metadata file (")


def _sharded_checkpoint(folder: Path, policy: dict) -> Path:
    """A torch.distributed.checkpoint folder laid out as ModelParallelStrategy writes it."""
    import torch.distributed.checkpoint as dcp

    state = {
        "state_dict": {f"policy.{k}": v for k, v in policy.items()},
        "optimizer_0": {
            "state": {f"policy.{k}": {"exp_avg": v.clone()} for k, v in policy.items()}
        },
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group": one process writes it all
        dcp.save(state, checkpoint_id=str(folder))
    return folder


def test_sharded_folder_of_another_model(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    good = _sharded_checkpoint(tmp_path / "good", policy)
    from treg_lightning.module import PreferenceModule

    check_checkpoint_fits(good, PreferenceModule(str(tiny_model_dir)))
    assert set(policy_shapes(good)) == set(policy)  # the optimizer's moments are not weights
    rows, width = policy["lm_head.weight"].shape
    policy["lm_head.weight"] = torch.zeros(rows + 8, width)  # another vocabulary
    other = _sharded_checkpoint(tmp_path / "other", policy)
    message = refused("export", other, tiny_model_dir, tmp_path, capsys)
    assert message.startswith(
        f"--ckpt_path {other} was written for another model than model.model={tiny_model_dir} "
        f"(e.g. lm_head.weight has shape [{rows + 8}, {width}] in the checkpoint but "
        f"[{rows}, {width}] in {tiny_model_dir})."
    )


def test_missing_file(tiny_model_dir, tmp_path, capsys):
    ckpt = tmp_path / "nope" / "last.ckpt"
    message = refused("export", ckpt, tiny_model_dir, tmp_path, capsys)
    assert message.startswith(f"--ckpt_path {ckpt} does not exist: give the .ckpt file")


def test_a_good_checkpoint_passes_both_checks(trained, tiny_model_dir):
    from treg_lightning.module import PreferenceModule

    check_checkpoint_file(trained)
    check_checkpoint_fits(trained, PreferenceModule(str(tiny_model_dir)))
