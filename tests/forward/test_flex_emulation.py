"""The shared prompt's flex-attention route, on CPU: the GPU's way to compute each prompt once.

The ``BlockMask`` of :func:`~treg_lightning.forward.shared_prompt.shared_prompt_block_mask` is
built here as on a GPU (CPU can build it): token by token it is the dense shared-prompt mask,
and tile by tile it skips exactly the empty tiles and marks exactly the full ones. The kernel
transformers runs on a GPU is flex_attention compiled; on CPU the compile takes minutes and flex
has no backward, so the stand-in is eager ``flex_attention`` (the same operator, unfused),
forward only: it equals sdpa with the dense mask, alone and inside transformers' flex path.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask, flex_attention

from builders import tiny_llama
from pair_paths import SIDES, VOCAB, contract_batch
from treg_lightning.forward.batch import (
    bind_token_logps,
    padded_token_logps,
    shared_prompt_token_logps,
)
from treg_lightning.forward.shared_prompt import (
    shared_prompt_block_mask,
    shared_prompt_layout,
    shared_prompt_mask,
)

pytestmark = pytest.mark.gpu_emulation


def tiles(mask: torch.Tensor, size: int) -> torch.Tensor:
    """``[R, 1, W, W]`` bool mask as ``[R, 1, tiles, tiles, size * size]`` (padded with False)."""
    width = mask.shape[-1]
    padded = F.pad(mask, (0, -width % size, 0, -width % size), value=False)
    rows, _, n, _ = padded.shape
    blocks = padded.reshape(rows, 1, n // size, size, n // size, size)
    return blocks.transpose(3, 4).reshape(rows, 1, n // size, n // size, size * size)


def listed(num_blocks: torch.Tensor, indices: torch.Tensor, tiles_per_row: int) -> torch.Tensor:
    """The ``[R, 1, tiles, tiles]`` bool grid of a BlockMask's (count, column indices) lists."""
    grid = torch.zeros(*num_blocks.shape, tiles_per_row, dtype=torch.bool)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in num_blocks.shape)):
        b, h, i = index.tolist()
        grid[b, h, i, indices[b, h, i, : num_blocks[b, h, i]].long()] = True
    return grid


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("size", [4, 128])
def test_block_mask_is_the_dense_shared_prompt_mask(packed, size):
    """Materialized, the BlockMask is the dense mask; its tiles: full ones listed as full,
    partial ones as partial, empty ones (e.g. rejected queries x chosen keys) not at all."""
    layout = shared_prompt_layout(contract_batch(), packed=packed)
    dense = shared_prompt_mask(layout)
    rows, width = layout["input_ids"].shape
    block_mask = shared_prompt_block_mask(layout, block_size=size)
    assert block_mask.BLOCK_SIZE == (size, size) and block_mask.shape == (rows, 1, width, width)
    assert torch.equal(create_mask(block_mask.mask_mod, rows, 1, width, width, "cpu"), dense)
    per_tile = tiles(dense, size)
    n = per_tile.shape[2]
    full = listed(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n)
    partial = listed(block_mask.kv_num_blocks, block_mask.kv_indices, n)
    assert torch.equal(full, per_tile.all(-1))  # a tile past the row's end is never full
    assert torch.equal(partial, per_tile.any(-1) & ~full)
    if packed and size == 4:
        assert 0 < block_mask.sparsity() < 100  # tiles are skipped: the point on a GPU


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_eager_flex_attention_equals_sdpa(packed):
    """flex_attention with the BlockMask (4 query heads on 2 KV heads, tiles of 4) gives sdpa's
    attention under the dense mask."""
    layout = shared_prompt_layout(contract_batch(), packed=packed)
    rows, width = layout["input_ids"].shape
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(rows, 4, width, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(rows, 2, width, 8, generator=generator, dtype=torch.float64)
            for _ in range(2))  # fmt: skip
    with warnings.catch_warnings():  # flex_attention outside torch.compile: unfused, fine here
        warnings.simplefilter("ignore")
        out = flex_attention(
            q, k, v, block_mask=shared_prompt_block_mask(layout, block_size=4), enable_gqa=True
        )
    want = F.scaled_dot_product_attention(
        q, k, v, attn_mask=shared_prompt_mask(layout), enable_gqa=True
    )
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_transformers_flex_route_equals_sdpa(monkeypatch, packed):
    """A Llama with ``attn_implementation="flex_attention"`` on the shared layout: our
    BlockMask goes through transformers' flex path untouched (only its compiled kernel is the
    eager stand-in) and the log-probs equal sdpa's on the same layout, and the unshared padded
    path's within float32 noise (RMSNorm computes in float32 even for float64 weights)."""
    import transformers.integrations.flex_attention as transformers_flex

    masks = []

    def eager_flex(query, key, value, training=False, **kwargs):
        masks.append(kwargs["block_mask"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(transformers_flex, "compile_friendly_flex_attention", eager_flex)
    batch = contract_batch()
    sdpa = bind_token_logps(tiny_llama(VOCAB, 0, torch.float64))
    flex = bind_token_logps(
        tiny_llama(VOCAB, 0, torch.float64, attn_implementation="flex_attention")
    )
    with torch.no_grad():
        got = shared_prompt_token_logps(flex, batch, 5, None, packed=packed)
        same_layout = shared_prompt_token_logps(sdpa, batch, 5, None, packed=packed)
        unshared = padded_token_logps(sdpa, batch, 5, None)
    assert len(masks) == 2 and all(m is masks[0] for m in masks)  # one BlockMask, both layers
    assert masks[0].shape[-1] == shared_prompt_layout(batch, packed=packed)["input_ids"].shape[1]
    for side in SIDES:
        assert (got[side][batch[f"{side}_response_mask"]] < 0).all()
        torch.testing.assert_close(got[side], same_layout[side], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(got[side], unshared[side], atol=1e-6, rtol=1e-6)
