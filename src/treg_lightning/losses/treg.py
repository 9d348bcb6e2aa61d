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

Options reproduce the paper's ablations:

- ``weighting="static"``: ``w = 1`` instead of the dynamic sequence weight;
- ``token_rewards="sft"``: ``r_hat = 1`` on chosen tokens and nothing on rejected ones (SFT on
  ``y_w`` scaled by ``c``);
- ``token_rewards="implicit"``: the policy's own implicit token rewards instead of the
  self-generated ones (ours: ``r_hat_t = sigmoid(c(y) * (logp_t - ref_logp_t)) - 0.5``,
  detached, so they live on the same (-0.5, 0.5) scale; ``ref_logp_t = 0`` without reference).

Typical ranges: ``alpha`` in {0.1, 0.25, 0.5} (paper). ``alpha = 0`` gives the plain loss exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from treg_lightning.errors import ConfigError
from treg_lightning.losses.base import LossOutput


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
        token_rewards: ``"self"`` uses the cached self-generated rewards (paper); ``"sft"``
            regularizes with ``r_hat = 1`` on chosen tokens only; ``"implicit"`` uses the policy's
            own implicit token rewards (ablations).
    """

    def __init__(
        self,
        alpha: float = 0.25,
        weighting: Literal["dynamic", "static"] = "dynamic",
        token_rewards: Literal["self", "sft", "implicit"] = "self",
    ) -> None:
        super().__init__()
        if alpha < 0:
            raise ConfigError(f"TokenRewardRegularizer: alpha must be >= 0, got {alpha}.")
        if weighting not in ("dynamic", "static"):
            raise ConfigError(f"weighting must be 'dynamic' or 'static', got {weighting!r}.")
        if token_rewards not in ("self", "sft", "implicit"):
            raise ConfigError(
                f"token_rewards must be 'self', 'sft' or 'implicit', got {token_rewards!r}."
            )
        self.alpha = alpha
        self.weighting = weighting
        self.token_rewards = token_rewards

    @property
    def needs_token_rewards(self) -> bool:
        """Whether the batch must carry cached ``r_hat`` (only the paper's own variant does)."""
        return self.alpha > 0 and self.token_rewards == "self"

    def forward(
        self,
        out: LossOutput,
        chosen_token_logps: torch.Tensor,
        chosen_mask: torch.Tensor,
        chosen_token_rewards: torch.Tensor | None,
        rejected_token_logps: torch.Tensor,
        rejected_mask: torch.Tensor,
        rejected_token_rewards: torch.Tensor | None,
        chosen_ref_token_logps: torch.Tensor | None = None,
        rejected_ref_token_logps: torch.Tensor | None = None,
    ) -> RegularizerOutput:
        """Per-token tensors are ``[batch, seq]`` aligned with the input ids; masks are bool."""
        weight = out.weight if self.weighting == "dynamic" else torch.ones_like(out.weight)
        if self.alpha == 0:
            zeros = torch.zeros_like(out.losses)
            return RegularizerOutput(zeros, zeros, zeros, weight.detach())
        chosen_rewards, rejected_rewards = self._targets(
            out,
            chosen_token_logps,
            chosen_token_rewards,
            rejected_token_logps,
            rejected_token_rewards,
            chosen_ref_token_logps,
            rejected_ref_token_logps,
        )
        chosen_reg = reward_weighted_nll(
            out.chosen_token_scale, chosen_token_logps, chosen_rewards, chosen_mask
        )
        rejected_reg = reward_weighted_nll(
            out.rejected_token_scale, rejected_token_logps, rejected_rewards, rejected_mask
        )
        weight = weight.detach()
        losses = self.alpha * weight * (chosen_reg + rejected_reg)
        return RegularizerOutput(losses, chosen_reg, rejected_reg, weight)

    def _targets(
        self,
        out,
        chosen_token_logps,
        chosen_token_rewards,
        rejected_token_logps,
        rejected_token_rewards,
        chosen_ref_token_logps,
        rejected_ref_token_logps,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The token rewards ``r_hat`` to regularize towards, detached."""
        if self.token_rewards == "sft":
            return torch.ones_like(chosen_token_logps), torch.zeros_like(rejected_token_logps)
        if self.token_rewards == "implicit":
            return (
                _implicit_rewards(
                    out.chosen_token_scale, chosen_token_logps, chosen_ref_token_logps
                ),
                _implicit_rewards(
                    out.rejected_token_scale, rejected_token_logps, rejected_ref_token_logps
                ),
            )
        if chosen_token_rewards is None or rejected_token_rewards is None:
            raise ConfigError(
                "TokenRewardRegularizer(token_rewards='self') needs cached token rewards in the "
                "batch (chosen_token_rewards / rejected_token_rewards): build the token-reward "
                "cache with `treg annotate`, or set regularizer.alpha: 0 to train without T-REG."
            )
        return chosen_token_rewards.detach(), rejected_token_rewards.detach()


def _implicit_rewards(
    token_scale: torch.Tensor, token_logps: torch.Tensor, ref_token_logps: torch.Tensor | None
) -> torch.Tensor:
    log_ratio = token_logps if ref_token_logps is None else token_logps - ref_token_logps
    return (torch.sigmoid(token_scale[:, None] * log_ratio) - 0.5).detach()
