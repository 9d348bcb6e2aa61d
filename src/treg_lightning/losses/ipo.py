"""Identity Preference Optimization (IPO), length-normalized.

Paper: Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
Preferences", AISTATS 2024, https://arxiv.org/abs/2310.12036. Length normalization of the log
ratios follows TRL's ``ipo`` loss.

With ``r = sum_t logp_t - sum_t ref_logp_t`` and ``h = r_w / |y_w| - r_l / |y_l|``::

    L = (h - 1 / (2 * tau)) ** 2

Implicit reward ``r / |y|``; T-REG token scale ``c(y) = 1 / |y|``; sequence weight (ours, the
magnitude of dL/dh relative to an untrained pair, clamped) ``w = clamp(1 - 2 * tau * h, 0, 1)``:
1 while ``h <= 0``, 0 once the target margin ``1 / (2 * tau)`` is reached.

Typical ranges: ``tau`` 0.01-1.0 (0.1 is a common default; smaller means a larger target margin).
"""

from __future__ import annotations

from treg_lightning.errors import ConfigError
from treg_lightning.losses.base import LossOutput, PreferenceLossModule, require_reference
from treg_lightning.pairs import PairScores


class IPOLoss(PreferenceLossModule):
    """Length-normalized IPO loss.

    Args:
        tau: regularization strength; the loss pulls the normalized margin towards ``1/(2*tau)``.
    """

    needs_reference = True
    needs_token_rewards = False
    card_tag = "ipo"  # the model card's Hub tag

    def __init__(self, tau: float = 0.1) -> None:
        super().__init__()
        if not tau > 0:  # also refuses NaN
            raise ConfigError(f"IPOLoss: tau must be > 0, got {tau}.")
        self.tau = tau

    def extra_repr(self) -> str:
        return f"tau={self.tau}"

    def forward(self, pair: PairScores) -> LossOutput:
        require_reference("IPOLoss", pair)
        chosen, rejected = pair.chosen, pair.rejected
        chosen_lengths = chosen.lengths.to(chosen.logps.dtype).clamp(min=1)
        rejected_lengths = rejected.lengths.to(rejected.logps.dtype).clamp(min=1)
        chosen_rewards = (chosen.logps - chosen.ref_logps) / chosen_lengths
        rejected_rewards = (rejected.logps - rejected.ref_logps) / rejected_lengths
        margin = chosen_rewards - rejected_rewards
        losses = (margin - 1 / (2 * self.tau)) ** 2
        return LossOutput(
            losses=losses,
            chosen_rewards=chosen_rewards.detach(),
            rejected_rewards=rejected_rewards.detach(),
            chosen_token_scale=(1 / chosen_lengths).detach(),
            rejected_token_scale=(1 / rejected_lengths).detach(),
            weight=(1 - 2 * self.tau * margin).clamp(0, 1).detach(),
            uses_reference=True,
        )
