"""`treg export` writes a Hugging Face model card: README.md with YAML metadata the Hub reads,
the loss and regularizer settings, the data, the run's final metrics and the library version."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

import treg_lightning
from builders import tiny_fit_args, write_pairs
from treg_lightning.cli.main import TRegCLI, cli_main
from treg_lightning.training.model_card import card_metadata, hub_id, model_card, read_front_matter

SIMPO = "treg_lightning.losses.SimPOLoss"


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(export folder, metrics.csv, pairs file) of a 2-step CSV-logged fit, then `treg export`."""
    root = tmp_path_factory.mktemp("card")
    data = write_pairs(root / "pairs.jsonl", n=4)
    args = tiny_fit_args(tiny_model_dir, data, root, "--model.loss.beta=2.5", logger="csv")
    args += ["--trainer.max_steps=2", "--trainer.log_every_n_steps=1"]
    with mock.patch.object(sys, "argv", ["treg"]):
        cli = TRegCLI(args=["fit", *args])
    ckpt = Path(cli.trainer.checkpoint_callback.best_model_path)
    out = root / "policy"
    with mock.patch.object(sys, "argv", ["treg"]):
        cli_main(["export", *args, f"--ckpt_path={ckpt}", f"--output_dir={out}"])
    return out, Path(cli.trainer.logger.log_dir) / "metrics.csv", data


def test_front_matter_parses_and_holds_the_values(exported, tiny_model_dir):
    out, _, _ = exported
    metadata = read_front_matter(out / "README.md")
    assert metadata["library_name"] == "transformers"
    assert metadata["tags"] == ["treg-lightning", "preference-optimization", "simpo"]
    assert "base_model" not in metadata  # a local folder is no Hub id
    assert "datasets" not in metadata  # nor a local pairs file


def test_body_names_the_settings_data_metrics_and_version(exported):
    out, metrics_csv, data = exported
    text = (out / "README.md").read_text()
    assert "- Loss: `SimPOLoss` (" in text and "`beta=2.5`" in text
    assert "- Regularizer: `TokenRewardRegularizer` (" in text and "`alpha=0.0`" in text
    assert f"- Training pairs: `{data}`" in text
    assert f"Written by treg-lightning {treg_lightning.__version__}." in text
    with metrics_csv.open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/loss_step")]
    assert len(rows) == 2
    assert f"| train/loss_step | {float(rows[-1]['train/loss_step']):.6g} |" in text


def test_hub_ids_are_named_in_the_metadata():
    module = SimpleNamespace(
        hparams={
            "loss": {"class_path": "treg_lightning.losses.DPOLoss"},
            "regularizer": {"class_path": "x.TokenRewardRegularizer", "init_args": {"alpha": 0.5}},
        },
        model_name="smollm2",
        peft=object(),
    )
    metadata = card_metadata(module, "Anthropic/hh-rlhf")
    assert metadata == {
        "library_name": "transformers",
        "tags": ["treg-lightning", "preference-optimization", "dpo", "treg", "lora"],
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "datasets": ["Anthropic/hh-rlhf"],
    }
    assert hub_id("demo") is None and hub_id("./pairs.jsonl") is None
    text = model_card(module, "Anthropic/hh-rlhf", {}, adapter_only=True)
    assert "No metrics.csv of the run was found" in text
    assert "PeftModel.from_pretrained(base" in text
