"""Hardware FLOPs of one training step, counted over the tokens a layout actually computes.

The one place where the benchmarks count FLOPs (``train_vs_trl.py``'s MFU column and
``gpu_plan.py``'s time estimates). A Llama-shaped decoder, per (prompt, chosen, rejected) pair:

- **decoder matmuls**: ``2 x (linear weights per layer) x layers`` per token (q, k, v, o and
  the three MLP projections; embedding lookups, norms and element-wise work are not counted),
  over the tokens the layout runs through the decoder: ``P + C + R + 1`` with the shared prompt
  (the prompt once, plus the copied last prompt token of ``treg_lightning.forward.shared_prompt``),
  ``2P + C + R`` without it. Padding is not counted: it is waste, not work (the padding share is
  reported apart).
- **attention**: ``4 x heads x head_dim x layers`` per (query, key) pair of the causal pattern
  (``QK^T`` and ``AV``): ``n(n+1)/2`` pairs for a causal sequence of ``n`` tokens, and for the
  shared layout the prompt block causal, then each response block (last prompt token + response)
  causal within itself and attending to the ``P - 1`` shared tokens. Scores a dense-mask kernel
  computes and then masks out are not counted, as padding is not.
- **lm_head**: ``2 x hidden x vocab`` per position sent through it. The chunked head of
  ``treg_lightning.forward.logprobs`` (and TRL 1.16's fused head on CUDA, ``_use_triton``) takes
  the scored (response) positions only, ``C + R`` per pair; TRL's head elsewhere takes every
  position.
- **training**: backward = 2 x forward; activation checkpointing recomputes the decoder forward
  once more (x4 instead of x3). Both chunked heads recompute their logits in the backward
  (forward, recompute, input gradient, weight gradient: x4). A live reference model adds one
  forward (decoder + head) without backward.

So the MFU it gives is a hardware-FLOPs utilisation of the real tokens (recompute included):
the figure to compare one side's use of the GPU with another's; which side trains faster on the
same pairs is the pair tokens/s ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense (no sparsity) bf16 tensor-core peaks, NVIDIA datasheets; the first name that occurs in
# torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "H200": 989e12,  # SXM
}


def peak_bf16_flops(device_name: str) -> float | None:
    """The card's dense bf16 peak in FLOP/s, or None for a card not in the table."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


@dataclass(frozen=True)
class Shape:
    """A Llama-shaped decoder with a (tied or untied) lm_head."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int | None = None

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        """From a ``LlamaConfig``-style dict (extra keys ignored)."""
        return cls(**{k: config[k] for k in cls.__dataclass_fields__ if k in config})

    @property
    def _head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def linear_flops_per_token(self) -> int:
        """Forward FLOPs of every decoder linear layer for one token."""
        q = self.num_attention_heads * self._head_dim
        kv = self.num_key_value_heads * self._head_dim
        per_layer = (
            self.hidden_size * (2 * q + 2 * kv) + 3 * self.hidden_size * self.intermediate_size
        )
        return 2 * per_layer * self.num_hidden_layers

    def attention_flops_per_pair(self) -> int:
        """Forward FLOPs of one (query, key) pair over all layers: ``QK^T`` and ``AV``."""
        return 4 * self.num_attention_heads * self._head_dim * self.num_hidden_layers

    def head_flops_per_token(self) -> int:
        """Forward FLOPs of the lm_head for one position."""
        return 2 * self.hidden_size * self.vocab_size


@dataclass(frozen=True)
class Work:
    """What one forward computes: decoder tokens, causal (query, key) pairs, lm_head positions."""

    tokens: int = 0
    attention_pairs: int = 0
    head_tokens: int = 0

    def __add__(self, other: Work) -> Work:
        return Work(
            self.tokens + other.tokens,
            self.attention_pairs + other.attention_pairs,
            self.head_tokens + other.head_tokens,
        )


def _causal(n: int) -> int:
    return n * (n + 1) // 2


def pair_work(prompt: int, chosen: int, rejected: int, shared: bool, compact_head=True) -> Work:
    """One pair's forward work. ``shared``: the shared-prompt layout (prompt once, a copied last
    prompt token per response block); else ``[prompt, chosen]`` and ``[prompt, rejected]``.
    ``compact_head``: the lm_head runs on the scored response tokens only (``C + R``)."""
    if shared:
        context = prompt - 1  # the shared block; its last token is recomputed per response
        tokens = context + (chosen + 1) + (rejected + 1)
        attention = _causal(context) + sum(
            _causal(n + 1) + (n + 1) * context for n in (chosen, rejected)
        )
    else:
        tokens = 2 * prompt + chosen + rejected
        attention = _causal(prompt + chosen) + _causal(prompt + rejected)
    head = chosen + rejected if compact_head else 2 * prompt + chosen + rejected
    return Work(tokens, attention, head)


def forward_flops(shape: Shape, work: Work) -> int:
    """FLOPs of one forward pass over ``work`` (decoder and lm_head)."""
    return (
        work.tokens * shape.linear_flops_per_token()
        + work.attention_pairs * shape.attention_flops_per_pair()
        + work.head_tokens * shape.head_flops_per_token()
    )


def training_flops(
    shape: Shape, work: Work, checkpointing: bool, reference: Work | None = None
) -> int:
    """Hardware FLOPs of forward + backward over ``work`` (see the module docstring): decoder
    x3, x4 with activation checkpointing; chunked lm_head x4; plus one forward over
    ``reference`` when a live reference model scores the batch."""
    decoder = forward_flops(shape, Work(work.tokens, work.attention_pairs, 0))
    head = forward_flops(shape, Work(head_tokens=work.head_tokens))
    total = (4 if checkpointing else 3) * decoder + 4 * head
    if reference is not None:
        total += forward_flops(shape, reference)
    return total
