"""The pair contract, defined once: the fields of a preference pair and of a batch of them.

Every layer speaks these names: the token-reward cache and the tokenized rows, the collator,
packing, the module, the losses, the regularizer and the metrics. A new field is added here.

Names carry shape. Per side (``chosen``, ``rejected``):

============================  ==========  ====================================================
batch field                   shape       meaning
============================  ==========  ====================================================
``{side}_input_ids``          ``[B, T]``  long; prompt ids then response ids, right-padded
``{side}_attention_mask``     ``[B, T]``  long; 1 on real tokens
``{side}_response_mask``      ``[B, T]``  bool; True on response tokens (the scored ones)
``{side}_token_rewards``      ``[B, T]``  float32 ``r_hat_t``; only when the data has token
                                          rewards (never filled with zeros)
``{side}_ref_token_logps``    ``[B, T]``  float32 reference ``log p(y_t | x, y_<t)``; only
                                          when the data has reference log-probs
``index``                     ``[B]``     long; row number of each pair in its source
``prompt_lengths``            ``[B]``     long; prompt tokens of each pair (same on both sides)
============================  ==========  ====================================================

Per-token values are aligned with ``input_ids``: the value of response token ``j`` sits at
position ``prompt_length + j``; prompt and padding positions hold 0.

A row (one tokenized pair, as the data layer and the token-reward cache hold it) has ``index``,
``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists of ints) and, per side, the per-token
value lists ``{side}_token_rewards`` / ``{side}_ref_token_logps`` (one value per response
token) under the same names as the batch fields they become.

What the losses and the regularizer see is :class:`PairScores`: per side a
:class:`ResponseScores` with sequence values (``logps``, ``ref_logps``, ``lengths``: ``[B]``)
and the per-token tensors they come from (``token_logps``, ``mask``, ``ref_token_logps``,
``token_rewards``: ``[B, T]``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

SIDES = ("chosen", "rejected")

# Per-token batch fields of each side, in the order the collator writes them.
TOKEN_FIELDS = ("input_ids", "attention_mask", "response_mask", "token_rewards", "ref_token_logps")
# Per-token values a row may carry (one per response token), served under the same names.
VALUE_FIELDS = ("token_rewards", "ref_token_logps")
# Token-id lists of a row.
ID_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``[batch, seq]`` token log-probs over masked-in positions: ``[batch]``.

    ``where`` rather than a product with the mask: a masked position never contributes, even
    when its value is not finite.
    """
    return torch.where(mask.bool(), token_logps, 0.0).sum(-1)


def field(side: str, name: str) -> str:
    """The key of a side's field: ``field("chosen", "token_rewards") == "chosen_token_rewards"``."""
    return f"{side}_{name}"


@dataclass
class ResponseScores:
    """One response of every pair in a batch (all chosen, or all rejected).

    Attributes:
        logps: ``[B]`` summed policy log-probs of the response tokens.
        lengths: ``[B]`` number of response tokens ``|y|``.
        ref_logps: ``[B]`` summed reference log-probs, or None (reference-free, or none known).
        token_logps: ``[B, T]`` policy log-probs per token (None when built from sums only).
        mask: ``[B, T]`` bool response mask of ``token_logps``.
        ref_token_logps: ``[B, T]`` reference log-probs per token, or None.
        token_rewards: ``[B, T]`` self-generated token rewards ``r_hat_t``, or None.
    """

    logps: torch.Tensor
    lengths: torch.Tensor
    ref_logps: torch.Tensor | None = None
    token_logps: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    ref_token_logps: torch.Tensor | None = None
    token_rewards: torch.Tensor | None = None

    @classmethod
    def from_tokens(
        cls,
        token_logps: torch.Tensor,
        mask: torch.Tensor,
        ref_token_logps: torch.Tensor | None = None,
        token_rewards: torch.Tensor | None = None,
    ) -> ResponseScores:
        """Sequence values summed from per-token ones over ``mask``."""
        mask = mask.bool()
        ref_logps = None if ref_token_logps is None else sequence_logps(ref_token_logps, mask)
        return cls(
            logps=sequence_logps(token_logps, mask),
            lengths=mask.sum(-1),
            ref_logps=ref_logps,
            token_logps=token_logps,
            mask=mask,
            ref_token_logps=ref_token_logps,
            token_rewards=token_rewards,
        )


@dataclass
class PairScores:
    """Both responses of every pair in a batch: what losses and the regularizer take."""

    chosen: ResponseScores
    rejected: ResponseScores

    def sides(self) -> Iterator[tuple[str, ResponseScores]]:
        """``("chosen", scores), ("rejected", scores)``."""
        yield SIDES[0], self.chosen
        yield SIDES[1], self.rejected

    @property
    def has_reference(self) -> bool:
        return self.chosen.ref_logps is not None and self.rejected.ref_logps is not None

    @property
    def has_token_rewards(self) -> bool:
        return self.chosen.token_rewards is not None and self.rejected.token_rewards is not None

    @classmethod
    def from_sequences(
        cls,
        chosen_logps: torch.Tensor,
        rejected_logps: torch.Tensor,
        chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor,
        chosen_ref_logps: torch.Tensor | None = None,
        rejected_ref_logps: torch.Tensor | None = None,
    ) -> PairScores:
        """Sequence-level scores only (all ``[B]``): enough for the sequence losses."""
        return cls(
            ResponseScores(chosen_logps, chosen_lengths, chosen_ref_logps),
            ResponseScores(rejected_logps, rejected_lengths, rejected_ref_logps),
        )

    @classmethod
    def from_batch(
        cls,
        batch: dict[str, torch.Tensor],
        token_logps: dict[str, torch.Tensor],
        ref_token_logps: dict[str, torch.Tensor] | None = None,
    ) -> PairScores:
        """Scores of a batch: the policy's ``token_logps[side]`` ``[B, T]``, the reference's
        ``ref_token_logps[side]`` (or None: reference-free), and the batch's response masks and
        token rewards (when it carries them)."""
        sides = {
            side: ResponseScores.from_tokens(
                token_logps[side],
                batch[field(side, "response_mask")],
                None if ref_token_logps is None else ref_token_logps[side],
                batch.get(field(side, "token_rewards")),
            )
            for side in SIDES
        }
        return cls(**sides)
