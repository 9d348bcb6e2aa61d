"""Stopping a fit and resuming it from the checkpoint gives the very run that never stopped."""

from __future__ import annotations

import functools
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from builders import tiny_fit_args, write_pairs
from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.losses import SimPOLoss, TokenRewardRegularizer
from treg_lightning.module import PreferenceModule
from treg_lightning.module.schedulers import WarmupCosineLR
from treg_lightning.rewards import ContrastiveRewards

STEPS_PER_EPOCH = 4  # 8 pairs, 2 per batch


class RecordLosses(L.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def make_data(model_dir, root):
    data = root / "pairs.jsonl"
    if not data.exists():
        with data.open("w") as f:
            for i in range(2 * STEPS_PER_EPOCH):
                row = {
                    "prompt": f"Add {i} and {i}.",
                    "chosen": f"{2 * i}.",
                    "rejected": "No idea" * (i + 1),
                }
                f.write(json.dumps(row) + "\n")
    return PreferenceDataModule(
        str(data),
        tokenizer=str(model_dir),
        max_length=64,
        max_prompt_length=32,
        batch_size=2,
        rewards=ContrastiveRewards(cache_dir=str(root / "cache")),
    )


def make_module(model_dir):
    return PreferenceModule(
        str(model_dir),
        loss=SimPOLoss(beta=2.0),
        regularizer=TokenRewardRegularizer(alpha=0.5),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0),
        # A fixed horizon: the schedule must not depend on where a run stops.
        scheduler=functools.partial(WarmupCosineLR, warmup_ratio=0.25, num_training_steps=8),
    )


def fit(model_dir, root, name, ckpt_path=None, every_n_train_steps=None, **limits):
    L.seed_everything(0)
    record = RecordLosses()
    checkpoint = ModelCheckpoint(
        dirpath=root / name, save_last=True, every_n_train_steps=every_n_train_steps
    )
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record, checkpoint],
        limit_val_batches=0,
        **limits,
    )
    module = make_module(model_dir)
    trainer.fit(module, datamodule=make_data(model_dir, root), ckpt_path=ckpt_path)
    return record.losses, module, checkpoint


def test_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    """Stop after epoch 1 of 2, resume from last.ckpt: the losses of steps 5-8 and the final
    weights equal those of the run that never stopped (weights, AdamW moments, scheduler
    position, sampler epoch and RNG all restored).

    Mid-epoch stops are covered by test_resume_mid_epoch_equals_uninterrupted below."""
    total = 2 * STEPS_PER_EPOCH
    straight, straight_module, _ = fit(tiny_model_dir, tmp_path, "straight", max_epochs=2)
    first, _, checkpoint = fit(tiny_model_dir, tmp_path, "first", max_epochs=1)
    resumed, resumed_module, _ = fit(
        tiny_model_dir, tmp_path, "resumed", ckpt_path=checkpoint.last_model_path, max_epochs=2
    )
    assert sorted(straight) == list(range(1, total + 1))
    assert sorted(first) == list(range(1, STEPS_PER_EPOCH + 1))
    assert sorted(resumed) == list(range(STEPS_PER_EPOCH + 1, total + 1))
    assert len(set(straight.values())) == total  # the loss moved every step
    for step, loss in first.items():
        assert loss == pytest.approx(straight[step], rel=1e-6)
    for step, loss in resumed.items():
        assert loss == pytest.approx(straight[step], rel=1e-5), step
    for key, value in straight_module.policy.state_dict().items():
        torch.testing.assert_close(resumed_module.policy.state_dict()[key], value)


@pytest.fixture(scope="module")
def straight_two_epochs(tiny_model_dir, tmp_path_factory):
    """The uninterrupted 2-epoch run (max_steps), shared by the mid-epoch resume cases."""
    root = tmp_path_factory.mktemp("resume-mid-epoch")
    losses, module, _ = fit(tiny_model_dir, root, "straight", max_steps=2 * STEPS_PER_EPOCH)
    return root, losses, module.policy.state_dict()


@pytest.mark.parametrize("stop", [2, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 3])
def test_resume_mid_epoch_equals_uninterrupted(tiny_model_dir, straight_two_epochs, stop):
    """Stop with max_steps mid-epoch (2 of 4 batches; 3 of epoch 2) or exactly at an epoch end,
    resume from last.ckpt to 2 epochs: every later step has the loss of the run that never
    stopped. ResumableDataLoader stores (epoch, batches consumed) in the checkpoint and skips
    those batches of the seed+epoch order; without it the epoch would restart from batch 0."""
    root, straight, straight_weights = straight_two_epochs
    total = 2 * STEPS_PER_EPOCH
    first, _, checkpoint = fit(
        tiny_model_dir, root, f"first-{stop}", max_steps=stop, every_n_train_steps=1
    )
    state = torch.load(checkpoint.last_model_path, weights_only=True)["loops"]
    loader_state = state["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state == {
        "epoch": (stop - 1) // STEPS_PER_EPOCH,
        "batches": (stop - 1) % STEPS_PER_EPOCH + 1,
    }
    resumed, resumed_module, _ = fit(
        tiny_model_dir,
        root,
        f"resumed-{stop}",
        ckpt_path=checkpoint.last_model_path,
        every_n_train_steps=1,
        max_steps=total,
    )
    assert sorted(first) == list(range(1, stop + 1))
    assert sorted(resumed) == list(range(stop + 1, total + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(straight[step], rel=1e-6, abs=1e-6), step
    for key, value in straight_weights.items():
        torch.testing.assert_close(resumed_module.policy.state_dict()[key], value)


# --- `treg fit --ckpt_path <last.ckpt of a max_steps run> --trainer.max_steps <larger>` -------


def _cli_fit(model_dir, data, root, name, *extra):
    """`treg fit` in this process; returns (per-step losses of this run's own metrics.csv,
    final policy weights, last.ckpt path)."""
    import csv
    import sys
    from unittest import mock

    from treg_lightning.cli.main import TRegCLI

    run = root / name
    fit = tiny_fit_args(
        model_dir,
        data,
        run,
        "--model.regularizer=null",
        "--model.scheduler=null",
        "--trainer.log_every_n_steps=1",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={run / 'ckpt'}",
        "--trainer.callbacks.save_last=true",
        *extra,
        alpha=None,
        optimizer="torch.optim.SGD",
        lr=0.5,
        devices=None,
        max_steps=None,
        logger="csv",
    )
    with mock.patch.object(sys, "argv", ["treg"]):
        cli = TRegCLI(args=["fit", *fit])
    rows = []
    for path in run.glob("lightning_logs/version_*/metrics.csv"):  # none if nothing was logged
        with open(path) as f:
            rows += [row for row in csv.DictReader(f) if row.get("train/loss_step")]
    steps = [int(row["step"]) + 1 for row in rows]  # the CSV logs 0-based steps
    assert len(steps) == len(set(steps)), f"{name}: a step was logged twice: {steps}"
    losses = {step: float(row["train/loss_step"]) for step, row in zip(steps, rows, strict=True)}
    weights = {k: v.clone() for k, v in cli.model.policy.state_dict().items()}
    return losses, weights, run / "ckpt" / "last.ckpt"


@pytest.mark.parametrize(
    ("validation", "limits", "continued"),
    [
        # No validation: last.ckpt written at on_train_epoch_end; continue across the epoch end.
        (False, ["--trainer.max_steps=8"], ["--trainer.max_steps=8"]),
        # The configs' setting (max_epochs: 1) with validation: last.ckpt written at
        # on_train_end; the continued run trains the rest of the epoch, then validates.
        (
            True,
            ["--trainer.max_epochs=1"],
            ["--trainer.max_epochs=1", "--trainer.max_steps=100"],
        ),
    ],
    ids=["across-epochs", "max_epochs-1-with-validation"],
)
def test_cli_continue_with_larger_max_steps_trains_the_rest(
    tiny_model_dir, tmp_path, validation, limits, continued
):
    """`treg fit --trainer.max_steps=2`, then `treg fit --ckpt_path <its last.ckpt>` with a larger
    limit: the continued run trains steps 3.. of the same epoch (not the next epoch, not
    nothing) and ends with the weights and per-step losses of the run that never stopped.

    Lightning ends the cut epoch in the checkpoint (counted as processed); without
    `reopen_cut_epoch` the continued run trains nothing ("max_epochs=1 reached") or skips to
    the next epoch."""
    # 6 batches per epoch; with validation 9 pairs: 5 batches
    data = write_pairs(tmp_path / "pairs.jsonl", 12)
    val = ["--data.val_fraction=0.25"] if validation else ["--trainer.limit_val_batches=0"]
    first_limit = [a for a in limits if "max_epochs" in a] + ["--trainer.max_steps=2"]
    straight, straight_weights, _ = _cli_fit(
        tiny_model_dir, data, tmp_path, "straight", *val, *limits
    )
    first, _, last = _cli_fit(tiny_model_dir, data, tmp_path, "first", *val, *first_limit)
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 2
    # The bug's precondition: the checkpoint marks the cut epoch as processed.
    assert state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 1
    continued_losses, weights, _ = _cli_fit(
        tiny_model_dir, data, tmp_path, "continued", *val, *continued, f"--ckpt_path={last}"
    )
    total = 8 if not validation else 5
    assert sorted(straight) == list(range(1, total + 1))
    assert len(set(straight.values())) == total  # the loss moved every step
    assert sorted(first) == [1, 2]
    assert sorted(continued_losses) == list(range(3, total + 1))
    for step, loss in continued_losses.items():
        assert loss == pytest.approx(straight[step], rel=1e-5, abs=1e-6), step
    for key, value in straight_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6)


def test_cli_resume_mid_epoch_under_the_default_scheduler(tiny_model_dir, tmp_path):
    """`treg fit` with the default WarmupCosineLR (its length from
    `trainer.estimated_stepping_batches`) and a checkpoint every 2 steps; resumed from the
    step-2 checkpoint, the run trains batches 3-6 of the epoch (not batches 1-4 again): the
    per-step losses and final weights of the run that never stopped.

    Estimating the stepping batches loads the train DataLoader before Lightning restores the
    fit loop; the module drops that loader so the fit loop loads one with the checkpoint's
    DataLoader state (epoch, batches consumed)."""
    data = write_pairs(tmp_path / "pairs.jsonl", 12)  # 6 batches
    args = (
        "--model.scheduler=treg_lightning.module.schedulers.WarmupCosineLR",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=0",
        "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.callbacks.save_top_k=-1",
    )
    straight, straight_weights, last = _cli_fit(tiny_model_dir, data, tmp_path, "straight", *args)
    assert sorted(straight) == list(range(1, 7))
    assert len(set(straight.values())) == 6  # the loss moved every step
    at_two = last.parent / "epoch=0-step=2.ckpt"
    state = torch.load(at_two, weights_only=True)
    assert state["global_step"] == 2
    assert state["lr_schedulers"][0]["num_training_steps"] == 6
    resumed, weights, _ = _cli_fit(
        tiny_model_dir, data, tmp_path, "resumed", *args, f"--ckpt_path={at_two}"
    )
    assert sorted(resumed) == list(range(3, 7))
    tolerance = {"rtol": 8 * torch.finfo(torch.float32).eps, "atol": 1e-6}
    for step, loss in resumed.items():
        torch.testing.assert_close(loss, straight[step], **tolerance, msg=f"step {step}")
    for key, value in straight_weights.items():
        torch.testing.assert_close(weights[key], value, **tolerance)
