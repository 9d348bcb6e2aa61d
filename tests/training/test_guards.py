"""NonFiniteGuard: a non-finite loss stops the run (or skips the step) before the optimizer steps,
names the step and the dataset rows, and leaves the weights and the last checkpoint finite."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from treg_lightning.training.guards import NonFiniteError, NonFiniteGuard

BAD_ROW = 13  # the row whose target is NaN; with batch size 4 it sits in batch 3


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        target = float("nan") if i == BAD_ROW else float(i % 3)
        return {"x": torch.tensor([float(i % 5), 1.0]), "y": torch.tensor(target), "index": i}


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return ((self.linear(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def _fit(tmp_path, guard, max_steps=8):
    torch.manual_seed(0)
    model = Regression()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=1, save_last=True, save_top_k=-1
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard, checkpoint],
    )
    loader = DataLoader(Rows(), batch_size=4, shuffle=False)
    return model, trainer, loader


def test_stop_names_step_and_rows_and_keeps_last_checkpoint(tmp_path):
    model, trainer, loader = _fit(tmp_path, NonFiniteGuard(action="stop"))
    with pytest.raises(NonFiniteError) as err:
        trainer.fit(model, loader)
    message = str(err.value)
    assert "non-finite loss at global step 3" in message
    assert "batch 3" in message and "dataset rows [12, 13, 14, 15]" in message
    # The bad step never happened: the weights and the last checkpoint are finite, at step 3.
    assert all(torch.isfinite(p).all() for p in model.parameters())
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())


def test_skip_drops_only_the_bad_step(tmp_path):
    guard = NonFiniteGuard(action="skip")
    model, trainer, loader = _fit(tmp_path, guard)
    with pytest.warns(UserWarning, match="non-finite loss at global step 3"):
        trainer.fit(model, loader)
    assert guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # 8 batches seen, one optimizer step dropped: Adam's step counter says 7.
    state = next(iter(trainer.optimizers[0].state.values()))
    assert int(state["step"]) == 7


def test_skip_gives_up_after_max_skips(tmp_path):
    model, trainer, loader = _fit(tmp_path, NonFiniteGuard(action="skip", max_skips=0))
    with pytest.raises(NonFiniteError, match="global step 3"):
        trainer.fit(model, loader)


def test_bad_action_is_refused():
    with pytest.raises(ValueError, match="action must be 'stop' or 'skip'"):
        NonFiniteGuard(action="ignore")
