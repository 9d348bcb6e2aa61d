"""The small protocol every sequence-level preference loss satisfies.

A loss takes tensors only and returns a :class:`LossOutput`. Besides the per-pair loss it
returns the two pieces the T-REG regularizer needs (METHOD.md section 3):

- the token scale ``c(y)`` of the implicit token reward ``c(y) * logp_t``, one per response;
- the sequence weight ``w``: the magnitude of the loss's own gradient with respect to its
  margin, detached (stop-gradient).

Adding a loss means one new file with one class that satisfies :class:`PreferenceLoss`.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from treg_lightning.errors import ConfigError


@dataclass
class LossOutput:
    """What a sequence-level loss returns. All tensors are ``[batch]`` (one value per pair).

    Attributes:
        losses: per-pair loss, differentiable.
        chosen_rewards: implicit reward of the chosen response, detached.
        rejected_rewards: implicit reward of the rejected response, detached.
        chosen_token_scale: ``c(y_w)``, the implicit token-reward scale, detached.
        rejected_token_scale: ``c(y_l)``, detached.
        weight: ``w``, the stop-gradient sequence weight T-REG multiplies its term by.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_token_scale: torch.Tensor
    rejected_token_scale: torch.Tensor
    weight: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards


@runtime_checkable
class PreferenceLoss(Protocol):
    """Sequence-level preference loss.

    ``needs_reference`` tells the caller whether reference log-probabilities are used; when it
    is False the caller may skip the reference model entirely (SimPO).
    """

    needs_reference: bool

    def __call__(
        self,
        chosen_logps: torch.Tensor,
        rejected_logps: torch.Tensor,
        chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
    ) -> LossOutput:
        """Args:
        chosen_logps: ``[batch]`` summed policy log-probs of the chosen response tokens.
        rejected_logps: ``[batch]`` likewise for the rejected response.
        chosen_lengths: ``[batch]`` number of chosen response tokens ``|y_w|`` (float or int).
        rejected_lengths: ``[batch]`` ``|y_l|``.
        ref_chosen_logps: ``[batch]`` summed reference log-probs, or None for reference-free
            losses.
        ref_rejected_logps: ``[batch]`` likewise.
        """
        ...


class PreferenceLossModule(nn.Module, metaclass=ABCMeta):
    """``nn.Module`` base of the shipped losses, and the type of ``PreferenceModule(loss=...)``.

    Typing the argument with it makes ``treg fit --help`` list the preference losses (this
    class's subclasses: ours and any user loss deriving from it) instead of every ``nn.Module``.
    A user loss need not derive from it: any ``nn.Module`` class with a ``needs_reference``
    attribute (the :class:`PreferenceLoss` protocol) counts as a subclass, so
    ``class_path: my_pkg.MyLoss`` still works; it is just not listed.
    """

    needs_reference: bool

    @abstractmethod
    def forward(self, *args, **kwargs) -> LossOutput:
        """The loss of a batch of pairs (see :class:`PreferenceLoss` for the arguments)."""

    @classmethod
    def __subclasshook__(cls, other: type) -> bool:
        if cls is not PreferenceLossModule:  # issubclass(x, DPOLoss) stays nominal
            return NotImplemented
        follows = issubclass(other, nn.Module) and hasattr(other, "needs_reference")
        return True if follows else NotImplemented


def require_reference(name: str, ref_chosen_logps, ref_rejected_logps) -> None:
    """Raise a clear error when a reference-based loss gets no reference log-probs."""
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ConfigError(
            f"{name} needs reference log-probabilities: serve cached reference token logps "
            "(annotate with store_reference_logps=True) or keep the reference model enabled."
        )
