"""Packing through transformers' real flash-attention varlen branch, on CPU.

flash-attn is CUDA-only, so the kernel is a stand-in (``stand_in_kernels``: flash-attn 2's
signatures, sdpa per segment) placed where transformers imports flash-attn from. Everything
else is the code a GPU runs: our ``packed_token_logps`` / ``padded_token_logps``, the kwargs
``packed_model_inputs`` builds, transformers' Llama layers, ``flash_attention_forward`` and
``_flash_attention_forward`` with its kwarg processing, which here takes the packed
(``cu_seq_lens_*``) branch for a packed row and the unpadding branch for a padded batch.
"""

from __future__ import annotations

import pytest
import torch

from builders import tiny_llama
from pair_paths import (
    SIDES,
    TOLERANCE,
    VOCAB,
    assert_same,
    contract_batch,
    logps_and_grads,
    packed,
    padded,
)
from stand_in_kernels import CALLS, stand_in_flash_attn
from treg_lightning.forward.batch import bind_token_logps, uses_flash_attention, uses_shared_prompt
from treg_lightning.forward.packing import pack_batch

LAYERS = 2
pytestmark = pytest.mark.gpu_emulation


def flash_llama(dtype):
    """The tiny Llama switched to ``flash_attention_2`` after construction: transformers checks
    the flash-attn wheel and CUDA when a model is built with it (and falls back to a hub
    kernel), which the stand-in cannot satisfy; at forward time it reads the name only."""
    lm = bind_token_logps(tiny_llama(VOCAB, 0, dtype, attn_implementation="sdpa"))
    lm.config._attn_implementation = "flash_attention_2"
    return lm


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packed_rows_through_the_flash_varlen_branch_equal_padded(monkeypatch, dtype):
    """Packed log-probs and every parameter gradient through the flash branch equal the padded
    sdpa path's; each layer called the varlen kernel once with our packed boundaries."""
    batch = contract_batch()
    want = logps_and_grads(padded, bind_token_logps(tiny_llama(VOCAB, 0, dtype)), batch)
    with stand_in_flash_attn(monkeypatch):
        lm = flash_llama(dtype)
        assert uses_flash_attention(lm) and not uses_shared_prompt(lm, None, batch)
        CALLS.clear()
        got = logps_and_grads(packed, lm, batch)
    # chosen sequences (prompt + response: 7, 7, 7), then rejected ones (5, 2, 12)
    boundaries = pack_batch(batch)["cu_seqlens"].tolist()
    assert boundaries == [0, 7, 14, 21, 26, 28, 40]
    assert [c["kind"] for c in CALLS] == ["flash_varlen"] * LAYERS  # no recompute, no padding
    for call in CALLS:
        assert call["cu_q"] == call["cu_k"] == boundaries and call["max_q"] == 12
        # an int: our max_length_q, not one transformers derives from restarting position ids
        assert call["max_is_int"]
        assert call["causal"] and call["dtype"] == dtype
    assert_same(got, want, batch, TOLERANCE[dtype])


def test_padded_batch_through_the_flash_unpadding_branch(monkeypatch):
    """A padded batch (the reference, annotate and evaluation forwards) goes through the same
    wrapper's unpadding branch: one segment per row, the same values as sdpa."""
    batch = contract_batch(seed=1)
    want = logps_and_grads(padded, bind_token_logps(tiny_llama(VOCAB, 0, torch.float64)), batch)
    with stand_in_flash_attn(monkeypatch):
        CALLS.clear()
        got = logps_and_grads(padded, flash_llama(torch.float64), batch)
    lengths = torch.cat([batch[f"{s}_attention_mask"].sum(-1) for s in SIDES])
    assert [c["kind"] for c in CALLS] == ["flash_varlen"] * LAYERS
    assert CALLS[0]["cu_q"] == [0, *lengths.cumsum(0).tolist()]
    assert_same(got, want, batch, TOLERANCE[torch.float64])
