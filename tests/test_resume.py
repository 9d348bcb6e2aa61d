"""Stopping a fit and resuming it from the checkpoint gives the very run that never stopped."""

from __future__ import annotations

import functools
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.losses import SimPOLoss, TokenRewardRegularizer
from treg_lightning.module import PreferenceModule, WarmupCosineLR
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
