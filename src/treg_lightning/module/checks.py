"""The start-up check that joins the data's reward source to what the loss and regularizer need
(each declares it: ``needs_reference``, ``needs_token_rewards``).

Run before any model is loaded (by the CLI for every subcommand that trains or evaluates, and by
``PreferenceModule.prepare_data`` under a plain ``Trainer``), so a run that would silently train
the wrong thing, or fail mid-epoch, fails in seconds with the two settings named.
:func:`check_module_settings` does the same for module settings that the forward pass would
refuse only after the model loads.
"""

from __future__ import annotations

from torch import nn

from treg_lightning.errors import ConfigError
from treg_lightning.models.varlen_attention import runs_varlen
from treg_lightning.module.hparams import real_class
from treg_lightning.rewards.source import TokenRewardSource


def _source_name(rewards: TokenRewardSource | None) -> str:
    return "null (no token-reward source)" if rewards is None else real_class(rewards).__name__


def check_pair_inputs(
    loss: nn.Module,
    regularizer: nn.Module | None,
    live_reference: bool | None,
    rewards: TokenRewardSource | None,
) -> None:
    """Raise :class:`ConfigError` when the loss or the regularizer needs what nothing provides.

    Args:
        loss: the sequence loss (``needs_reference``, ``needs_token_rewards``).
        regularizer: the T-REG regularizer or None (``needs_token_rewards``).
        live_reference: the module's setting: False never loads a reference model.
        rewards: the data's token-reward source, or None.
    """
    if regularizer is not None and regularizer.needs_token_rewards:
        if rewards is None or not rewards.provides_token_rewards:
            targets = real_class(regularizer.targets).__name__
            raise ConfigError(
                f"model.regularizer (alpha {regularizer.alpha}, targets {targets}) needs token "
                f"rewards in the data, but data.rewards is {_source_name(rewards)}, which "
                "provides none. Set data.rewards to a token-reward source (e.g. class_path: "
                "treg_lightning.rewards.ContrastiveRewards), or train without T-REG "
                "(model.regularizer.alpha: 0 or model.regularizer: null)."
            )
    if getattr(loss, "needs_token_rewards", False):
        if rewards is None or not rewards.provides_token_rewards:
            raise ConfigError(
                f"model.loss {real_class(loss).__name__} needs token rewards in the data, but "
                f"data.rewards is {_source_name(rewards)}, which provides none. Set data.rewards "
                "to a token-reward source (e.g. class_path: "
                "treg_lightning.rewards.ContrastiveRewards), or choose a loss that needs none."
            )
    if getattr(loss, "needs_reference", False) and live_reference is False:
        if rewards is None or not rewards.provides_reference_logps:
            raise ConfigError(
                f"{real_class(loss).__name__} needs reference log-probabilities, but "
                "model.live_reference is false and data.rewards is "
                f"{_source_name(rewards)}, which serves no cached reference log-probs. Either "
                "let the source cache them (data.rewards: ContrastiveRewards with "
                "store_reference_logps: true) or set model.live_reference: null to load the "
                "reference model."
            )


def check_module_settings(
    logp_chunk_size: int, packing: bool | None, attn_implementation: str | None
) -> None:
    """Raise :class:`ConfigError` for module settings the first forward would refuse."""
    if logp_chunk_size < 1:
        raise ConfigError(
            "model.logp_chunk_size must be >= 1 (tokens per chunk of logits in the log-prob "
            f"pass), got {logp_chunk_size}."
        )
    if (
        packing
        and attn_implementation not in (None, "auto", "eager", "sdpa")
        and not runs_varlen(attn_implementation)
    ):
        raise ConfigError(
            f"model.packing: true runs packed rows with flash-attention (varlen), sdpa or eager "
            f"attention, but model.attn_implementation is {attn_implementation!r}: set "
            "model.packing to null (auto) or false, or choose one of those kernels."
        )
