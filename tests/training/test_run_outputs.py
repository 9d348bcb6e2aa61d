"""Nothing a user had is overwritten: each run's policy and heat map live in its own version
folder (and the printed paths are that run's), an output that exists is refused at start-up
unless overwriting is asked for, and `treg export` refuses a non-empty folder."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from builders import exporting_fit_args, no_model_load
from treg_lightning.cli.main import cli_main


def treg(args: list[str]) -> None:
    with mock.patch.object(sys, "argv", ["treg"]):
        assert cli_main(args) is None


def treg_refused(args: list[str], capsys) -> str:
    """Exit status 2 before any model loads; returns the message."""
    with (
        no_model_load(),
        mock.patch.object(sys, "argv", ["treg"]),
        pytest.raises(SystemExit) as info,
    ):
        cli_main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1].removeprefix("error: ")


def printed_outputs(out: str) -> dict[str, str]:
    lines = out[out.index("Outputs:") :].splitlines()[1:]
    return dict(line.strip().split("  ", 1) for line in lines if line.startswith("  "))


def test_two_runs_sharing_a_root_keep_both_outputs(tiny_model_dir, tmp_path, capsys, recwarn):
    runs = []
    for lr in (0.01, 0.02):
        treg(exporting_fit_args(tiny_model_dir, tmp_path, f"--model.optimizer.lr={lr}"))
        runs.append({k: v.strip() for k, v in printed_outputs(capsys.readouterr().out).items()})
    # The start-up checks create nothing inside the new version folder before the logger does.
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]
    logs = tmp_path / "lightning_logs"
    for version, printed in enumerate(runs):
        folder = logs / f"version_{version}"
        assert printed["policy (Hugging Face folder)"] == str(folder / "policy")
        assert printed["token-reward heat map"] == str(folder / "token_rewards.html")
        assert printed["logs (metrics, config)"] == str(folder)
        assert (folder / "policy" / "model.safetensors").is_file()
        card = (folder / "policy" / "README.md").read_text()  # the model card, with metrics
        assert card.startswith("---\nlibrary_name: transformers\n") and "| train/loss" in card
        assert (folder / "token_rewards.html").is_file() and (folder / "metrics.csv").is_file()
    from safetensors.torch import load_file

    first, second = (load_file(logs / f"version_{v}/policy/model.safetensors") for v in (0, 1))
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first)  # two runs, two policies


def test_explicit_export_dir_holding_files_is_refused_at_start_up(tiny_model_dir, tmp_path, capsys):
    export_dir = tmp_path / "policy"
    export_dir.mkdir()
    (export_dir / "config.json").write_text("{}")
    args = exporting_fit_args(
        tiny_model_dir, tmp_path, f"--trainer.callbacks.export_dir={export_dir}"
    )
    message = treg_refused(args, capsys)
    assert message == (
        f"{export_dir} (ExportOnFitEnd export_dir) already holds 1 entries (e.g. config.json); "
        "writing there would replace files of an earlier run. Choose a new or empty folder, or "
        "set ExportOnFitEnd overwrite: true to replace them."
    )
    assert (export_dir / "config.json").read_text() == "{}"
    assert not (tmp_path / "lightning_logs").exists()  # nothing trained


def test_existing_heat_map_is_refused_unless_overwrite(tiny_model_dir, tmp_path, capsys):
    heatmap = tmp_path / "map.html"
    heatmap.write_text("mine")
    args = exporting_fit_args(
        tiny_model_dir,
        tmp_path,
        "--trainer.callbacks.export_dir=null",
        f"--trainer.callbacks.heatmap_path={heatmap}",
    )
    message = treg_refused(args, capsys)
    assert message.startswith(f"{heatmap} (ExportOnFitEnd heatmap_path) already exists;")
    assert heatmap.read_text() == "mine"
    treg([*args, "--trainer.callbacks.overwrite=true"])
    assert heatmap.read_text().startswith("<")  # replaced, as asked


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("export")
    args = exporting_fit_args(
        tiny_model_dir,
        root,
        "--data.rewards=null",
        "--model.regularizer.alpha=0",
        "--trainer.callbacks.export_dir=null",
    )
    with mock.patch.object(sys, "argv", ["treg"]):
        cli_main(args)
    (ckpt,) = root.glob("lightning_logs/version_0/checkpoints/*.ckpt")
    export_args = [a for a in args[1:] if not a.startswith("--trainer.callbacks")]
    return ckpt, ["export", *export_args, f"--ckpt_path={ckpt}"]


def test_export_into_a_non_empty_folder_is_refused(checkpoint, tmp_path, capsys):
    _, args = checkpoint
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    message = treg_refused([*args, f"--output.path={out}"], capsys)
    assert message == (
        f"{out} (--output.path) already holds 1 entries (e.g. notes.txt); writing there would "
        "replace files of an earlier run. Choose a new or empty folder, or set --output.overwrite "
        "to replace them."
    )
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_export_into_an_empty_folder_or_with_overwrite(checkpoint, tmp_path):
    _, args = checkpoint
    out = tmp_path / "empty"
    out.mkdir()
    treg([*args, f"--output.path={out}"])
    assert (out / "model.safetensors").is_file()
    stale = out / "model-00002-of-00002.safetensors"  # a shard of an earlier, larger export
    stale.write_bytes(b"old")
    (out / "notes.txt").write_text("keep me")
    treg([*args, f"--output.path={out}", "--output.overwrite=true"])
    assert (out / "model.safetensors").is_file() and not stale.exists()
    assert (out / "notes.txt").read_text() == "keep me"
