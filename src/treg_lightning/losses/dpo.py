"""Direct Preference Optimization (DPO).

Paper: Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model", NeurIPS 2023, https://arxiv.org/abs/2305.18290. Conservative DPO (label smoothing):
Mitchell, "A note on DPO with noisy preferences" (2023).

With ``r = sum_t logp_t - sum_t ref_logp_t`` per response and ``h = r_w - r_l``::

    L = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

Implicit reward ``beta * r``; T-REG token scale ``c(y) = beta``; sequence weight
``w = sigmoid(beta * (r_l - r_w))`` (T-REG paper, eq. for DPO-REG).

Typical ranges: ``beta`` 0.01-0.5 (0.01 for Llama-3-8B-Instruct on-policy data, 0.1 common);
``label_smoothing`` 0 (plain DPO) to 0.1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from treg_lightning.errors import ConfigError
from treg_lightning.losses.base import LossOutput, PreferenceLossModule, require_reference
from treg_lightning.pairs import PairScores


class DPOLoss(PreferenceLossModule):
    """DPO loss with optional label smoothing (cDPO).

    Args:
        beta: temperature of the implicit reward; larger keeps the policy closer to the reference.
        label_smoothing: probability ``eps`` that a preference label is flipped, in [0, 0.5).
    """

    needs_reference = True
    needs_token_rewards = False
    card_tag = "dpo"  # the model card's Hub tag

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not beta > 0:  # also refuses NaN
            raise ConfigError(f"DPOLoss: beta must be > 0, got {beta}.")
        if not 0.0 <= label_smoothing < 0.5:
            raise ConfigError(
                f"DPOLoss: label_smoothing must be in [0, 0.5), got {label_smoothing}."
            )
        self.beta = beta
        self.label_smoothing = label_smoothing

    def extra_repr(self) -> str:
        return f"beta={self.beta}, label_smoothing={self.label_smoothing}"

    def forward(self, pair: PairScores) -> LossOutput:
        require_reference("DPOLoss", pair)
        chosen, rejected = pair.chosen, pair.rejected
        chosen_ratio = chosen.logps - chosen.ref_logps
        rejected_ratio = rejected.logps - rejected.ref_logps
        logits = self.beta * (chosen_ratio - rejected_ratio)
        eps = self.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        scale = torch.full_like(chosen.logps, self.beta).detach()
        return LossOutput(
            losses=losses,
            chosen_rewards=(self.beta * chosen_ratio).detach(),
            rejected_rewards=(self.beta * rejected_ratio).detach(),
            chosen_token_scale=scale,
            rejected_token_scale=scale,
            weight=torch.sigmoid(-logits).detach(),
            uses_reference=True,
        )
