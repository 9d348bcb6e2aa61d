"""`treg export --output.overwrite` writes into an empty temporary sibling folder and swaps it in
at the end: the folder then holds the new export and no file of the earlier one, whatever kinds
the two are (a full policy, a LoRA policy merged, a LoRA adapter alone), so it always loads; a
user's own files are kept (and named), a user's own README is refused before anything loads; a
failed export leaves the earlier export intact byte for byte."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from builders import no_model_load, refused_before_training, tiny_fit_args, write_pairs
from treg_lightning.cli.main import TRegCLI, cli_main

peft = pytest.importorskip("peft", reason="LoRA exports need peft (the `lora`/`dev` extra)")

LORA = [
    "--model.peft=peft.LoraConfig",
    "--model.peft.r=4",
    "--model.peft.lora_alpha=8",
    "--model.peft.target_modules=[q_proj,v_proj]",
]


def args_for(model_dir: Path, root: Path, *extra: str) -> list[str]:
    return tiny_fit_args(model_dir, write_pairs(root / "pairs.jsonl", n=4), root, *extra)


def fit(model_dir: Path, root: Path, *extra: str) -> Path:
    """One training step (lr 0.05, so the adapters move off zero); the checkpoint."""
    data = write_pairs(root / "pairs.jsonl", n=4)
    args = tiny_fit_args(model_dir, data, root, *extra, lr=0.05)
    with mock.patch.object(sys, "argv", ["treg"]):
        cli = TRegCLI(args=["fit", *args])
    return Path(cli.trainer.checkpoint_callback.best_model_path)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> Path:
    return fit(tiny_model_dir, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def trained_lora(tiny_model_dir, tmp_path_factory) -> Path:
    return fit(tiny_model_dir, tmp_path_factory.mktemp("trained-lora"), *LORA)


def export(ckpt: Path, model_dir: Path, out: Path, *extra: str) -> None:
    """`treg export` of ``ckpt`` (its settings, LoRA included, come from the checkpoint)."""
    args = ["export", *args_for(model_dir, out.parent), f"--ckpt_path={ckpt}"]
    with mock.patch.object(sys, "argv", ["treg"]):
        cli_main([*args, f"--output.path={out}", *extra])


@pytest.fixture(scope="module")
def kinds(trained, trained_lora) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Each export kind: (checkpoint, extra flags)."""
    return {
        "full": (trained, ()),
        "merged": (trained_lora, ()),
        "adapter": (trained_lora, ("--export.adapter_only=true",)),
    }


@pytest.fixture(scope="module")
def fresh(kinds, tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Each kind exported into a new folder: what the folder must hold after an overwrite."""
    root = tmp_path_factory.mktemp("fresh")
    folders = {}
    for kind, (ckpt, extra) in kinds.items():
        folders[kind] = root / kind
        export(ckpt, tiny_model_dir, folders[kind], *extra)
    return folders


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


def logits(folder: Path, kind: str, base_dir: Path) -> torch.Tensor:
    """The folder loaded the way its kind loads (plain transformers, or peft on the base)."""
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        if kind == "adapter":
            base = AutoModelForCausalLM.from_pretrained(base_dir)
            return peft.PeftModel.from_pretrained(base, folder).eval()(input_ids=ids).logits
        return AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=ids).logits


PAIRS = [(a, b) for a in ("full", "merged", "adapter") for b in ("full", "merged", "adapter")]


@pytest.mark.parametrize(("first", "second"), [p for p in PAIRS if p[0] != p[1]])
def test_overwrite_leaves_no_file_of_the_earlier_kind(
    first, second, kinds, fresh, tiny_model_dir, tmp_path, capsys
):
    """Adapter-only then merged (or full), and back: the folder holds exactly what a new export
    of the second kind writes, plus the user's note, and loads as that kind."""
    out = tmp_path / "policy"
    ckpt, extra = kinds[first]
    export(ckpt, tiny_model_dir, out, *extra)
    (out / "notes.txt").write_text("my notes")
    capsys.readouterr()
    ckpt, extra = kinds[second]
    export(ckpt, tiny_model_dir, out, *extra, "--output.overwrite=true")
    assert "kept your files that no export writes: notes.txt" in capsys.readouterr().out
    assert snapshot(out) == {**snapshot(fresh[second]), "notes.txt": b"my notes"}
    assert siblings(out) == []
    expected = logits(fresh[second], second, tiny_model_dir)
    torch.testing.assert_close(logits(out, second, tiny_model_dir), expected, rtol=0, atol=0)


def test_adapter_files_and_merged_files_are_what_each_kind_writes(fresh):
    """The premise of the test above: the kinds write different files."""
    adapter, merged = set(snapshot(fresh["adapter"])), set(snapshot(fresh["merged"]))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= adapter - merged
    assert {"config.json", "model.safetensors"} <= merged - adapter


def test_user_files_and_folders_are_kept_and_named(earlier, trained, tiny_model_dir, capsys):
    results = earlier / "eval" / "results.json"
    results.parent.mkdir()
    results.write_text('{"win_rate": 0.5}')
    (earlier / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    capsys.readouterr()
    export(trained, tiny_model_dir, earlier, "--output.overwrite=true")
    out = capsys.readouterr().out
    assert "kept your files that no export writes: .gitattributes, eval, notes.txt" in out
    assert (earlier / "notes.txt").read_text() == "my notes"
    assert results.read_text() == '{"win_rate": 0.5}'
    assert (earlier / ".gitattributes").read_text() == "*.safetensors filter=lfs\n"


def test_a_readme_of_the_users_is_refused_before_anything_loads(
    earlier, trained, tiny_model_dir, capsys
):
    """The export writes its model card as README.md: a README that is not one would be lost."""
    (earlier / "README.md").write_text("# My model\nMy own words.\n")
    before = snapshot(earlier)
    with (
        no_model_load("treg_lightning.module.PreferenceModule.build_policy"),
        pytest.raises(SystemExit) as info,
    ):
        export(trained, tiny_model_dir, earlier, "--output.overwrite=true")
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: {earlier / 'README.md'} is not a model card written by treg-lightning (your own "
        "README?): the export writes its model card under that name, so it would be lost. Move "
        f"it out of {earlier}, or choose another --output.path."
    )
    assert snapshot(earlier) == before
    assert siblings(earlier) == []


def test_an_earlier_model_card_is_replaced(earlier, trained, tiny_model_dir):
    card = earlier / "README.md"
    card.write_text(card.read_text() + "\nA line I added.\n")
    export(trained, tiny_model_dir, earlier, "--output.overwrite=true")
    assert "A line I added." not in card.read_text()
    assert card.read_text().rstrip().endswith(".")


def test_output_dir_that_is_a_file_is_refused(trained, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "policy"
    out.write_text("a file of mine")
    with pytest.raises(SystemExit) as info:
        export(trained, tiny_model_dir, out, "--output.overwrite=true")
    assert info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"error: cannot write to {out} (--output.path): File exists.")
    assert out.read_text() == "a file of mine"
    from treg_lightning.errors import ConfigError
    from treg_lightning.models.save import staged_folder

    with pytest.raises(ConfigError, match=r"\(--output.path\) is a file, not a folder"):
        with staged_folder(out):  # the same check for a Python caller
            pass
    assert out.read_text() == "a file of mine"


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
        export(trained, tiny_model_dir, earlier, "--output.overwrite=true")
    assert snapshot(earlier) == before
    assert siblings(earlier) == []  # the temporary folder is gone


def test_export_failing_its_checks_leaves_the_earlier_export(
    earlier, trained, tiny_model_dir, capsys
):
    before = snapshot(earlier)
    with pytest.raises(SystemExit) as info:  # adapter_only, but the run has no LoRA adapters
        export(trained, tiny_model_dir, earlier, "--output.overwrite=true",
               "--export.adapter_only=true")  # fmt: skip
    assert info.value.code == 2
    assert "adapter_only writes the LoRA adapter alone" in capsys.readouterr().err
    assert snapshot(earlier) == before
    assert siblings(earlier) == []


def test_finished_overwrite_replaces_the_weights_and_keeps_other_files(
    earlier, trained, tiny_model_dir
):
    stale = earlier / "model-00002-of-00002.safetensors"  # a shard of another, larger export
    stale.write_bytes(b"another model")
    export(trained, tiny_model_dir, earlier, "--output.overwrite=true")
    assert not stale.exists()
    assert (earlier / "notes.txt").read_text() == "my notes"
    assert siblings(earlier) == []
    state = torch.load(trained, weights_only=True)["state_dict"]
    written = load_file(earlier / "model.safetensors")
    key = "model.embed_tokens.weight"
    torch.testing.assert_close(written[key], state[f"policy.{key}"], rtol=0, atol=0)


def test_export_on_fit_end_failing_leaves_the_earlier_export(tiny_model_dir, tmp_path):
    """ExportOnFitEnd with overwrite: true stages its export the same way."""
    from builders import exporting_fit_args

    export_dir = tmp_path / "policy"
    export_dir.mkdir()
    (export_dir / "model.safetensors").write_bytes(b"the earlier export")
    args = exporting_fit_args(
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


def test_export_on_fit_end_refuses_a_readme_of_the_users_at_start_up(
    tiny_model_dir, tmp_path, capsys
):
    from builders import exporting_fit_args

    export_dir = tmp_path / "policy"
    export_dir.mkdir()
    (export_dir / "README.md").write_text("# Mine\n")
    args = exporting_fit_args(
        tiny_model_dir,
        tmp_path,
        f"--trainer.callbacks.export_dir={export_dir}",
        "--trainer.callbacks.overwrite=true",
    )
    err = refused_before_training(args, capsys)
    assert err.strip().splitlines()[-1] == (
        f"error: {export_dir / 'README.md'} is not a model card written by treg-lightning (your "
        "own README?): the export writes its model card under that name, so it would be lost. "
        f"Move it out of {export_dir}, or choose another ExportOnFitEnd export_dir."
    )
    assert (export_dir / "README.md").read_text() == "# Mine\n"
