"""Sequence-level preference losses and the T-REG token-level regularizer."""

from treg_lightning.losses.base import LossOutput, PreferenceLoss
from treg_lightning.losses.dpo import DPOLoss
from treg_lightning.losses.ipo import IPOLoss
from treg_lightning.losses.simpo import SimPOLoss
from treg_lightning.losses.treg import RegularizerOutput, TokenRewardRegularizer

__all__ = [
    "DPOLoss",
    "IPOLoss",
    "LossOutput",
    "PreferenceLoss",
    "RegularizerOutput",
    "SimPOLoss",
    "TokenRewardRegularizer",
]
