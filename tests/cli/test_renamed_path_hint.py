"""A config or flag that names a class through a module of an earlier version is refused by the
parser (exit 2, no traceback, nothing loaded) with one hint line giving today's path."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest

from treg_lightning.cli.main import cli_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TODAY = "treg_lightning.module.schedulers.WarmupCosineLR"


def _refused(args: list[str], capsys) -> list[str]:
    with mock.patch.object(sys, "argv", ["treg"]), pytest.raises(SystemExit) as info:
        cli_main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("hint:")]


@pytest.mark.parametrize("old", ["treg_lightning.training.schedulers", "treg_lightning.schedulers"])
def test_config_with_an_old_scheduler_path_gets_the_new_one(old, tmp_path, capsys):
    text = (CONFIGS / "demo.yaml").read_text()
    assert TODAY in text
    config = tmp_path / "old.yaml"
    config.write_text(text.replace(TODAY, f"{old}.WarmupCosineLR"))
    hints = _refused(["fit", f"--config={config}"], capsys)
    assert hints == [
        f"hint: a module path of an earlier version: `{old}.WarmupCosineLR` is now `{TODAY}`; "
        "write the new one."
    ]


def test_flag_with_an_old_class_path_gets_the_new_module(capsys):
    args = [
        "fit",
        f"--config={CONFIGS / 'demo.yaml'}",
        "--model.quantization=treg_lightning.adapters.QLoRA",
    ]
    hints = _refused(args, capsys)
    assert hints == [
        "hint: a module path of an earlier version: `treg_lightning.adapters.QLoRA` is now "
        "`treg_lightning.models.adapters.QLoRA`; write the new one."
    ]


def test_a_bad_path_of_no_earlier_version_gets_no_hint(capsys):
    args = ["fit", f"--config={CONFIGS / 'demo.yaml'}", "--model.scheduler=treg_lightning.nope.X"]
    assert _refused(args, capsys) == []
