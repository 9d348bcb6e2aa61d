"""Sequence-level preference losses, the T-REG token-level regularizer and its targets."""

from treg_lightning.losses.base import LossOutput, PreferenceLoss, implicit_token_rewards
from treg_lightning.losses.dpo import DPOLoss
from treg_lightning.losses.ipo import IPOLoss
from treg_lightning.losses.simpo import SimPOLoss
from treg_lightning.losses.targets import (
    ChosenSFT,
    ImplicitRewards,
    SelfGeneratedRewards,
    TokenTargets,
)
from treg_lightning.losses.treg import RegularizerOutput, TokenRewardRegularizer

__all__ = [
    "ChosenSFT",
    "DPOLoss",
    "IPOLoss",
    "ImplicitRewards",
    "LossOutput",
    "PreferenceLoss",
    "RegularizerOutput",
    "SelfGeneratedRewards",
    "SimPOLoss",
    "TokenRewardRegularizer",
    "TokenTargets",
    "implicit_token_rewards",
]
