"""The pair contract: sequence values summed from token values, and a batch's scores."""

from __future__ import annotations

import torch

from builders import pair_batch
from treg_lightning.pairs import (
    SIDES,
    TOKEN_FIELDS,
    VALUE_FIELDS,
    PairScores,
    ResponseScores,
    field,
)


def test_field_names_carry_the_side_and_the_shape():
    assert field("chosen", "token_rewards") == "chosen_token_rewards"
    assert SIDES == ("chosen", "rejected")
    assert set(VALUE_FIELDS) <= set(TOKEN_FIELDS)


def test_response_scores_sum_over_the_mask_only():
    """logps = sum of token logps where mask; junk (nan) outside the mask never counts."""
    token_logps = torch.tensor([[float("nan"), -1.0, -2.0], [-9.0, -0.5, float("inf")]])
    mask = torch.tensor([[False, True, True], [False, True, False]])
    ref = torch.tensor([[0.0, -1.5, -1.0], [0.0, -2.0, 0.0]])
    scores = ResponseScores.from_tokens(token_logps, mask, ref)
    torch.testing.assert_close(scores.logps, torch.tensor([-3.0, -0.5]))
    torch.testing.assert_close(scores.ref_logps, torch.tensor([-2.5, -2.0]))
    assert scores.lengths.tolist() == [2, 1]
    assert ResponseScores.from_tokens(token_logps, mask).ref_logps is None


def test_pair_from_batch_takes_rewards_from_the_batch_and_the_reference_as_given():
    batch = pair_batch(seed=1)
    token_logps = {side: -torch.rand(batch[f"{side}_input_ids"].shape) for side in SIDES}
    pair = PairScores.from_batch(batch, token_logps)
    assert pair.has_token_rewards and not pair.has_reference
    assert pair.chosen.token_rewards is batch["chosen_token_rewards"]
    ref = {side: torch.zeros_like(values) for side, values in token_logps.items()}
    with_ref = PairScores.from_batch(batch, token_logps, ref)
    assert with_ref.has_reference
    torch.testing.assert_close(with_ref.rejected.ref_logps, torch.zeros(2))
    no_rewards = {k: v for k, v in batch.items() if "token_rewards" not in k}
    assert not PairScores.from_batch(no_rewards, token_logps).has_token_rewards
    assert [name for name, _ in pair.sides()] == list(SIDES)
