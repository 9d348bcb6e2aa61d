"""The `treg` command end to end on the tiny Llama: annotate, fit, validate, export."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from builders import CLI_PAIRS, tiny_fit_args, write_pairs
from treg_lightning.cli.main import TRegCLI
from treg_lightning.cli.main import cli_main as _cli_main


def cli_main(args: list[str]) -> TRegCLI:
    """`treg ARGS`, keeping the CLI object (pytest's own argv must not reach LightningCLI)."""
    with mock.patch.object(sys, "argv", ["treg"]):
        return TRegCLI(args=args)


def common_args(model_dir: Path, data: Path, root: Path) -> list[str]:
    """DPO with contrastive token rewards (the default source), 20% of the pairs held out."""
    return tiny_fit_args(
        model_dir,
        data,
        root,
        "--model.loss.beta=0.5",
        "--model.live_reference=false",  # DPO on cached reference logps
        "--data.val_fraction=0.2",
        f"--data.rewards.cache_dir={root / 'cache'}",
        loss="treg_lightning.losses.DPOLoss",
        alpha=None,
        lr=0.01,
        rewards=None,
        max_length=64,
        max_prompt_length=32,
        max_steps=None,
        logger="csv",
    )


@pytest.fixture(scope="module")
def fitted(tiny_model_dir, tmp_path_factory):
    """`treg annotate`, then `treg fit` (4 steps) on the same config."""
    root = tmp_path_factory.mktemp("cli")
    data = write_pairs(root / "pairs.jsonl", rows=CLI_PAIRS)
    args = common_args(tiny_model_dir, data, root)
    annotate = cli_main(["annotate", *args])
    meta_files = sorted((root / "cache").glob("*/meta.json"))
    assert len(meta_files) == 2  # train and val caches, complete
    stamps = [p.stat().st_mtime_ns for p in meta_files]
    fit = cli_main(["fit", *args, "--trainer.max_steps=4", "--trainer.log_every_n_steps=1"])
    # fit reused the caches written by annotate instead of annotating again.
    assert [p.stat().st_mtime_ns for p in meta_files] == stamps
    return {"root": root, "args": args, "fit": fit, "annotate": annotate}


def test_link_data_tokenizer_to_model(fitted, tiny_model_dir):
    config = fitted["fit"].config["fit"]
    assert config.data.tokenizer == str(tiny_model_dir)


def test_fit_logs_finite_metrics_and_checkpoint(fitted):
    trainer = fitted["fit"].trainer
    assert trainer.global_step == 4
    # default scheduler: warmup + cosine over trainer.estimated_stepping_batches (= max_steps)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert type(scheduler).__name__ == "WarmupCosineLR" and scheduler.num_training_steps == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # end
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for name in (
        "train/loss_step",
        "train/reward_accuracy_step",
        "train/treg_step",
        "train/token_sign_agreement_step",
        "val/loss",
        "val/margin",
        "val/weight",
    ):
        assert name in metrics and math.isfinite(metrics[name]), name
    # The CSV log has one train/loss_step row per step.
    csv = next(Path(trainer.log_dir).glob("metrics.csv")).read_text().splitlines()
    header = csv[0].split(",")
    losses = [row.split(",")[header.index("train/loss_step")] for row in csv[1:]]
    assert len([v for v in losses if v]) == 4
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=True)
    assert checkpoint["hyper_parameters"]["loss"]["init_args"]["beta"] == 0.5


def test_validate_from_checkpoint_matches_fit(fitted):
    """`treg validate --ckpt_path` reloads the trained policy: the same val loss as after fit
    when fit ended on a validation of the final weights."""
    fit = fitted["fit"]
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    validate = cli_main(["validate", *fitted["args"], f"--ckpt_path={ckpt}"])
    fit_model = fit.model.policy.state_dict()
    for key, value in validate.model.policy.state_dict().items():
        torch.testing.assert_close(value, fit_model[key])
    val_loss = float(validate.trainer.callback_metrics["val/loss"])
    assert math.isfinite(val_loss)
    assert val_loss == pytest.approx(float(fit.trainer.callback_metrics["val/loss"]), rel=1e-5)


def test_export_from_checkpoint_loads_with_from_pretrained(fitted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fit = fitted["fit"]
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    out = fitted["root"] / "export"
    with mock.patch.object(sys, "argv", ["treg"]):
        # the console-script entry point returns None: `treg export` exits with status 0
        assert (
            _cli_main(["export", *fitted["args"], f"--ckpt_path={ckpt}", f"--output.path={out}"])
            is None
        )
    assert (out / "model.safetensors").is_file()
    exported = AutoModelForCausalLM.from_pretrained(out)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    for key, value in exported.state_dict().items():
        torch.testing.assert_close(value, state[f"policy.{key}"])
    # trained weights differ from the initial ones
    initial = AutoModelForCausalLM.from_pretrained(fit.config["fit"].model.model)
    assert not torch.equal(initial.lm_head.weight, exported.lm_head.weight)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template is not None


def test_export_without_checkpoint_is_a_clear_error(fitted):
    with pytest.raises(ValueError, match="--ckpt_path"):
        cli_main(["export", *fitted["args"]])
