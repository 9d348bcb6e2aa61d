"""bench/flops.py: the hardware FLOPs behind the benchmark's MFU, checked against arithmetic done
by hand on a tiny shape (every number below is written out, none comes from the code)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import flops  # noqa: E402

# hidden 4, intermediate 8, 1 layer, 2 heads of dim 2, 1 KV head, vocabulary 10.
TINY = flops.Shape(
    hidden_size=4,
    intermediate_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=10,
)


def test_per_token_costs_by_hand():
    """Linear weights of the layer: q 4x4 = 16, k 4x2 = 8, v 8, o 16, MLP 3 x 4x8 = 96, in all
    144 multiply-adds = 288 FLOPs per token. Attention, per (query, key) pair: QK^T and AV, each
    2 heads x 2 dims x 2 FLOPs = 8, so 16. lm_head: 2 x 4 x 10 = 80 per position."""
    assert TINY.linear_flops_per_token() == 288
    assert TINY.attention_flops_per_pair() == 16
    assert TINY.head_flops_per_token() == 80


def test_pair_work_by_hand():
    """Prompt 3, chosen 2, rejected 1 tokens.

    Unshared: sequences of 3 + 2 = 5 and 3 + 1 = 4 tokens: 9 decoder tokens; causal pairs
    5*6/2 + 4*5/2 = 15 + 10 = 25.
    Shared: shared block P - 1 = 2 tokens, chosen block 1 + 2 = 3, rejected block 1 + 1 = 2:
    7 decoder tokens; pairs: shared 2*3/2 = 3; chosen block 3*4/2 + 3 x 2 = 12; rejected block
    2*3/2 + 2 x 2 = 7; in all 22 (= 25 minus the prompt's 3 pairs computed only once).
    Head: the 2 + 1 = 3 response tokens; every real position (2P + C + R = 9) without the
    compact head."""
    assert flops.pair_work(3, 2, 1, shared=False) == flops.Work(9, 25, 3)
    assert flops.pair_work(3, 2, 1, shared=True) == flops.Work(7, 22, 3)
    assert flops.pair_work(3, 2, 1, shared=False, compact_head=False) == flops.Work(9, 25, 9)


def test_training_flops_by_hand():
    """Shared, with checkpointing: decoder forward 7 x 288 + 22 x 16 = 2016 + 352 = 2368, x4
    (forward, recompute, backward x2) = 9472; head 3 x 80 = 240, x4 (forward, logits recomputed
    in the backward, two gradient matmuls) = 960; total 10432.
    Unshared, no checkpointing: decoder 9 x 288 + 25 x 16 = 2592 + 400 = 2992, x3 = 8976, head
    960: 9936.
    Unshared with checkpointing and a live reference (TRL's default): 2992 x 4 + 960 = 12928,
    plus one reference forward 2992 + 240 = 3232: 16160."""
    shared = flops.pair_work(3, 2, 1, shared=True)
    unshared = flops.pair_work(3, 2, 1, shared=False)
    assert flops.training_flops(TINY, shared, checkpointing=True) == 10432
    assert flops.training_flops(TINY, unshared, checkpointing=False) == 9936
    assert flops.training_flops(TINY, unshared, True, reference=unshared) == 16160


def test_work_adds_over_pairs():
    """Two pairs: (9, 25, 3) + (7, 22, 3) = (16, 47, 6)."""
    total = flops.pair_work(3, 2, 1, shared=False) + flops.pair_work(3, 2, 1, shared=True)
    assert total == flops.Work(16, 47, 6)


def test_one_b_shape_per_token():
    """Llama-3.2-1B's shape (hidden 2048, MLP 8192, 16 layers, 32 heads / 8 KV heads of 64,
    vocabulary 128,256): per layer q 2048x2048 + k, v 2 x 2048x512 + o 2048x2048 + MLP
    3 x 2048x8192 = 4,194,304 + 2,097,152 + 4,194,304 + 50,331,648 = 60,817,408 weights;
    x 2 x 16 = 1,946,157,056 FLOPs per token. lm_head 2 x 2048 x 128,256 = 525,336,576."""
    shape = flops.Shape(2048, 8192, 16, 32, 8, 128256)
    assert shape.linear_flops_per_token() == 1_946_157_056
    assert shape.head_flops_per_token() == 525_336_576
    assert shape.attention_flops_per_pair() == 4 * 2048 * 16


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", None),
    ],
)
def test_peak_by_card_name(name, peak):
    assert flops.peak_bf16_flops(name) == peak
