"""Preference metrics as torchmetrics, one :class:`PreferenceMetrics` per stage.

Sequence level (per pair, averaged): reward accuracy (chosen implicit reward > rejected), margin,
chosen/rejected rewards, chosen/rejected summed log-probs, the T-REG term
``alpha * w * (L_REG_w + L_REG_l)`` and the sequence weight ``w``.

Token level: agreement between the loss's implicit token rewards
``c(y) * (logp_t - ref_logp_t)`` (``c(y) * logp_t`` for a reference-free loss) and the
self-generated rewards ``r_hat_t`` the data carries, over response tokens:

- ``token_sign_agreement``: share of tokens whose signs match, ignoring ``r_hat_t == 0``
  (pooled over all tokens of the epoch);
- ``token_reward_pearson``: Pearson correlation over the tokens of one batch, averaged over
  batches.

torchmetrics accumulates the states and syncs them across processes when the epoch value is
computed, so ``train/*`` and ``val/*`` epoch values are global.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric

from treg_lightning.losses.base import LossOutput, implicit_token_rewards
from treg_lightning.pairs import PairScores


class SignAgreement(Metric):
    """Share of positions where ``sign(preds) == sign(target)``, ignoring ``target == 0``."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("matches", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        counted = mask.bool() & (target != 0)
        agree = (torch.sign(preds) == torch.sign(target)) & counted
        self.matches += agree.sum().to(self.matches.dtype)
        self.total += counted.sum().to(self.total.dtype)

    def compute(self) -> torch.Tensor:
        return self.matches / self.total.clamp(min=1)


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two 1-d tensors; NaN when either has no variance."""
    x = x.double() - x.double().mean()
    y = y.double() - y.double().mean()
    return ((x * y).sum() / (x.norm() * y.norm())).float()


class PreferenceMetrics(nn.ModuleDict):
    """All metrics of one stage; ``update_from`` feeds them one batch."""

    def __init__(self) -> None:
        names = (
            "reward_accuracy",
            "margin",
            "chosen_reward",
            "rejected_reward",
            "chosen_logps",
            "rejected_logps",
            "treg",
            "weight",
            "token_reward_pearson",
        )
        super().__init__({name: MeanMetric() for name in names})
        self["token_sign_agreement"] = SignAgreement()

    def update_from(
        self, pair: PairScores, loss_output: LossOutput, regularizer_output=None
    ) -> dict[str, Metric]:
        """Update from one batch (``forward``, so each metric caches its batch value).

        Returns the metrics updated by this batch: the token-level ones need token rewards in
        the pair and the T-REG term needs a regularizer. The set depends only on the
        configuration, never on the values, so every process logs (and syncs) the same ones.
        """
        out = loss_output
        values = {
            "reward_accuracy": (out.chosen_rewards > out.rejected_rewards).float(),
            "margin": out.margins,
            "chosen_reward": out.chosen_rewards,
            "rejected_reward": out.rejected_rewards,
            "weight": out.weight,
            "chosen_logps": pair.chosen.logps.detach(),
            "rejected_logps": pair.rejected.logps.detach(),
        }
        if regularizer_output is not None:
            values["treg"] = regularizer_output.losses.detach()
        updated = {}
        for name, value in values.items():
            self[name](value.float())
            updated[name] = self[name]
        if pair.has_token_rewards and pair.chosen.token_logps is not None:
            updated.update(self._update_token_agreement(pair, out))
        return updated

    def _update_token_agreement(self, pair: PairScores, out: LossOutput) -> dict[str, Metric]:
        preds, target = [], []
        for side, scores in pair.sides():
            rewards = implicit_token_rewards(out, side, scores)
            preds.append(rewards[scores.mask])
            target.append(scores.token_rewards[scores.mask].to(rewards.dtype))
        preds, target = torch.cat(preds), torch.cat(target)
        self["token_sign_agreement"](preds, target, torch.ones_like(preds, dtype=torch.bool))
        # Undefined correlations (no variance, e.g. implicit rewards all 0 at the start of DPO)
        # get weight 0. The metric is still updated on every rank: metrics are synced across
        # processes, and a rank that skipped one would leave the others waiting.
        correlation = pearson(preds, target)
        defined = torch.isfinite(correlation)
        self["token_reward_pearson"](
            torch.where(defined, correlation, 0.0), weight=defined.to(correlation.dtype)
        )
        return {name: self[name] for name in ("token_sign_agreement", "token_reward_pearson")}
