"""Stand-ins for CUDA-only attention kernels: the same signatures, computed with sdpa per
segment on any device, so the code around them (transformers' flash-attention wrapper, our
packing) runs on CPU exactly as it would call the real kernel.

- :func:`varlen_attn`: torch's ``torch.nn.attention.varlen.varlen_attn``;
- :func:`flash_attn_varlen_func`, :func:`flash_attn_func`: flash-attn 2's, and
  :func:`flash_attn_package` to put them where transformers imports flash-attn from;
- :func:`kept_flash_cache`: restores transformers' cache of loaded flash functions afterwards.

Every call is appended to :data:`CALLS` (``kind``, boundaries, lengths, window, dtype), so a test
can check which kernel ran and with which arguments.
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch
import torch.nn.functional as F

CALLS: list[dict] = []

# transformers' module globals that cache the flash functions it loaded (one implementation).
FLASH_CACHE = (
    "_loaded_implementation",
    "_flash_fn",
    "_flash_varlen_fn",
    "_flash_with_kvcache_fn",
    "_pad_fn",
    "_unpad_fn",
    "_process_flash_kwargs_fn",
    "_process_with_kvcache_kwargs_fn",
)


def segment_attention(q, k, v, cu_q, cu_k, scale, window):
    """``[total, heads, dim]`` attention within each segment ``[cu[i], cu[i+1])``, keys visible
    to a query by flash-attention's rule: positions aligned at the segment ends (bottom-right),
    key ``j`` visible to query ``i`` when ``i - left <= j <= i + right`` (``-1``: unbounded)."""
    left, right = window
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    outs = []
    for (qa, qb), (ka, kb) in zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:]), strict=True):
        i = torch.arange(qb - qa)[:, None] + (kb - ka) - (qb - qa)  # bottom-right alignment
        j = torch.arange(kb - ka)[None]
        visible = torch.ones(i.shape[0], j.shape[1], dtype=torch.bool)
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
        out = F.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1) for t, a, b in ((q, qa, qb), (k, ka, kb), (v, ka, kb))),
            attn_mask=visible.to(q.device),
            scale=scale,
        )
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


def varlen_attn(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None,
):  # fmt: skip
    """torch's ``varlen_attn`` (same signature, same argument checks), on any device."""
    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32
    assert isinstance(max_q, int) and isinstance(max_k, int)
    assert isinstance(window_size, tuple) and len(window_size) == 2
    assert return_aux is None and seqused_k is None and block_table is None
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError("Expect query and key/value to have the same number of heads")
    cu_q, cu_k = cu_seq_q.tolist(), cu_seq_k.tolist()
    assert max_q == max(b - a for a, b in zip(cu_q, cu_q[1:]))
    assert max_k == max(b - a for a, b in zip(cu_k, cu_k[1:]))
    CALLS.append({"kind": "torch_varlen", "cu_q": cu_q, "cu_k": cu_k, "max_q": max_q,
                  "window": window_size, "dtype": query.dtype})  # fmt: skip
    return segment_attention(query, key, value, cu_q, cu_k, scale, window_size)


def _flash_window(causal, window_size):
    left, right = window_size
    return (left, 0) if causal else (left, right)


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    deterministic=False, return_attn_probs=False, block_table=None,
):  # fmt: skip
    """flash-attn 2.6's ``flash_attn_varlen_func`` (its signature), on any device."""
    assert dropout_p == 0.0 and not softcap and alibi_slopes is None and block_table is None
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    CALLS.append({"kind": "flash_varlen", "cu_q": cu_q, "cu_k": cu_k, "max_q": int(max_seqlen_q),
                  "max_is_int": isinstance(max_seqlen_q, int), "causal": causal,
                  "dtype": q.dtype})  # fmt: skip
    return segment_attention(q, k, v, cu_q, cu_k, softmax_scale, _flash_window(causal, window_size))


def flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, deterministic=False, return_attn_probs=False,
):  # fmt: skip
    """flash-attn 2.6's ``flash_attn_func`` (``[batch, seq, heads, dim]``), on any device."""
    assert dropout_p == 0.0 and not softcap and alibi_slopes is None
    batch, q_len, k_len = q.shape[0], q.shape[1], k.shape[1]
    CALLS.append({"kind": "flash_dense", "shape": tuple(q.shape), "causal": causal})
    out = segment_attention(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
        [b * q_len for b in range(batch + 1)], [b * k_len for b in range(batch + 1)],
        softmax_scale, _flash_window(causal, window_size),
    )  # fmt: skip
    return out.reshape(q.shape)


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("the flash-attn stand-in has no paged KV cache")


def flash_attn_package() -> dict[str, types.ModuleType]:
    """``sys.modules`` entries for a ``flash_attn`` package made of the stand-ins (the names
    transformers imports from it: ``modeling_flash_attention_utils._lazy_imports``)."""
    from transformers.modeling_flash_attention_utils import _pad_input, _unpad_input

    package = types.ModuleType("flash_attn")
    package.__path__ = []  # a package, so `flash_attn.bert_padding` imports
    package.flash_attn_func = flash_attn_func
    package.flash_attn_varlen_func = flash_attn_varlen_func
    package.flash_attn_with_kvcache = flash_attn_with_kvcache
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input, padding.unpad_input = _pad_input, _unpad_input
    package.bert_padding = padding
    return {"flash_attn": package, "flash_attn.bert_padding": padding}


@contextlib.contextmanager
def kept_flash_cache():
    """Run the block, then put transformers' loaded flash functions back as they were (a test
    that loads a stand-in must not leave it cached for the next one)."""
    from transformers import modeling_flash_attention_utils as flash

    saved = {name: getattr(flash, name) for name in FLASH_CACHE}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(flash, name, value)


@contextlib.contextmanager
def stand_in_flash_attn(monkeypatch):
    """Make transformers' ``flash_attention_2`` load the stand-ins: the ``flash_attn`` package
    in ``sys.modules`` and flash-attn 2 reported available (it checks the wheel and CUDA)."""
    from transformers import modeling_flash_attention_utils as flash

    with kept_flash_cache():
        for name, module in flash_attn_package().items():
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.setattr(flash, "is_flash_attn_2_available", lambda *a, **k: True)
        flash._loaded_implementation = None  # load again, from the stand-in package
        yield
