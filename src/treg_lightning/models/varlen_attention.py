"""Padding-free (varlen) attention without flash-attn: torch's own kernel, run by transformers.

Packing (:mod:`treg_lightning.forward.packing`) puts all sequences of a batch into one row and
hands the kernel their boundaries (``cu_seq_lens_q/k``, ``max_length_q/k``). flash-attn's
``flash_attn_varlen_func`` reads them; so does torch's own
:func:`torch.nn.attention.varlen.varlen_attn` (CUDA; the FlashAttention-2 kernels built into
torch), which needs no flash-attn wheel. This module makes the second one an
attention implementation of transformers, named :data:`TORCH_VARLEN`:

- :func:`flash_attn_varlen_func` / :func:`flash_attn_func` take flash-attn 2's signatures and
  call ``varlen_attn`` (the second with one segment per batch row);
- :func:`torch_varlen_attention`, registered in transformers' ``AttentionInterface``, is
  transformers' own flash-attention wrapper (``integrations.flash_attention``) with these two
  functions in place of flash-attn's. So everything around the kernel is transformers' tested
  code: the packed branch fed by ``cu_seq_lens_*``, the unpadding of padded batches (the mask
  function is flash-attention's, registered under the same name), decoding with a cache, the
  sliding window, and a clear error for what the kernel lacks (soft-capping: Gemma-2).

transformers looks flash functions up through ``lazy_import_flash_attention``, which caches one
implementation at a time in module globals of ``transformers.modeling_flash_attention_utils``
and has no registration hook for a local kernel (only hub kernels). :func:`_load_into_transformers`
fills that cache the way its own loader does; ``tests/forward/test_torch_varlen.py`` pins the
private names it writes, so a transformers release that renames them fails a CPU test, not a
GPU run. The kernel itself needs float16 or bfloat16 inputs, a head size of at most 256 and
no dropout; ``tests/forward/test_torch_varlen.py`` runs this whole route on CPU with a stand-in
kernel of ``varlen_attn``'s signature.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

#: The attention implementation name of torch's varlen kernel (``attn_implementation``).
TORCH_VARLEN = "torch_varlen"


def runs_varlen(attn_implementation: str | None) -> bool:
    """Whether the attention reads packed-row boundaries (``cu_seq_lens_*``) instead of a mask:
    flash-attention's kernels (``flash_attention_2``, hub ``.../flash-attn*`` kernels) and
    :data:`TORCH_VARLEN`."""
    name = str(attn_implementation or "")
    return "flash" in name or name == TORCH_VARLEN


def torch_varlen_available() -> bool:
    """True on a CUDA machine whose torch ships ``varlen_attn`` with its flash kernels (Ampere
    or newer, the architectures torch's FlashAttention-2 build covers)."""
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    capability = torch.cuda.get_device_capability()
    return torch.backends.cuda.is_flash_attention_available() and capability >= (8, 0)


def _window(causal: bool, window_size) -> tuple[int, int]:
    """flash-attn's ``(causal, window_size)`` as ``varlen_attn``'s ``window_size``: causal is a
    right window of 0 there (keys up to the query), a left window of ``-1`` is unbounded."""
    left, right = (int(w) for w in window_size)
    return (left, 0) if causal else (left, right)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """flash-attn 2's ``flash_attn_varlen_func``, computed by torch's ``varlen_attn``.

    Args:
        q: ``[total_q, heads, head_dim]``; ``k``, ``v``: ``[total_k, kv_heads, head_dim]``
            (grouped-query attention when ``kv_heads < heads``).
        cu_seqlens_q, cu_seqlens_k: ``[num_seqs + 1]`` segment boundaries of the packed rows.
        max_seqlen_q, max_seqlen_k: longest segment (an int, or a 0-d tensor).
        dropout_p: must be 0: ``varlen_attn`` has no dropout.
        softmax_scale: scale of ``q k^T`` (None: ``1 / sqrt(head_dim)``).
        causal, window_size: flash-attn's masking (bottom-right aligned causal, sliding window).

    Returns:
        ``[total_q, heads, head_dim]``.
    """
    if dropout_p:
        raise ValueError(
            f"attn_implementation={TORCH_VARLEN!r}: torch's varlen attention has no dropout, but "
            f"the model asks for attention dropout {dropout_p}. Set the model config's "
            "attention_dropout to 0, or use attn_implementation sdpa."
        )
    from torch.nn.attention import varlen  # looked up per call: tests put a stand-in there

    return varlen.varlen_attn(
        q,
        k,
        v,
        cu_seqlens_q.to(torch.int32),
        cu_seqlens_k.to(torch.int32),
        int(max_seqlen_q),
        int(max_seqlen_k),
        scale=softmax_scale,
        window_size=_window(causal, window_size),
        enable_gqa=q.shape[1] != k.shape[1],
    )


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """flash-attn 2's ``flash_attn_func`` (``[batch, seq, heads, head_dim]``, no padding): each
    batch row is one segment of :func:`flash_attn_varlen_func`."""
    batch, q_len, k_len = q.shape[0], q.shape[1], k.shape[1]

    def boundaries(length: int) -> torch.Tensor:
        return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=q.device)

    out = flash_attn_varlen_func(
        q.reshape(batch * q_len, *q.shape[2:]),
        k.reshape(batch * k_len, *k.shape[2:]),
        v.reshape(batch * k_len, *v.shape[2:]),
        boundaries(q_len),
        boundaries(k_len),
        q_len,
        k_len,
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
    )
    return out.reshape(batch, q_len, *out.shape[1:])


def _load_into_transformers() -> None:
    """Fill transformers' flash-function cache with the torch kernel (once per switch: a model
    on ``flash_attention_2`` in the same process loads flash-attn's back)."""
    from transformers import modeling_flash_attention_utils as flash

    if flash._loaded_implementation == TORCH_VARLEN:
        return
    flash._flash_fn, flash._flash_varlen_fn = flash_attn_func, flash_attn_varlen_func
    flash._flash_with_kvcache_fn = None  # paged (continuous-batching) cache: not supported
    flash._pad_fn, flash._unpad_fn = flash._pad_input, flash._unpad_input
    flash._process_flash_kwargs_fn = flash._lazy_define_process_function(flash_attn_varlen_func)
    flash._process_with_kvcache_kwargs_fn = dict
    flash._loaded_implementation = TORCH_VARLEN


def torch_varlen_attention(module, query, key, value, attention_mask, **kwargs):
    """The ``AttentionInterface`` function of :data:`TORCH_VARLEN`: transformers' flash-attention
    wrapper, running torch's kernel (see the module docstring)."""
    _load_into_transformers()
    return flash_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(TORCH_VARLEN, torch_varlen_attention)
# A padded batch then reaches the wrapper as a [batch, seq] mask, which it unpads into segments;
# without a mask function of its own transformers would drop the padding mask.
AttentionMaskInterface.register(TORCH_VARLEN, flash_attention_mask)
