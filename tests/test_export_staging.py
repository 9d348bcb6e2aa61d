"""`treg export --overwrite` writes into a temporary sibling folder and swaps it in at the end: a
failed export leaves the earlier export intact byte for byte, a finished one replaces it."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from builders import tiny_fit_args, write_pairs
from treg_lightning.cli.main import TRegCLI, cli_main


def args_for(model_dir: Path, root: Path) -> list[str]:
    return tiny_fit_args(model_dir, write_pairs(root / "pairs.jsonl", n=4), root)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    with mock.patch.object(sys, "argv", ["treg"]):
        cli = TRegCLI(args=["fit", *args_for(tiny_model_dir, root)])
    return Path(cli.trainer.checkpoint_callback.best_model_path)


def export(trained: Path, model_dir: Path, out: Path, *extra: str) -> None:
    args = ["export", *args_for(model_dir, out.parent), f"--ckpt_path={trained}"]
    with mock.patch.object(sys, "argv", ["treg"]):
        cli_main([*args, f"--output_dir={out}", *extra])


@pytest.fixture
def earlier(trained, tiny_model_dir, tmp_path) -> Path:
    """An earlier export, with a note of the user's beside it."""
    out = tmp_path / "policy"
    export(trained, tiny_model_dir, out)
    (out / "notes.txt").write_text("my notes")
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("."))


def test_export_failing_mid_write_leaves_the_earlier_export(
    earlier, trained, tiny_model_dir, capsys
):
    before = snapshot(earlier)
    assert "model.safetensors" in before

    def disk_full(policy, output_dir, *args, **kwargs):
        (Path(output_dir) / "model.safetensors").write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, "No space left on device")

    with (
        mock.patch("treg_lightning.models.export.save_pretrained", side_effect=disk_full),
        pytest.raises((SystemExit, OSError)),
    ):
        export(trained, tiny_model_dir, earlier, "--overwrite=true")
    assert snapshot(earlier) == before
    assert siblings(earlier) == []  # the temporary folder is gone


def test_export_failing_its_checks_leaves_the_earlier_export(
    earlier, trained, tiny_model_dir, capsys
):
    before = snapshot(earlier)
    with pytest.raises(SystemExit) as info:  # adapter_only, but the run has no LoRA adapters
        export(trained, tiny_model_dir, earlier, "--overwrite=true", "--adapter_only=true")
    assert info.value.code == 2
    assert "adapter_only writes the LoRA adapter alone" in capsys.readouterr().err
    assert snapshot(earlier) == before
    assert siblings(earlier) == []


def test_finished_overwrite_replaces_the_weights_and_keeps_other_files(
    earlier, trained, tiny_model_dir
):
    stale = earlier / "model-00002-of-00002.safetensors"  # a shard of another, larger export
    stale.write_bytes(b"another model")
    export(trained, tiny_model_dir, earlier, "--overwrite=true")
    assert not stale.exists()
    assert (earlier / "notes.txt").read_text() == "my notes"
    assert siblings(earlier) == []
    state = torch.load(trained, weights_only=True)["state_dict"]
    written = load_file(earlier / "model.safetensors")
    key = "model.embed_tokens.weight"
    torch.testing.assert_close(written[key], state[f"policy.{key}"], rtol=0, atol=0)


def test_export_on_fit_end_failing_leaves_the_earlier_export(tiny_model_dir, tmp_path):
    """ExportOnFitEnd with overwrite: true stages its export the same way."""
    from test_run_outputs import fit_args

    export_dir = tmp_path / "policy"
    export_dir.mkdir()
    (export_dir / "model.safetensors").write_bytes(b"the earlier export")
    args = fit_args(
        tiny_model_dir,
        tmp_path,
        f"--trainer.callbacks.export_dir={export_dir}",
        "--trainer.callbacks.overwrite=true",
    )

    def disk_full(policy, output_dir, *rest, **kwargs):
        (Path(output_dir) / "model.safetensors").write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, "No space left on device")

    with (
        mock.patch("treg_lightning.models.export.save_pretrained", side_effect=disk_full),
        mock.patch.object(sys, "argv", ["treg"]),
        pytest.raises((SystemExit, OSError)),
    ):
        cli_main(args)
    assert snapshot(export_dir) == {"model.safetensors": b"the earlier export"}
    assert siblings(export_dir) == []
