"""A loss declares what it needs from the data (``needs_reference``, ``needs_token_rewards``)
and the start-up check asks it: a new loss that reads token rewards, configured without a
token-reward source, is refused before any model loads."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from builders import refused_before_training, tiny_fit_args, write_pairs
from treg_lightning.errors import ConfigError
from treg_lightning.losses import DPOLoss, IPOLoss, SimPOLoss
from treg_lightning.losses.base import LossOutput
from treg_lightning.module.checks import check_pair_inputs
from treg_lightning.pairs import PairScores, ResponseScores
from treg_lightning.rewards import TokenRewardSource


class RewardWeightedSimPO(nn.Module):
    """SimPO, each pair weighted by ``1 + mean token reward`` of its chosen response: a loss
    that reads the data's token rewards. A plain ``nn.Module``, as a user's loss may be (not
    derived from ``PreferenceLossModule``, so ``treg fit --help`` does not list it).

    Args:
        beta: SimPO's reward scale.
    """

    needs_reference = False
    needs_token_rewards = True

    def __init__(self, beta: float = 2.0) -> None:
        super().__init__()
        self.simpo = SimPOLoss(beta=beta)

    def forward(self, pair: PairScores) -> LossOutput:
        chosen = pair.chosen
        rewards = (chosen.token_rewards * chosen.mask).sum(-1) / chosen.mask.sum(-1)
        out = self.simpo(pair)
        return dataclasses.replace(out, losses=out.losses * (1 + rewards))


class _Source(TokenRewardSource):
    def __init__(self, token_rewards: bool) -> None:
        self.token_rewards = token_rewards

    @property
    def provides_token_rewards(self) -> bool:
        return self.token_rewards

    def annotate(self, rows, split, context):
        return rows


def test_shipped_losses_need_no_token_rewards():
    needs = {type(loss).__name__: (loss.needs_reference, loss.needs_token_rewards)
             for loss in (DPOLoss(), IPOLoss(), SimPOLoss())}  # fmt: skip
    assert needs == {
        "DPOLoss": (True, False),
        "IPOLoss": (True, False),
        "SimPOLoss": (False, False),
    }


@pytest.mark.parametrize("rewards", [None, _Source(token_rewards=False)])
def test_a_loss_needing_token_rewards_is_refused_without_them(rewards):
    name = "null (no token-reward source)" if rewards is None else "_Source"
    with pytest.raises(ConfigError) as info:
        check_pair_inputs(RewardWeightedSimPO(), None, None, rewards)
    assert str(info.value).startswith(
        f"model.loss RewardWeightedSimPO needs token rewards in the data, but data.rewards is "
        f"{name}, which provides none."
    )


def test_a_loss_needing_token_rewards_runs_with_a_source():
    check_pair_inputs(RewardWeightedSimPO(), None, None, _Source(token_rewards=True))
    mask = torch.ones(1, 2, dtype=torch.bool)
    chosen = ResponseScores.from_tokens(
        torch.tensor([[-1.0, -1.0]]), mask, token_rewards=torch.tensor([[0.5, 0.0]])
    )
    rejected = ResponseScores.from_tokens(torch.tensor([[-2.0, -2.0]]), mask)
    out = RewardWeightedSimPO(beta=2.0)(PairScores(chosen, rejected))
    # SimPO: margin = 2 * (-1) - 2 * (-2) - gamma (1.0) = 1; weight 1 + mean(0.5, 0) = 1.25
    expected = 1.25 * torch.nn.functional.softplus(torch.tensor([-1.0]))
    torch.testing.assert_close(out.losses, expected)


def test_treg_fit_refuses_it_at_start_up(tiny_model_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl")
    loss = f"{__name__}.RewardWeightedSimPO"
    args = ["fit", *tiny_fit_args(tiny_model_dir, data, tmp_path, loss=loss, rewards="null")]
    err = refused_before_training(args, capsys)
    assert "model.loss RewardWeightedSimPO needs token rewards in the data" in err
