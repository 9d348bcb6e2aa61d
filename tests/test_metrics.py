"""Preference metrics by hand: sign agreement, Pearson, and what one batch updates."""

from __future__ import annotations

import pytest
import torch

from treg_lightning.losses import LossOutput
from treg_lightning.metrics import PreferenceMetrics, SignAgreement, pearson
from treg_lightning.pairs import PairScores, ResponseScores


def _pair(token_logps: dict, masks: dict, rewards: dict, ref: dict | None = None) -> PairScores:
    return PairScores(
        **{
            side: ResponseScores.from_tokens(
                token_logps[side], masks[side], None if ref is None else ref[side], rewards[side]
            )
            for side in ("chosen", "rejected")
        }
    )


def test_sign_agreement_and_pearson_by_hand():
    preds = torch.tensor([0.5, -0.2, 0.1, -0.4, 0.3])
    target = torch.tensor([0.1, 0.2, 0.0, -0.3, -0.1])
    mask = torch.tensor([True, True, True, True, False])
    metric = SignAgreement()
    metric.update(preds, target, mask)
    # counted (mask and target != 0): 0, 1, 3 -> signs agree at 0 and 3.
    torch.testing.assert_close(metric.compute(), torch.tensor(2 / 3))
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 1.0, 4.0, 3.0])
    # cov = 3 (sum of products of deviations), |x - mean| = |y - mean| = sqrt(5): r = 0.6.
    torch.testing.assert_close(pearson(x, y), torch.tensor(0.6))


def test_preference_metrics_values():
    out = LossOutput(
        losses=torch.zeros(2),
        chosen_rewards=torch.tensor([1.0, -1.0]),
        rejected_rewards=torch.tensor([0.0, 0.5]),
        chosen_token_scale=torch.tensor([1.0, 2.0]),
        rejected_token_scale=torch.tensor([1.0, 1.0]),
        weight=torch.tensor([0.25, 0.75]),
        uses_reference=True,
    )
    mask = torch.tensor([[False, True, True], [False, True, False]])
    masks = {"chosen": mask, "rejected": mask}
    rewards = {
        "chosen": torch.tensor([[0.0, 0.2, -0.1], [0.0, 0.3, 0.0]]),
        "rejected": torch.tensor([[0.0, -0.2, 0.1], [0.0, 0.1, 0.0]]),
    }
    token_logps = {
        "chosen": torch.tensor([[0.0, -1.0, -2.0], [0.0, -1.0, 0.0]]),
        "rejected": torch.tensor([[0.0, -1.0, -3.0], [0.0, -2.0, 0.0]]),
    }
    # Reference logps -1.5 everywhere: implicit rewards c * (logp + 1.5).
    ref = {side: torch.full((2, 3), -1.5) for side in masks}
    metrics = PreferenceMetrics()
    updated = metrics.update_from(_pair(token_logps, masks, rewards, ref), out, None)
    assert "treg" not in updated  # no regularizer output: the T-REG term is not logged
    values = {name: float(metric.compute()) for name, metric in updated.items()}
    assert values["reward_accuracy"] == pytest.approx(0.5)
    assert values["margin"] == pytest.approx(((1 - 0) + (-1 - 0.5)) / 2)
    assert values["weight"] == pytest.approx(0.5)
    # chosen sums over the masks: -1 - 2 = -3 and -1, mean -2.
    assert values["chosen_logps"] == pytest.approx(-2.0)
    # implicit chosen: row0 [0.5, -0.5], row1 [1.0]; rejected: row0 [0.5, -1.5], row1 [-0.5]
    # r_hat chosen: [0.2, -0.1], [0.3]; rejected: [-0.2, 0.1], [0.1] -> agree 3 of 6.
    assert values["token_sign_agreement"] == pytest.approx(0.5)
    preds = torch.tensor([0.5, -0.5, 1.0, 0.5, -1.5, -0.5])
    target = torch.tensor([0.2, -0.1, 0.3, -0.2, 0.1, 0.1])
    expected = torch.corrcoef(torch.stack([preds, target]))[0, 1]
    assert values["token_reward_pearson"] == pytest.approx(float(expected), abs=1e-6)


def test_undefined_pearson_counts_with_weight_zero():
    """All implicit rewards 0 (policy == reference): no correlation. The metric is still
    updated (every rank must sync the same metrics) but the batch does not count."""
    mask = torch.tensor([[False, True, True]])
    masks = {"chosen": mask, "rejected": mask}
    rewards = {
        "chosen": torch.tensor([[0.0, 0.2, -0.1]]),
        "rejected": torch.tensor([[0.0, -0.3, 0.1]]),
    }
    out = LossOutput(*(torch.ones(1) for _ in range(6)), uses_reference=True)
    zeros = {side: torch.zeros(1, 3) for side in masks}
    ref = {side: torch.zeros(1, 3) for side in masks}
    metrics = PreferenceMetrics()
    assert "token_reward_pearson" in metrics.update_from(_pair(zeros, masks, rewards, ref), out)
    moved = {**zeros, "chosen": torch.tensor([[0.0, -1.0, -2.0]])}
    metrics.update_from(_pair(moved, masks, rewards, ref), out)
    # second batch: preds [-1, -2, 0, 0] vs [0.2, -0.1, -0.3, 0.1]; r = -0.075 / norms
    preds = torch.tensor([-1.0, -2.0, 0.0, 0.0])
    target = torch.tensor([0.2, -0.1, -0.3, 0.1])
    expected = torch.corrcoef(torch.stack([preds, target]))[0, 1]
    assert abs(float(expected)) > 0.1
    assert float(metrics["token_reward_pearson"].compute()) == pytest.approx(float(expected))


def test_reference_free_loss_agreement_ignores_the_reference():
    """For a reference-free loss (SimPO) the implicit token reward is c * logp_t: reference
    logps, even if present, change nothing (the agreement follows the loss)."""
    mask = torch.tensor([[False, True, True]])
    masks = {"chosen": mask, "rejected": mask}
    rewards = {
        "chosen": torch.tensor([[0.0, 0.2, -0.1]]),
        "rejected": torch.tensor([[0.0, -0.3, 0.1]]),
    }
    logps = {
        "chosen": torch.tensor([[0.0, -1.0, -2.0]]),
        "rejected": torch.tensor([[0.0, -1.0, -3.0]]),
    }
    out = LossOutput(*(torch.ones(1) for _ in range(6)), uses_reference=False)
    # c * logp: chosen [-1, -2] vs r_hat [0.2, -0.1] (agree once), rejected [-1, -3] vs
    # [-0.3, 0.1] (agree once): 2 of 4. A reference of -5 would make every implicit reward > 0.
    for ref in (None, {side: torch.full((1, 3), -5.0) for side in masks}):
        metrics = PreferenceMetrics()
        metrics.update_from(_pair(logps, masks, rewards, ref), out)
        assert float(metrics["token_sign_agreement"].compute()) == pytest.approx(0.5)
