"""Simple Preference Optimization (SimPO): reference-free, length-normalized.

Paper: Meng, Xia, Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
NeurIPS 2024, https://arxiv.org/abs/2405.14734.

With ``h = s_w / |y_w| - s_l / |y_l|`` (``s`` = summed policy token log-probs)::

    L = -log sigmoid(beta * h - gamma),   gamma = gamma_beta_ratio * beta

The target margin is configured as ``gamma_beta_ratio`` (gamma / beta), as in the SimPO
repository's configs. TRL's ``CPOConfig.simpo_gamma`` is the absolute ``gamma``:
``simpo_gamma = gamma_beta_ratio * beta``.

Implicit reward ``beta * s / |y|``; T-REG token scale ``c(y) = beta / |y|``; sequence weight
(ours, the same rule as DPO's) ``w = sigmoid(gamma - beta * h)``. No reference model is needed.

Typical ranges: ``beta`` 2.0-10.0 (10 for Llama-3-8B-Instruct and Gemma-2-9B-it on-policy data),
``gamma_beta_ratio`` 0.3-0.8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from treg_lightning.errors import ConfigError
from treg_lightning.losses.base import LossOutput, PreferenceLossModule
from treg_lightning.pairs import PairScores


class SimPOLoss(PreferenceLossModule):
    """SimPO loss; reference-free.

    Args:
        beta: scale of the length-normalized reward.
        gamma_beta_ratio: target reward margin divided by ``beta`` (``gamma = ratio * beta``).
    """

    needs_reference = False
    needs_token_rewards = False
    card_tag = "simpo"  # the model card's Hub tag

    def __init__(self, beta: float = 2.0, gamma_beta_ratio: float = 0.5) -> None:
        super().__init__()
        if not beta > 0:  # also refuses NaN
            raise ConfigError(f"SimPOLoss: beta must be > 0, got {beta}.")
        if not gamma_beta_ratio >= 0:  # also refuses NaN
            raise ConfigError(f"SimPOLoss: gamma_beta_ratio must be >= 0, got {gamma_beta_ratio}.")
        self.beta = beta
        self.gamma_beta_ratio = gamma_beta_ratio

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma_beta_ratio={self.gamma_beta_ratio}"

    @property
    def gamma(self) -> float:
        """The absolute target margin (TRL's ``simpo_gamma``)."""
        return self.gamma_beta_ratio * self.beta

    def forward(self, pair: PairScores) -> LossOutput:
        # Reference log-probs, if the pair has them, are ignored: SimPO is reference-free.
        chosen, rejected = pair.chosen, pair.rejected
        chosen_lengths = chosen.lengths.to(chosen.logps.dtype).clamp(min=1)
        rejected_lengths = rejected.lengths.to(rejected.logps.dtype).clamp(min=1)
        chosen_rewards = self.beta * chosen.logps / chosen_lengths
        rejected_rewards = self.beta * rejected.logps / rejected_lengths
        logits = chosen_rewards - rejected_rewards - self.gamma
        return LossOutput(
            losses=-F.logsigmoid(logits),
            chosen_rewards=chosen_rewards.detach(),
            rejected_rewards=rejected_rewards.detach(),
            chosen_token_scale=(self.beta / chosen_lengths).detach(),
            rejected_token_scale=(self.beta / rejected_lengths).detach(),
            weight=torch.sigmoid(-logits).detach(),
            uses_reference=False,
        )
