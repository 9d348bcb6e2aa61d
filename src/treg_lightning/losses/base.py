"""The small protocol every sequence-level preference loss satisfies.

A loss takes a :class:`~treg_lightning.pairs.PairScores` (tensors only) and returns a
:class:`LossOutput`. Besides the per-pair loss it returns the two pieces the T-REG regularizer
needs (docs/method.md, section 3):

- the token scale ``c(y)`` of the implicit token reward ``c(y) * logp_t``, one per response;
- the sequence weight ``w``: the magnitude of the loss's own gradient with respect to its
  margin, detached (stop-gradient);

and whether its implicit reward has a reference term (``uses_reference``), which the
"implicit" regularizer targets and the token-agreement metrics follow.

A loss declares what it needs from the data: ``needs_reference`` (reference log-probabilities:
cached by the reward source or from a live reference model) and ``needs_token_rewards`` (the
source's token rewards in ``PairScores``). The start-up check
(:func:`treg_lightning.module.checks.check_pair_inputs`) asks both before any model loads, so a
loss that needs what the configured data cannot serve is refused in seconds.

Adding a loss means one new file with one class that satisfies :class:`PreferenceLoss`.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from treg_lightning.errors import ConfigError
from treg_lightning.pairs import PairScores, ResponseScores


@dataclass
class LossOutput:
    """What a sequence-level loss returns. All tensors are ``[batch]`` (one value per pair).

    Attributes:
        losses: per-pair loss, differentiable.
        chosen_rewards: implicit (sequence) reward of the chosen response, detached.
        rejected_rewards: implicit reward of the rejected response, detached.
        chosen_token_scale: ``c(y_w)``, the implicit token-reward scale, detached.
        rejected_token_scale: ``c(y_l)``, detached.
        weight: ``w``, the stop-gradient sequence weight T-REG multiplies its term by.
        uses_reference: whether the implicit reward is relative to the reference,
            ``c(y) * (logp_t - ref_logp_t)`` (DPO, IPO), or not, ``c(y) * logp_t`` (SimPO).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_token_scale: torch.Tensor
    rejected_token_scale: torch.Tensor
    weight: torch.Tensor
    uses_reference: bool

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    def token_scale(self, side: str) -> torch.Tensor:
        """``c(y)`` of ``side`` (``"chosen"`` or ``"rejected"``), ``[batch]``."""
        return self.chosen_token_scale if side == "chosen" else self.rejected_token_scale


@runtime_checkable
class PreferenceLoss(Protocol):
    """Sequence-level preference loss.

    ``needs_reference`` tells the caller whether reference log-probabilities are used; when it
    is False the caller may skip the reference model entirely (SimPO). ``needs_token_rewards``
    (optional, False when absent) says that the loss reads the data's token rewards
    (``pair.chosen.token_rewards``), which only a token-reward source provides.
    """

    needs_reference: bool

    def __call__(self, pair: PairScores) -> LossOutput:
        """Args:
        pair: per side ``logps`` ``[batch]`` (summed policy log-probs of the response
            tokens), ``lengths`` ``[batch]`` (``|y|``) and, for reference-based losses,
            ``ref_logps`` ``[batch]``.
        """
        ...


class PreferenceLossModule(nn.Module, metaclass=ABCMeta):
    """``nn.Module`` base of the shipped losses, and the type of ``PreferenceModule(loss=...)``.

    Typing the argument with it makes ``treg fit --help`` list the preference losses (this
    class's subclasses: ours and any user loss deriving from it) instead of every ``nn.Module``.
    A user loss need not derive from it: any ``nn.Module`` class with a ``needs_reference``
    attribute (the :class:`PreferenceLoss` protocol) counts as a subclass, so
    ``class_path: my_pkg.MyLoss`` still works; it is just not listed.

    Attributes:
        needs_reference: the loss uses reference log-probabilities (every loss declares it).
        needs_token_rewards: the loss reads the data's token rewards; the start-up check then
            requires a token-reward source (default False).
        card_tag: the Hub tag an exported model card gives the loss (``"dpo"``); None: none.
    """

    needs_reference: bool
    needs_token_rewards: bool = False
    card_tag: str | None = None

    @abstractmethod
    def forward(self, pair: PairScores) -> LossOutput:
        """The loss of a batch of pairs (see :class:`PreferenceLoss`)."""

    @classmethod
    def __subclasshook__(cls, other: type) -> bool:
        if cls is not PreferenceLossModule:  # issubclass(x, DPOLoss) stays nominal
            return NotImplemented
        follows = issubclass(other, nn.Module) and hasattr(other, "needs_reference")
        return True if follows else NotImplemented


def require_reference(name: str, pair: PairScores) -> None:
    """Raise a clear error when a reference-based loss gets no reference log-probs."""
    if not pair.has_reference:
        raise ConfigError(
            f"{name} needs reference log-probabilities: serve cached reference token logps "
            "(data.rewards with store_reference_logps: true) or keep the reference model "
            "enabled (model.live_reference: null)."
        )


def implicit_token_rewards(out: LossOutput, side: str, scores: ResponseScores) -> torch.Tensor:
    """The loss's own implicit token rewards ``[batch, seq]``, detached.

    ``c(y) * (logp_t - ref_logp_t)`` when the loss uses a reference, ``c(y) * logp_t`` when it
    is reference-free (even if reference log-probs are at hand: the reward is the loss's).
    """
    log_ratio = scores.token_logps.detach()
    if out.uses_reference:
        if scores.ref_token_logps is None:
            raise ConfigError(
                "the loss's implicit token rewards are relative to the reference, but no "
                "reference token log-probs were given."
            )
        log_ratio = log_ratio - scores.ref_token_logps
    scale = out.token_scale(side).detach()
    return scale[:, None].to(log_ratio.dtype) * log_ratio
