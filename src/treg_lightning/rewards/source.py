"""Where a run's token rewards come from: the reward-source protocol.

A source turns tokenized pairs into the same pairs plus per-token values, under the names of
:mod:`treg_lightning.pairs`: ``{side}_token_rewards`` (``r_hat``, one value per response token)
and, if it serves them, ``{side}_ref_token_logps``. It is injected into
:class:`~treg_lightning.data.PreferenceDataModule` as ``rewards`` (``class_path`` in YAML; null
for no token rewards) and owns whatever it needs: an evaluator model, its device, a cache.

The module and the CLI ask it, never compare its name:

- ``provides_token_rewards`` / ``provides_reference_logps``: what its rows carry, matched at
  start-up against what the regularizer and the loss need (:mod:`treg_lightning.module.checks`);
- ``cache_folder``: where it writes (checked for writability at start-up), or None;
- ``check_models``: the models it will load, checked at start-up (existence, kind, vocabulary).

A new source (say, rewards from an external token-level reward model) is one class in one
file that implements :meth:`TokenRewardSource.annotate`, plus a config naming it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class AnnotationContext:
    """What the data module hands a source with the rows of one split.

    Attributes:
        tokenizer: the tokenizer that produced the rows' ids.
        model_name: the name the tokenizer was loaded from (``data.tokenizer``, which follows
            ``model.model``): the reference model, the default evaluator.
        device: the device this process computes on.
        settings: data settings that change the tokenized rows (``max_length``,
            ``max_prompt_length``), for fingerprints.
        trust_remote_code: whether model code from the hub may run.
    """

    tokenizer: Any
    model_name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    settings: Mapping[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False


class TokenRewardSource(ABC):
    """Per-token values for tokenized preference pairs (see the module docstring)."""

    @property
    def provides_token_rewards(self) -> bool:
        """Whether the annotated rows carry ``{side}_token_rewards``."""
        return True

    @property
    def provides_reference_logps(self) -> bool:
        """Whether the annotated rows carry ``{side}_ref_token_logps`` (reference log-probs)."""
        return False

    @property
    def cache_folder(self) -> Path | None:
        """The folder this source writes into, or None."""
        return None

    @abstractmethod
    def annotate(
        self, rows: list[Mapping[str, Any]], split: str, context: AnnotationContext
    ) -> Sequence[Mapping[str, Any]]:
        """The rows of ``split`` with their per-token values, in the same order.

        Called on every process (a source may split the work across ranks); must return the
        same rows on every process. Each value list has one entry per response token
        (``len(row["chosen_ids"])`` for ``chosen_token_rewards``).
        """

    def check_models(self, context: AnnotationContext, setting: str = "data.rewards") -> None:
        """Refuse, at start-up, the models this source would load: missing, of the wrong kind, or
        reading another vocabulary than ``context.tokenizer`` (see
        :func:`treg_lightning.models.preflight.check_model`). Called before any pair is
        tokenized or model loaded; reads no weights. ``setting`` names the source in messages
        (``data.rewards``, ``--second``). A source that loads no model keeps this no-op.
        """

    def release(self) -> None:
        """Free what only annotation needs (an evaluator model), before training starts."""


def cache_folder_for(cache_dir: str | Path | None) -> Path:
    """Where a cached source writes: ``cache_dir``, or ``<cache root>/token_rewards``
    (``$TREG_CACHE`` or ``~/.cache/treg_lightning``)."""
    from treg_lightning.models.loading import cache_root

    return Path(cache_dir) if cache_dir else cache_root() / "token_rewards"
