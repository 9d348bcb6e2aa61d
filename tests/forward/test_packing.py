"""Padding-free packing: layout by hand, and packed == padded on a tiny random Llama.

The reference is the padded batch run as usual (attention mask, per-side forward); the packed
row must give the same token log-probs at every response token, the same DPO + T-REG and SimPO
losses, and the same parameter gradients.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from builders import tiny_llama
from treg_lightning.forward.logprobs import token_logps_from_hidden
from treg_lightning.forward.packing import (
    block_diagonal_mask,
    pack_batch,
    packed_model_inputs,
    segment_sums,
    unpack_pairs,
    unpack_tokens,
)
from treg_lightning.losses import DPOLoss, SimPOLoss, TokenRewardRegularizer
from treg_lightning.pairs import PairScores, ResponseScores, sequence_logps

VOCAB = 64
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _side(prompt_lengths, response_lengths, generator, dtype):
    """One side of the contract's batch (right padding), random ids/rewards/ref logps."""
    lengths = [p + r for p, r in zip(prompt_lengths, response_lengths)]
    batch_size, width = len(lengths), max(lengths)
    positions = torch.arange(width)[None]
    length_t = torch.tensor(lengths)[:, None]
    prompt_t = torch.tensor(prompt_lengths)[:, None]
    attention = positions < length_t
    response = attention & (positions >= prompt_t)
    ids = torch.randint(1, VOCAB, (batch_size, width), generator=generator)
    rewards = torch.rand(batch_size, width, generator=generator, dtype=torch.float64) - 0.5
    ref = -3 * torch.rand(batch_size, width, generator=generator, dtype=torch.float64)
    return {
        "input_ids": torch.where(attention, ids, 0),
        "attention_mask": attention.long(),
        "response_mask": response,
        "token_rewards": torch.where(response, rewards, 0.0).float(),
        "ref_token_logps": torch.where(response, ref, 0.0).to(dtype),
    }


def _batch(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    chosen = _side([3, 1, 5], [4, 6, 2], generator, dtype)
    rejected = _side([3, 1, 5], [2, 1, 7], generator, dtype)
    batch = {f"chosen_{k}": v for k, v in chosen.items()}
    batch |= {f"rejected_{k}": v for k, v in rejected.items()}
    batch["index"] = torch.tensor([10, 11, 12])
    return batch


def _model(attn_implementation, dtype):
    return tiny_llama(VOCAB, 0, dtype, attn_implementation=attn_implementation)


def _loss(chosen_token_logps, rejected_token_logps, sides, loss_fn):
    """Mean of (sequence loss + T-REG) on ``[B, T]`` tensors; ``sides`` holds masks etc."""
    pair = PairScores(
        *(
            ResponseScores.from_tokens(token_logps, side["mask"], side["ref"], side["rewards"])
            for token_logps, side in zip(
                (chosen_token_logps, rejected_token_logps), sides, strict=True
            )
        )
    )
    out = loss_fn(pair)
    reg = TokenRewardRegularizer(alpha=0.25)(pair, out)
    return (out.losses + reg.losses).mean()


def _padded(model, batch, loss_fn):
    token_logps, sides = [], []
    for side in ("chosen", "rejected"):
        hidden = model.model(
            input_ids=batch[f"{side}_input_ids"],
            attention_mask=batch[f"{side}_attention_mask"],
            use_cache=False,
        ).last_hidden_state
        mask = batch[f"{side}_response_mask"]
        ids = batch[f"{side}_input_ids"]
        token_logps.append(token_logps_from_hidden(hidden, model.lm_head.weight, ids, mask))
        sides.append(
            {
                "mask": mask,
                "rewards": batch[f"{side}_token_rewards"],
                "ref": batch[f"{side}_ref_token_logps"],
            }
        )
    return token_logps, _loss(*token_logps, sides, loss_fn)


def _packed(model, batch, loss_fn, model_kwargs=None):
    packed = pack_batch(batch)
    dtype = next(model.parameters()).dtype
    kwargs = model_kwargs or packed_model_inputs(packed, model.config._attn_implementation, dtype)
    hidden = model.model(**kwargs).last_hidden_state
    mask = packed["response_mask"]
    token_logps = token_logps_from_hidden(
        hidden, model.lm_head.weight, packed["input_ids"], mask
    )  # [1, N]
    num_pairs = packed["num_pairs"]
    padded_logps = unpack_tokens(token_logps, packed)  # [2B, max_seqlen]
    padded = {
        "mask": unpack_tokens(mask, packed),
        "rewards": unpack_tokens(packed["token_rewards"], packed),
        "ref": unpack_tokens(packed["ref_token_logps"], packed),
    }
    sides = [{k: v[:num_pairs] for k, v in padded.items()}]
    sides.append({k: v[num_pairs:] for k, v in padded.items()})
    loss = _loss(padded_logps[:num_pairs], padded_logps[num_pairs:], sides, loss_fn)
    sums = segment_sums(torch.where(mask, token_logps, 0.0), packed["cu_seqlens"])
    return (padded_logps[:num_pairs], padded_logps[num_pairs:]), loss, sums


def test_pack_batch_layout_by_hand():
    """B = 2: chosen lengths 3, 2; rejected lengths 2, 4 (prompt length 1 each)."""
    batch = {
        "chosen_input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
        "chosen_attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "chosen_response_mask": torch.tensor([[0, 1, 1], [0, 1, 0]]).bool(),
        "chosen_token_rewards": torch.tensor([[0, 0.1, 0.2], [0, 0.3, 0]]),
        "rejected_input_ids": torch.tensor([[5, 1, 0, 0], [8, 2, 3, 4]]),
        "rejected_attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]),
        "rejected_response_mask": torch.tensor([[0, 1, 0, 0], [0, 1, 1, 1]]).bool(),
        "rejected_token_rewards": torch.tensor([[0, -0.1, 0, 0], [0, -0.2, -0.3, -0.4]]),
        "index": torch.tensor([7, 9]),
    }
    packed = pack_batch(batch)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 5, 1, 8, 2, 3, 4]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0, 1, 2, 3]]
    assert packed["response_mask"].long().tolist() == [[0, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1]]
    assert packed["seq_index"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3]]
    assert packed["cu_seqlens"].tolist() == [0, 3, 5, 7, 11]
    assert packed["cu_seqlens"].dtype == torch.int32
    assert packed["seq_lengths"].tolist() == [3, 2, 2, 4]
    assert packed["max_seqlen"] == 4 and packed["num_pairs"] == 2
    assert packed["index"].tolist() == [7, 9]
    assert "ref_token_logps" not in packed
    sums = segment_sums(packed["token_rewards"], packed["cu_seqlens"])
    torch.testing.assert_close(sums, torch.tensor([0.3, 0.3, -0.1, -0.9]))
    unpacked = unpack_tokens(packed["input_ids"], packed)
    assert unpacked.tolist() == [[5, 6, 7, 0], [8, 9, 0, 0], [5, 1, 0, 0], [8, 2, 3, 4]]


@pytest.mark.parametrize("pad_to", [0, 5])
def test_unpack_pairs_restores_the_padded_layout(pad_to):
    """Round trip: every packed per-token field comes back equal to the batch's own tensor,
    also when a side is padded wider than its longest sequence (pad_to_multiple_of)."""
    batch = _batch(torch.float64)
    if pad_to:
        for key in [k for k in batch if k.startswith("chosen_")]:
            batch[key] = torch.nn.functional.pad(batch[key], (0, pad_to))
    packed = pack_batch(batch)
    assert packed["widths"] == (batch["chosen_input_ids"].shape[1], 12)
    for field in ("input_ids", "response_mask", "token_rewards", "ref_token_logps"):
        chosen, rejected = unpack_pairs(packed[field], packed)
        assert torch.equal(chosen, batch[f"chosen_{field}"]), field
        assert torch.equal(rejected, batch[f"rejected_{field}"]), field


def test_block_diagonal_mask_by_hand():
    cu_seqlens = torch.tensor([0, 2, 5], dtype=torch.int32)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ]
    ).bool()
    assert torch.equal(block_diagonal_mask(cu_seqlens, 5)[0, 0], expected)
    additive = block_diagonal_mask(cu_seqlens, 5, torch.float32)[0, 0]
    minimum = torch.finfo(torch.float32).min
    torch.testing.assert_close(additive, torch.where(expected, 0.0, minimum))
    with pytest.raises(ValueError, match="covers 5 tokens"):
        block_diagonal_mask(cu_seqlens, 6)


def test_response_token_at_sequence_start_is_rejected():
    """In the packed row it would be scored from the previous sequence's last hidden state."""
    batch = _batch()
    batch["rejected_response_mask"][1, 0] = True
    with pytest.raises(ValueError, match=r"sequences \[4\] start with a response token"):
        pack_batch(batch)


def test_empty_sequence_is_rejected():
    batch = _batch()
    batch["chosen_attention_mask"][2] = 0
    with pytest.raises(ValueError, match=r"sequences \[2\].*no real token"):
        pack_batch(batch)


def test_packed_first_tokens_are_never_scored():
    packed = pack_batch(_batch())
    starts = packed["cu_seqlens"][:-1].long()
    assert not packed["response_mask"][0, starts].any()
    assert (packed["position_ids"][0, starts] == 0).all()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss_fn", [DPOLoss(beta=0.1), SimPOLoss(beta=2.0)], ids=["dpo", "simpo"])
def test_packed_equals_padded(attn_implementation, dtype, loss_fn):
    tolerance = TOLERANCE[dtype]
    if attn_implementation == "eager":
        # transformers' eager attention runs its softmax in float32 even for float64 models, over
        # rows of different lengths (N packed vs T padded): float32 rounding, not a packing error.
        tolerance = max(tolerance, 1e-6)
    model = _model(attn_implementation, dtype)
    batch = _batch(dtype)

    padded_logps, padded_loss = _padded(model, batch, loss_fn)
    padded_loss.backward()
    padded_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    packed_logps, packed_loss, sums = _packed(model, batch, loss_fn)
    packed_loss.backward()

    for side, padded, packed in zip(("chosen", "rejected"), padded_logps, packed_logps):
        mask = batch[f"{side}_response_mask"]
        width = mask.shape[1]
        assert torch.equal(packed[:, width:], torch.zeros_like(packed[:, width:]))
        torch.testing.assert_close(packed[:, :width], padded, atol=tolerance, rtol=tolerance)
        assert (padded[mask] < 0).all()  # real log-probs, not zeros, were compared
    torch.testing.assert_close(
        sums, torch.cat([sequence_logps(p, batch[f"{s}_response_mask"]) for s, p in
                         zip(("chosen", "rejected"), padded_logps)]),
        atol=tolerance, rtol=tolerance,
    )  # fmt: skip
    torch.testing.assert_close(packed_loss, padded_loss, atol=tolerance, rtol=tolerance)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, padded_grads[name], atol=tolerance, rtol=tolerance)


def test_transformers_native_packing_matches_padded():
    """transformers 5.x builds the block-diagonal sdpa mask itself from restarting position_ids
    when attention_mask is None and use_cache=False (masking_utils.find_packed_sequence_indices).
    Our explicit mask must agree with it."""
    model = _model("sdpa", torch.float64)
    batch = _batch(torch.float64)
    packed = pack_batch(batch)
    native = {
        "input_ids": packed["input_ids"],
        "position_ids": packed["position_ids"],
        "use_cache": False,
    }
    loss_fn = DPOLoss(beta=0.1)
    native_logps, native_loss, _ = _packed(model, batch, loss_fn, model_kwargs=native)
    explicit_logps, explicit_loss, _ = _packed(model, batch, loss_fn)
    for native_side, explicit_side in zip(native_logps, explicit_logps):
        torch.testing.assert_close(native_side, explicit_side, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(native_loss, explicit_loss, atol=1e-10, rtol=1e-10)


_VARLEN_CALLS: list[int] = []


def _varlen_reference_attention(module, query, key, value, attention_mask, scaling, **kwargs):
    """Pure-torch stand-in for ``flash_attn_varlen_func``: causal attention within each span
    ``[cu[i], cu[i+1])`` of the packed row, and nowhere else. It reads only the varlen kwargs
    (no mask), as flash-attention does. ``query`` is ``[1, heads, N, dim]``."""
    assert attention_mask is None
    _VARLEN_CALLS.append(module.layer_idx)
    cu_seqlens = kwargs["cu_seq_lens_q"].tolist()
    assert kwargs["cu_seq_lens_k"].tolist() == cu_seqlens
    assert kwargs["max_length_q"] == max(b - a for a, b in zip(cu_seqlens, cu_seqlens[1:]))
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    spans = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling
        )
        for a, b in zip(cu_seqlens, cu_seqlens[1:])
    ]
    return torch.cat(spans, dim=2).transpose(1, 2).contiguous(), None


@pytest.mark.gpu_emulation
def test_varlen_kwargs_reach_the_attention_kernel():
    """The flash path without flash-attn: a registered attention function named like a flash
    kernel gets exactly what flash_attn_varlen_func would (cu_seqlens, max_seqlen, no mask), and
    the packed result equals the padded one. This checks the kwarg names and their plumbing
    through transformers' Llama layers, the part a CPU machine can check."""
    AttentionInterface.register("flash_varlen_reference", _varlen_reference_attention)
    model = _model("sdpa", torch.float64)
    # Set after construction: at init transformers would try to load a flash kernel by that name.
    model.config._attn_implementation = "flash_varlen_reference"
    batch = _batch(torch.float64)
    loss_fn = DPOLoss(beta=0.1)
    padded_model = _model("sdpa", torch.float64)
    padded_logps, padded_loss = _padded(padded_model, batch, loss_fn)
    _VARLEN_CALLS.clear()
    packed_logps, packed_loss, _ = _packed(model, batch, loss_fn)
    assert _VARLEN_CALLS == [0, 1]  # both layers went through the varlen function
    for side, padded, packed in zip(("chosen", "rejected"), padded_logps, packed_logps):
        width = batch[f"{side}_response_mask"].shape[1]
        torch.testing.assert_close(packed[:, :width], padded, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-10, rtol=1e-10)


def test_flash_kwargs_carry_varlen_boundaries():
    packed = pack_batch(_batch())
    kwargs = packed_model_inputs(packed, "flash_attention_2")
    assert "attention_mask" not in kwargs and kwargs["use_cache"] is False
    assert kwargs["cu_seq_lens_q"] is packed["cu_seqlens"]
    assert kwargs["cu_seq_lens_k"] is packed["cu_seqlens"]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 12  # rejected: prompt 5 + response 7
    with pytest.raises(ValueError, match="flex_attention"):
        packed_model_inputs(packed, "flex_attention")
