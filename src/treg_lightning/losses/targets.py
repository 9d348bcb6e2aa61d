"""What the T-REG regularizer pulls the policy's token rewards towards: the targets ``r_hat``.

One small class per choice; the regularizer takes one as ``targets`` (``class_path`` in YAML):

- :class:`SelfGeneratedRewards` (the paper's T-REG): the self-generated token rewards the data
  carries (``{side}_token_rewards``, from the contrastive annotate pass or another source);
- :class:`ChosenSFT` (ablation "SFT on y_w"): ``r_hat = 1`` on chosen tokens, nothing on
  rejected ones;
- :class:`ImplicitRewards` (ablation): the policy's own implicit token rewards, the loss's
  ``c(y) * (logp_t - ref_logp_t)`` (DPO, IPO) or ``c(y) * logp_t`` (SimPO, reference-free: no
  reference term even when reference log-probs are cached), squashed as ``sigmoid(.) - 0.5`` so
  they live on ``r_hat``'s (-0.5, 0.5) scale; detached.

A target returns ``(chosen, rejected)`` ``[batch, seq]`` tensors aligned with the token logps,
detached, and says whether it needs token rewards in the data (``needs_token_rewards``), which
the start-up check matches against the run's reward source.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from treg_lightning.errors import ConfigError
from treg_lightning.losses.base import LossOutput, implicit_token_rewards
from treg_lightning.pairs import PairScores


@runtime_checkable
class TokenTargets(Protocol):
    """The ``r_hat`` the regularizer uses; see the module docstring."""

    needs_token_rewards: bool

    def __call__(self, pair: PairScores, out: LossOutput) -> tuple[torch.Tensor, torch.Tensor]: ...


class _Targets:
    """Shared by the shipped targets: a readable ``repr``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SelfGeneratedRewards(_Targets):
    """The data's token rewards ``r_hat`` (T-REG as in the paper)."""

    needs_token_rewards = True

    def __call__(self, pair: PairScores, out: LossOutput) -> tuple[torch.Tensor, torch.Tensor]:
        if not pair.has_token_rewards:
            raise ConfigError(
                "TokenRewardRegularizer with SelfGeneratedRewards targets needs token rewards "
                "in the batch (chosen_token_rewards / rejected_token_rewards), and this batch "
                "has none: set data.rewards to a token-reward source (e.g. "
                "treg_lightning.rewards.ContrastiveRewards), or set model.regularizer.alpha: 0 "
                "(or model.regularizer: null) to train without T-REG."
            )
        return pair.chosen.token_rewards.detach(), pair.rejected.token_rewards.detach()


class ChosenSFT(_Targets):
    """``r_hat = 1`` on every chosen token, 0 on rejected ones (ablation: SFT on ``y_w``)."""

    needs_token_rewards = False

    def __call__(self, pair: PairScores, out: LossOutput) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(pair.chosen.token_logps), torch.zeros_like(pair.rejected.token_logps)


class ImplicitRewards(_Targets):
    """``sigmoid(implicit token reward) - 0.5`` of the loss itself (ablation)."""

    needs_token_rewards = False

    def __call__(self, pair: PairScores, out: LossOutput) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected = (
            torch.sigmoid(implicit_token_rewards(out, side, scores)) - 0.5
            for side, scores in pair.sides()
        )
        return chosen, rejected
