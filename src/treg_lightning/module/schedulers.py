"""Learning-rate schedules, stepped once per optimizer step."""

from __future__ import annotations

import math

import torch

from treg_lightning.errors import ConfigError


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Linear warmup from 0, then cosine decay to ``min_lr_ratio * lr`` (SimPO's schedule).

    Stepped once per optimizer step. ``num_training_steps`` is filled in by
    :class:`PreferenceModule` from :func:`estimated_training_steps` when left as None.

    Args:
        optimizer: the optimizer whose learning rates are scheduled.
        warmup_ratio: share of the training steps spent warming up (0.1 in the paper).
        num_training_steps: total optimizer steps; None = set by the module.
        min_lr_ratio: final learning rate as a share of the peak.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_ratio: float = 0.1,
        num_training_steps: int | None = None,
        min_lr_ratio: float = 0.0,
    ) -> None:
        if not 0 <= warmup_ratio <= 1:
            raise ConfigError(
                f"WarmupCosineLR: warmup_ratio must be in [0, 1], got {warmup_ratio}."
            )
        self.warmup_ratio = warmup_ratio
        self.num_training_steps = num_training_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer)

    def lr_factor(self, step: int) -> float:
        total = max(1, self.num_training_steps or 1)
        warmup = math.ceil(self.warmup_ratio * total)
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]


def estimated_training_steps(trainer) -> int:
    """``trainer.estimated_stepping_batches``, leaving the fit loop's data as it was.

    Lightning loads the train DataLoader for the estimate when it has none yet, which happens in
    ``configure_optimizers``: before a resumed fit restores its loops. The fit loop then keeps
    that loader and never gives it the checkpoint's DataLoader state (the resumable sampler's
    epoch and batches consumed), so a run resumed mid-epoch would train the epoch's first
    batches again. A loader loaded here is dropped: the fit loop loads its own when it starts,
    after the restore, and hands it the checkpoint's state.
    """
    loaded_here = trainer.train_dataloader is None
    steps = trainer.estimated_stepping_batches
    if loaded_here:
        fit_loop = trainer.fit_loop
        if fit_loop._data_fetcher is not None:  # its iterator (and workers) on that loader
            fit_loop._data_fetcher.teardown()
            fit_loop._data_fetcher = None
        fit_loop._combined_loader = None
    return int(steps)


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, num_training_steps: int, warmup_ratio: float = 0.1
) -> WarmupCosineLR:
    """Functional form of :class:`WarmupCosineLR` for use outside the module."""
    return WarmupCosineLR(optimizer, warmup_ratio, num_training_steps)
