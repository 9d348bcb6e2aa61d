"""Pair batches and the two forward paths the varlen emulations compare (padded vs packed),
with values and every parameter gradient: shared by tests/forward/test_flash_emulation.py and
tests/forward/test_torch_varlen.py."""

from __future__ import annotations

import torch

from treg_lightning.forward.batch import packed_token_logps, padded_token_logps

VOCAB = 64
SIDES = ("chosen", "rejected")
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10}


def contract_batch(seed=0, prompts=(3, 1, 5), chosen=(4, 6, 2), rejected=(2, 1, 7)):
    """The contract's pair batch (right padding, shared prompts, token rewards)."""
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = [torch.randint(1, VOCAB, (n,), generator=generator) for n in prompts]
    batch = {"index": torch.arange(len(prompts))}
    for side, responses in zip(SIDES, (chosen, rejected)):
        lengths = [p + r for p, r in zip(prompts, responses)]
        ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
        response = torch.zeros_like(ids, dtype=torch.bool)
        for b, (p, n) in enumerate(zip(prompts, lengths)):
            ids[b, :p] = prompt_ids[b]
            ids[b, p:n] = torch.randint(1, VOCAB, (n - p,), generator=generator)
            response[b, p:n] = True
        attention = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
        rewards = torch.rand(ids.shape, generator=generator) - 0.5
        batch |= {
            f"{side}_input_ids": ids,
            f"{side}_attention_mask": attention,
            f"{side}_response_mask": response,
            f"{side}_token_rewards": torch.where(response, rewards, 0.0),
        }
    return batch


def weighted_loss(token_logps, batch):
    """Weighs every response token differently, so each token's gradient path counts."""
    total = 0
    for side, sign in zip(SIDES, (1.0, -0.7)):
        weights = batch[f"{side}_token_rewards"] + 0.05 * torch.arange(token_logps[side].shape[1])
        total = total + sign * (token_logps[side] * weights).sum()
    return total


def logps_and_grads(forward, lm, batch):
    lm.zero_grad(set_to_none=True)
    out = forward(lm, batch)
    weighted_loss(out, batch).backward()
    grads = {name: p.grad.clone() for name, p in lm.named_parameters()}
    return {side: out[side].detach() for side in SIDES}, grads


def packed(lm, batch):
    return packed_token_logps(lm, batch, chunk_size=5, softcap=None)


def padded(lm, batch):
    return padded_token_logps(lm, batch, chunk_size=5, softcap=None)


def assert_same(got, want, batch, tolerance):
    for side in SIDES:
        assert (want[0][side][batch[f"{side}_response_mask"]] < 0).all()
        torch.testing.assert_close(got[0][side], want[0][side], atol=tolerance, rtol=tolerance)
    for name, grad in want[1].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got[1][name], grad, atol=tolerance, rtol=tolerance, msg=name)
