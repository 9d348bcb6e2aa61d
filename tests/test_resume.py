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
        cache_dir=str(root / "cache"),
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


def fit(model_dir, root, name, ckpt_path=None, **limits):
    L.seed_everything(0)
    record = RecordLosses()
    checkpoint = ModelCheckpoint(dirpath=root / name, save_last=True)
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

    The stop is at an epoch end: PreferenceDataModule's DataLoader is not resumable mid-epoch,
    and Lightning then restarts the interrupted epoch from its first batch (it warns)."""
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
