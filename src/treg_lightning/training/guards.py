"""Stop or skip on non-finite losses and gradients, naming the step and the batch.

A NaN or infinite loss in a long run usually means bad data in one batch or a learning rate that
is too high. Stepping the optimizer with such gradients would write NaN into every weight (and
into every later checkpoint); this callback checks the gradients right before each optimizer
step and either stops the run (``action="stop"``, the default) or drops that step's gradients
and carries on (``action="skip"``), up to ``max_skips`` times. Because the check runs before the
step, the weights, and so the last checkpoint written by ``ModelCheckpoint``, stay finite.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from treg_lightning.errors import ConfigError, UserError


class NonFiniteError(UserError, RuntimeError):
    """Raised when a loss or gradient is NaN or infinite and the guard is set to stop."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # FSDP2 gradients are DTensors: each rank checks its own shard, then the ranks agree.
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def grads_are_finite(module: torch.nn.Module) -> bool:
    """Whether every gradient of ``module`` (this rank's shard of it) is finite."""
    flags = [
        torch.isfinite(_local(p.grad)).all() for p in module.parameters() if p.grad is not None
    ]
    return bool(torch.stack(flags).all()) if flags else True


class NonFiniteGuard(Callback):
    """Check the loss and gradients of every optimizer step.

    Args:
        action: ``"stop"`` raises :class:`NonFiniteError`; ``"skip"`` drops the step's gradients
            (the optimizer does not step) and warns.
        max_skips: with ``action="skip"``, stop anyway after this many skipped steps.
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_skips: int = 10) -> None:
        if action not in ("stop", "skip"):
            raise ConfigError(f"NonFiniteGuard: action must be 'stop' or 'skip', got {action!r}.")
        self.action = action
        self.max_skips = max_skips
        self.skipped = 0
        self._where = ""
        self._bad_loss = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        rows = batch.get("index") if isinstance(batch, dict) else None
        rows_text = f", dataset rows {rows.tolist()}" if isinstance(rows, torch.Tensor) else ""
        self._where = (
            f"global step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {batch_idx}{rows_text})"
        )

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        self._bad_loss = self._bad_loss or not bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        finite = grads_are_finite(pl_module) and not self._bad_loss
        # Every rank must take the same decision, or the next collective hangs.
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        what = "loss" if self._bad_loss else "gradients"
        self._bad_loss = False
        if finite:
            return
        message = f"non-finite {what} at {self._where}"
        if self.action == "stop" or self.skipped >= self.max_skips:
            raise NonFiniteError(
                f"{message}. The optimizer did not step, so the weights and the last checkpoint "
                "are intact. Check those rows, lower the learning rate, or set "
                "NonFiniteGuard(action='skip') to drop such steps."
            )
        self.skipped += 1
        rank_zero_warn(f"{message}: step skipped ({self.skipped} of at most {self.max_skips}).")
        for param in pl_module.parameters():
            param.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict.get("skipped", 0)
