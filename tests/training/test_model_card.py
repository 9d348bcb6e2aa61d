"""`treg export` writes a Hugging Face model card: README.md with YAML metadata the Hub reads,
the loss and regularizer settings, the data the checkpoint was trained on (read from the
checkpoint, not the export's config), the metrics of the exported step (read from the run's
metrics.csv up to the checkpoint's global step, each metric once) and the library version."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

import treg_lightning
from builders import tiny_fit_args, write_pairs
from treg_lightning.cli.main import TRegCLI, cli_main
from treg_lightning.losses import (
    ChosenSFT,
    DPOLoss,
    IPOLoss,
    SimPOLoss,
    TokenRewardRegularizer,
)
from treg_lightning.module import PreferenceModule
from treg_lightning.training.card_metrics import (
    StepMetrics,
    checkpoint_record,
    live_metrics,
    metrics_at_step,
    trained_data,
)
from treg_lightning.training.model_card import (
    card_metadata,
    hub_id,
    metrics_lines,
    model_card,
    read_front_matter,
)

SIMPO = "treg_lightning.losses.SimPOLoss"


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory) -> SimpleNamespace:
    """A CSV-logged fit of 4 steps over 2 epochs (4 pairs, batch 2), a checkpoint every 2 steps
    (global steps 2 and 4), every step logged."""
    root = tmp_path_factory.mktemp("card")
    data = write_pairs(root / "pairs.jsonl", n=4)
    args = tiny_fit_args(
        tiny_model_dir, data, root, "--model.loss.beta=2.5", logger="csv", lr=0.05, max_steps=4
    )
    args += [
        "--trainer.log_every_n_steps=1",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.callbacks.save_top_k=-1",
    ]
    with mock.patch.object(sys, "argv", ["treg"]):
        cli = TRegCLI(args=["fit", *args])
    log_dir = Path(cli.trainer.logger.log_dir)
    ckpts = {int(p.stem.rsplit("=", 1)[-1]): p for p in (log_dir / "checkpoints").glob("*.ckpt")}
    return SimpleNamespace(args=args, data=data, ckpts=ckpts, csv=log_dir / "metrics.csv")


def export_card(run, step: int, out: Path, *extra: str) -> str:
    args = [*run.args, f"--ckpt_path={run.ckpts[step]}", f"--output.path={out}", *extra]
    with mock.patch.object(sys, "argv", ["treg"]):
        cli_main(["export", *args])
    return (out / "README.md").read_text()


def logged(metrics_csv: Path, column: str) -> dict[int, float]:
    """{logger step: value} of one column of a metrics.csv, read by hand."""
    with metrics_csv.open(newline="") as f:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(f) if r.get(column)}


def table_row(text: str, metric: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith(f"| {metric} |")]
    assert len(rows) == 1, rows
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_front_matter_parses_and_holds_the_values(run, tmp_path):
    export_card(run, 4, tmp_path / "policy")
    metadata = read_front_matter(tmp_path / "policy" / "README.md")
    assert metadata["library_name"] == "transformers"
    # alpha=0: the run trained without T-REG, so no "treg" tag.
    assert metadata["tags"] == ["treg-lightning", "preference-optimization", "simpo"]
    assert "base_model" not in metadata  # a local folder is no Hub id
    assert "datasets" not in metadata  # nor a local pairs file


@pytest.mark.parametrize("step", [2, 4])
def test_metrics_are_those_of_the_exported_step(run, step, tmp_path):
    """The step-2 checkpoint gets the values logged up to global step 2 (logger step 1), not
    the run's last ones; the step-4 checkpoint those of step 4; every metric once."""
    text = export_card(run, step, tmp_path / "policy")
    epoch = {2: 0, 4: 1}[step]
    assert "## Metrics at the exported step" in text
    assert f"The weights of global step {step} (epoch {epoch}); each metric's last value" in text
    assert f"from {run.csv}:" in text
    loss = logged(run.csv, "train/loss_step")
    assert sorted(loss) == [0, 1, 2, 3]
    assert table_row(text, "train/loss") == ["train/loss", f"{loss[step - 1]:.6g}", str(step)]
    accuracy = logged(run.csv, "train/reward_accuracy_step")[step - 1]
    assert table_row(text, "train/reward_accuracy")[1] == f"{accuracy:.6g}"
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert not [line for line in table if "_step |" in line or "_epoch |" in line]
    names = [line.split("|")[1].strip() for line in table[1:]]
    assert len(names) == len(set(names))


def test_data_is_the_checkpoints_not_the_export_configs(run, tmp_path):
    """`treg export --data.source other.jsonl`: the card names the pairs the weights saw."""
    other = write_pairs(tmp_path / "other.jsonl", n=2)
    text = export_card(run, 2, tmp_path / "policy", f"--data.source={other}")
    assert f"- Training pairs: `{run.data}`" in text
    assert str(other) not in text


def test_body_names_the_settings_and_version(run, tmp_path):
    text = export_card(run, 4, tmp_path / "policy")
    assert "- Loss: `SimPOLoss` (`beta=2.5`, `gamma_beta_ratio=0.5`)" in text
    assert "- Regularizer: off (`TokenRewardRegularizer` with `alpha=0`)" in text
    assert "Preference optimization with `SimPOLoss`, without token-level reward" in text
    assert "T-REG" not in text and "targets" not in text
    assert f"Written by treg-lightning {treg_lightning.__version__}." in text


def test_metrics_at_step_from_a_hand_written_csv(tmp_path):
    """Logger step s holds global step s + 1; each metric's last value up to the checkpoint's
    global step, `_step` before the plain name before `_epoch`."""
    metrics_csv = tmp_path / "metrics.csv"
    metrics_csv.write_text(
        "epoch,step,train/loss_epoch,train/loss_step,val/loss,lr\n"
        "0,0,,0.9,,0.1\n"
        "0,1,,0.8,0.85,0.1\n"
        "0,1,0.85,,,\n"
        "1,2,,0.7,,0.2\n"
        "1,3,,0.6,0.65,0.2\n"
        "1,3,0.65,,,\n"
    )
    at_2 = metrics_at_step(metrics_csv, {"global_step": 2, "epoch": 0})
    assert at_2.values == {"lr": (0.1, 2), "train/loss": (0.8, 2), "val/loss": (0.85, 2)}
    at_3 = metrics_at_step(metrics_csv, {"global_step": 3, "epoch": 1})
    assert at_3.values == {"lr": (0.2, 3), "train/loss": (0.7, 3), "val/loss": (0.85, 2)}
    assert (at_3.step, at_3.epoch, at_3.source) == (3, 1, str(metrics_csv))
    epoch_only = tmp_path / "epoch.csv"
    epoch_only.write_text("epoch,step,train/loss_epoch\n0,1,0.85\n1,3,0.65\n")
    assert metrics_at_step(epoch_only, {"global_step": 4}).values == {"train/loss": (0.65, 4)}
    no_step = metrics_lines_text(metrics_at_step(metrics_csv, {}))
    assert no_step.startswith(
        f"The checkpoint records no global step: each metric's last value in {metrics_csv}:"
    )
    assert "| train/loss | 0.6 | 4 |" in no_step
    nothing = metrics_at_step(metrics_csv, {"global_step": 0})
    assert (
        metrics_lines_text(nothing) == f"{metrics_csv} holds no metric logged up to global step 0."
    )


def metrics_lines_text(metrics: StepMetrics) -> str:
    return "\n".join(metrics_lines(metrics))


def test_live_metrics_of_export_on_fit_end_show_each_metric_once():
    trainer = SimpleNamespace(
        global_step=7,
        callback_metrics={
            "train/loss": torch.tensor(3.0),
            "train/loss_step": torch.tensor(2.0),
            "train/loss_epoch": torch.tensor(3.0),
            "val/loss": torch.tensor(4.0),
            "val/margin": torch.tensor(float("nan")),
        },
    )
    metrics = live_metrics(trainer)
    assert metrics.values == {"train/loss": (2.0, 7), "val/loss": (4.0, 7)}
    assert metrics.step == 7


def module(tiny_model_dir, **settings) -> PreferenceModule:
    return PreferenceModule(str(tiny_model_dir), **settings)


def test_regularizer_with_the_default_targets(tiny_model_dir):
    """`targets: null` is SelfGeneratedRewards: the card says so, never `targets=None`."""
    policy = module(
        tiny_model_dir, loss=DPOLoss(beta=0.2), regularizer=TokenRewardRegularizer(alpha=0.5)
    )
    text = model_card(policy, "pairs.jsonl", None)
    assert "- Regularizer: `TokenRewardRegularizer` (`alpha=0.5`, " in text
    assert "`targets=SelfGeneratedRewards`, `weighting=dynamic`)" in text
    assert (
        "  - targets: `SelfGeneratedRewards` (the default): The data's token rewards `r_hat` "
        "(T-REG as in the paper)."
    ) in text
    assert "None" not in text.split("## Method")[1].split("## Data")[0]
    assert "with `DPOLoss` and token-level reward regularization (T-REG, https://arxiv" in text
    assert card_metadata(policy)["tags"][2:] == ["dpo", "treg"]


def test_regularizer_under_the_cli_with_targets_null(tiny_model_dir):
    """The CLI saves `targets: null` in the hyperparameters: still named, as the default."""
    policy = module(tiny_model_dir, regularizer=TokenRewardRegularizer(alpha=0.25))
    policy.hparams["regularizer"] = {
        "class_path": "treg_lightning.losses.TokenRewardRegularizer",
        "init_args": {"alpha": 0.25, "weighting": "dynamic", "targets": None},
    }
    text = model_card(policy, "demo", None)
    assert "  - targets: `SelfGeneratedRewards` (the default): " in text
    assert "targets=None" not in text


def test_regularizer_with_another_target(tiny_model_dir):
    policy = module(
        tiny_model_dir,
        loss=IPOLoss(tau=0.3),
        regularizer=TokenRewardRegularizer(alpha=0.1, weighting="static", targets=ChosenSFT()),
    )
    text = model_card(policy, "demo", None)
    assert "- Loss: `IPOLoss` (`tau=0.3`)" in text
    assert "(`alpha=0.1`, `targets=ChosenSFT`, `weighting=static`)" in text
    assert (
        "  - targets: `ChosenSFT`: `r_hat = 1` on every chosen token, 0 on rejected ones "
        "(ablation: SFT on `y_w`)."
    ) in text
    assert "(the default)" not in text
    assert card_metadata(policy)["tags"][2:] == ["ipo", "treg"]


def test_run_without_a_regularizer(tiny_model_dir):
    policy = module(tiny_model_dir, loss=SimPOLoss(), regularizer=None)
    text = model_card(policy, "demo", None)
    assert "- Regularizer: none (no T-REG term)" in text
    assert "Preference optimization with `SimPOLoss`, without token-level reward" in text
    assert "T-REG" not in text.replace("no T-REG term", "")
    assert "treg" not in card_metadata(policy)["tags"]


class RenamedDPO(DPOLoss):
    """A user's DPO variant: a subclass keeps the tag of its loss."""


class OwnLoss(DPOLoss):
    card_tag = "own-loss"


class UntaggedLoss(DPOLoss):
    card_tag = None


@pytest.mark.parametrize(
    ("loss", "tag"),
    [
        (DPOLoss(), ["dpo"]),
        (IPOLoss(), ["ipo"]),
        (SimPOLoss(), ["simpo"]),
        (RenamedDPO(), ["dpo"]),
        (OwnLoss(), ["own-loss"]),
        (UntaggedLoss(), []),
    ],
)
def test_tags_come_from_the_loss_object(loss, tag, tiny_model_dir):
    policy = module(tiny_model_dir, loss=loss, regularizer=None)
    assert card_metadata(policy)["tags"] == ["treg-lightning", "preference-optimization", *tag]


def test_hub_ids_are_named_in_the_metadata(tiny_model_dir):
    policy = SimpleNamespace(
        loss=DPOLoss(),
        regularizer=TokenRewardRegularizer(alpha=0.5),
        model_name="smollm2",
        peft=object(),
    )
    metadata = card_metadata(policy, "Anthropic/hh-rlhf")
    assert metadata == {
        "library_name": "transformers",
        "tags": ["treg-lightning", "preference-optimization", "dpo", "treg", "lora"],
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "datasets": ["Anthropic/hh-rlhf"],
    }
    assert hub_id("demo") is None and hub_id("./pairs.jsonl") is None
    text = model_card(policy, "Anthropic/hh-rlhf", None, adapter_only=True)
    assert "No metrics.csv of the run was found beside the checkpoint." in text
    assert "PeftModel.from_pretrained(base" in text
    assert "- Training pairs: `Anthropic/hh-rlhf`" in text
    assert "- Training pairs: not recorded in the checkpoint" in model_card(policy, None, None)


def test_checkpoint_record_of_a_sharded_folder(tmp_path):
    """A sharded (FSDP2 / FSDP) checkpoint keeps its step and data in `meta.pt`."""
    folder = tmp_path / "epoch=1-step=6.ckpt"
    folder.mkdir()
    meta = {"global_step": 6, "epoch": 1, "datamodule_hyper_parameters": {"source": "a.jsonl"}}
    torch.save(meta, folder / "meta.pt")
    record = checkpoint_record(folder)
    assert (record["global_step"], record["epoch"], trained_data(record)) == (6, 1, "a.jsonl")
    assert checkpoint_record(tmp_path / "empty") == {}
