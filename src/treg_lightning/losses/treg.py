"""T-REG: token-level reward regularization, composable with any sequence-level loss.

Paper: Zhou, Zhang, Zhao, Meng, "T-REG: Preference Optimization with Token-Level Reward
Regularization", ACL 2025, https://arxiv.org/abs/2412.02685.

A sequence loss implies a token-level reward ``c(y) * logp_t``; T-REG pulls it towards the
self-generated token rewards ``r_hat_t`` in (-0.5, 0.5), which reduces to a reward-weighted
language-modelling loss per response::

    L_REG(x, y) = - c(y) * sum_t r_hat_t * logp_t            (sum over response tokens)

weighted per pair by the loss's own stop-gradient sequence weight ``w``::

    L_total = mean_pairs[ L_seq + alpha * stopgrad(w) * (L_REG(x, y_w) + L_REG(x, y_l)) ]

``c(y)`` and ``w`` come from the loss (:class:`~treg_lightning.losses.base.LossOutput`).

Options reproduce the paper's ablations: ``weighting="static"`` (``w = 1`` instead of the
dynamic sequence weight) and the ``targets`` (:mod:`treg_lightning.losses.targets`): the
self-generated rewards (paper), SFT on ``y_w``, or the policy's own implicit token rewards.

Typical ranges: ``alpha`` in {0.1, 0.25, 0.5} (paper). ``alpha = 0`` gives the plain loss exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from treg_lightning.errors import ConfigError
from treg_lightning.losses.base import LossOutput
from treg_lightning.losses.targets import SelfGeneratedRewards, TokenTargets
from treg_lightning.pairs import PairScores


@dataclass
class RegularizerOutput:
    """Per-pair T-REG pieces, all ``[batch]``.

    Attributes:
        losses: ``alpha * w * (L_REG(y_w) + L_REG(y_l))``, differentiable; add to the loss.
        chosen_reg: ``L_REG(x, y_w)`` (undetached, before ``alpha`` and ``w``).
        rejected_reg: ``L_REG(x, y_l)``.
        weight: the weight used (``w``, or 1 for static weighting), detached.
    """

    losses: torch.Tensor
    chosen_reg: torch.Tensor
    rejected_reg: torch.Tensor
    weight: torch.Tensor


def reward_weighted_nll(
    token_scale: torch.Tensor,
    token_logps: torch.Tensor,
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """``L_REG = -c(y) * sum_t r_hat_t * logp_t`` over masked-in tokens; ``[batch]``.

    ``token_scale`` is ``[batch]``; the other three are ``[batch, seq]``.
    """
    # where() on each factor, not a product with the mask: a masked position never contributes,
    # even if its reward or log-prob is not finite -- nor to the backward pass, where a where()
    # around the product would still give logp the gradient 0 * r_hat = nan for r_hat = nan/inf.
    weighted = torch.where(mask, token_rewards.to(token_logps.dtype), 0.0) * torch.where(
        mask, token_logps, 0.0
    )
    return -token_scale.to(token_logps.dtype) * weighted.sum(-1)


class TokenRewardRegularizer(nn.Module):
    """The T-REG term for any loss that returns a ``LossOutput``.

    Args:
        alpha: strength of the regularizer (>= 0); 0 turns it off exactly.
        weighting: ``"dynamic"`` uses the loss's sequence weight ``w`` (paper); ``"static"``
            uses ``w = 1`` (ablation).
        targets: the token rewards ``r_hat`` to regularize towards:
            ``SelfGeneratedRewards`` (the data's token rewards; paper; also what None means),
            ``ChosenSFT`` or ``ImplicitRewards`` (ablations); see
            :mod:`treg_lightning.losses.targets`.
    """

    def __init__(
        self,
        alpha: float = 0.25,
        weighting: Literal["dynamic", "static"] = "dynamic",
        targets: TokenTargets | None = None,
    ) -> None:
        super().__init__()
        if not alpha >= 0:  # also refuses NaN
            raise ConfigError(f"TokenRewardRegularizer: alpha must be >= 0, got {alpha}.")
        if weighting not in ("dynamic", "static"):
            raise ConfigError(f"weighting must be 'dynamic' or 'static', got {weighting!r}.")
        targets = SelfGeneratedRewards() if targets is None else targets
        if not isinstance(targets, TokenTargets):
            raise ConfigError(
                f"targets must be a TokenTargets object (SelfGeneratedRewards, ChosenSFT, "
                f"ImplicitRewards or your own), got {targets!r}."
            )
        self.alpha = alpha
        self.weighting = weighting
        self.targets = targets

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, weighting={self.weighting!r}, targets={self.targets!r}"

    @property
    def needs_token_rewards(self) -> bool:
        """Whether the batches must carry token rewards ``r_hat`` (the paper's own targets)."""
        return self.alpha > 0 and self.targets.needs_token_rewards

    def forward(self, pair: PairScores, out: LossOutput) -> RegularizerOutput:
        """``pair`` needs per-token ``token_logps`` and ``mask`` on both sides (and what the
        targets read); ``out`` is the sequence loss's output on the same pair."""
        dynamic = self.weighting == "dynamic"
        weight = (out.weight if dynamic else torch.ones_like(out.weight)).detach()
        if self.alpha == 0:
            zeros = torch.zeros_like(out.losses)
            return RegularizerOutput(zeros, zeros, zeros, weight)
        chosen_targets, rejected_targets = self.targets(pair, out)
        chosen_reg, rejected_reg = (
            reward_weighted_nll(out.token_scale(side), scores.token_logps, targets, scores.mask)
            for (side, scores), targets in zip(
                pair.sides(), (chosen_targets, rejected_targets), strict=True
            )
        )
        losses = self.alpha * weight * (chosen_reg + rejected_reg)
        return RegularizerOutput(losses, chosen_reg, rejected_reg, weight)
