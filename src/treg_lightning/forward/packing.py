"""Padding-free packing of chosen and rejected sequences into one row.

A padded batch of ``B`` pairs holds ``2B`` sequences padded to a common length; on real preference
data (prompts and responses of very different lengths) much of that is padding the model still
computes. Packing concatenates the real tokens of all ``2B`` sequences (chosen ones first, then
rejected ones, each in batch order) into one row ``[1, N]``, ``N`` = total real tokens, and keeps
the sequences apart in attention:

- varlen kernels (flash-attention 2, or torch's own ``varlen_attn`` as ``torch_varlen`` where
  flash-attn is not installed, :mod:`treg_lightning.models.varlen_attention`): ``cu_seqlens`` /
  ``max_seqlen`` go to the kernel as transformers' ``cu_seq_lens_q/k`` and ``max_length_q/k``
  kwargs (see :func:`packed_model_inputs`), so no mask is built and no padding is computed;
- sdpa / eager (CPU, tests): a causal block-diagonal ``[1, 1, N, N]`` mask
  (:func:`block_diagonal_mask`); correct but quadratic in ``N``, so it is a check, not a speed-up.

``position_ids`` restart at 0 for every sequence, so rotary embeddings see the same positions as
in the padded batch. (transformers >= 5 also detects packing from restarting ``position_ids`` when
``attention_mask`` is None and no KV cache exists, but the model builds a cache unless
``use_cache=False``, in which case sequences would silently attend across boundaries. We pass
``use_cache=False`` and explicit masks/kwargs rather than rely on detection.)

Token alignment is the contract's: ``token_logps[t] = log p(input_ids[t] | input_ids[<t])``. In
the packed row, ``t - 1`` of a sequence's first token is the previous sequence's last token, so the
first token of each sequence must never be scored; :func:`pack_batch` checks that it is not a
response token (it is a prompt token in every well-formed pair).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from treg_lightning.models.varlen_attention import runs_varlen
from treg_lightning.pairs import SIDES, TOKEN_FIELDS, field

# Per-token fields of the contract's batch that are packed (when present on both sides); the
# attention mask is what packing replaces.
_PACKED_FIELDS = tuple(name for name in TOKEN_FIELDS if name != "attention_mask")


def _side_tokens(batch: dict, side: str, name: str, keep: torch.Tensor) -> torch.Tensor:
    """Real tokens of ``{side}_{name}`` ``[B, T]`` as a flat ``[n]`` tensor, row by row."""
    return batch[field(side, name)][keep]


def pack_batch(batch: dict) -> dict:
    """Pack the contract's padded pair batch into one row of real tokens.

    Args:
        batch: ``chosen_input_ids`` / ``rejected_input_ids`` ``[B, T]`` long, ``*_attention_mask``
            ``[B, T]``, ``*_response_mask`` ``[B, T]`` bool, ``*_token_rewards`` ``[B, T]`` float,
            optionally ``*_ref_token_logps`` ``[B, T]`` (on both sides), optionally ``index``.

    Returns:
        ``input_ids`` ``[1, N]`` long; ``position_ids`` ``[1, N]`` long (0 at each sequence
        start); ``response_mask`` ``[1, N]`` bool; ``token_rewards`` ``[1, N]`` float32;
        ``ref_token_logps`` ``[1, N]`` (only if in the batch); ``cu_seqlens`` ``[2B + 1]`` int32
        (flash-attention varlen boundaries); ``max_seqlen`` int; ``seq_lengths`` ``[2B]`` long;
        ``seq_index`` ``[1, N]`` long (sequence of each token: ``0..B-1`` chosen,
        ``B..2B-1`` rejected); ``num_pairs`` int; ``widths`` (chosen ``T``, rejected ``T``) of
        the padded batch, for :func:`unpack_pairs`; ``index`` ``[B]`` if in the batch.

    Raises:
        ValueError: a sequence has no real token, or a sequence's first token is a response
            token (it would be scored from the previous sequence's last hidden state).
    """
    sides = SIDES
    keeps = [batch[field(side, "attention_mask")].bool() for side in sides]
    lengths = torch.cat([keep.sum(-1) for keep in keeps])
    if (lengths == 0).any():
        bad = (lengths == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"pack_batch: sequences {bad} (0..B-1 chosen, B..2B-1 rejected) have no real token "
            "(all-zero attention_mask); drop empty pairs before collating."
        )
    names = [n for n in _PACKED_FIELDS if all(field(s, n) in batch for s in sides)]
    packed = {
        name: torch.cat([_side_tokens(batch, s, name, k) for s, k in zip(sides, keeps)])[None]
        for name in names
    }
    packed["response_mask"] = packed["response_mask"].bool()
    if "token_rewards" in packed:
        packed["token_rewards"] = packed["token_rewards"].float()

    device = lengths.device
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = lengths.cumsum(0)
    seq_index = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    starts = cu_seqlens[:-1].long()
    position_ids = torch.arange(seq_index.numel(), device=device) - starts[seq_index]

    first_scored = packed["response_mask"][0, starts]
    if first_scored.any():
        bad = first_scored.nonzero().flatten().tolist()
        raise ValueError(
            f"pack_batch: sequences {bad} start with a response token; in a packed row it would "
            "be scored from the previous sequence's last token. Every sequence must start with "
            "at least one prompt token (check the tokenization: prompt_ids must not be empty)."
        )
    packed.update(
        position_ids=position_ids[None],
        cu_seqlens=cu_seqlens,
        max_seqlen=int(lengths.max()),
        seq_lengths=lengths,
        seq_index=seq_index[None],
        num_pairs=len(lengths) // 2,
        widths=tuple(batch[field(side, "input_ids")].shape[1] for side in sides),
    )
    if "index" in batch:
        packed["index"] = batch["index"]
    return packed


def segment_sums(token_values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums of a packed ``[1, N]`` tensor: ``[num_seqs]`` (differentiable).

    Mask first (``torch.where(mask, values, 0)``) to sum over response tokens only.
    """
    lengths = cu_seqlens.diff().long()
    seq_index = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    sums = torch.zeros(len(lengths), dtype=token_values.dtype, device=token_values.device)
    return sums.index_add(0, seq_index, token_values.reshape(-1))


def unpack_tokens(token_values: torch.Tensor, packed: dict) -> torch.Tensor:
    """Scatter a packed ``[1, N]`` tensor back to ``[2B, max_seqlen]`` (zeros after each end).

    Rows ``0..B-1`` are the chosen sequences, ``B..2B-1`` the rejected ones, so the usual
    ``[batch, seq]`` code (``sequence_logps``, the losses, the T-REG regularizer) runs unchanged
    on ``out[:B]`` / ``out[B:]``. Differentiable; position ``t`` of row ``i`` is token ``t`` of
    sequence ``i``, so the contract's alignment holds.
    """
    seq_index = packed["seq_index"][0]
    positions = packed["position_ids"][0]
    shape = (len(packed["seq_lengths"]), packed["max_seqlen"])
    out = torch.zeros(shape, dtype=token_values.dtype, device=token_values.device)
    return out.index_put((seq_index, positions), token_values.reshape(-1))


def unpack_pairs(token_values: torch.Tensor, packed: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ``[1, N]`` values back to the padded batch's layout: chosen ``[B, T_chosen]`` and
    rejected ``[B, T_rejected]`` (zeros at padding), differentiable.

    This is what a module's per-side code expects: the result lines up with
    ``batch["chosen_response_mask"]`` etc. of the batch that was packed.
    """
    per_sequence = unpack_tokens(token_values, packed)
    num_pairs = packed["num_pairs"]
    sides = (per_sequence[:num_pairs], per_sequence[num_pairs:])
    return tuple(_fit_width(side, width) for side, width in zip(sides, packed["widths"]))


def _fit_width(values: torch.Tensor, width: int) -> torch.Tensor:
    """Cut or zero-pad ``[rows, L]`` to ``[rows, width]`` (cut columns are past every end)."""
    if values.shape[1] >= width:
        return values[:, :width]
    return F.pad(values, (0, width - values.shape[1]))


def block_diagonal_mask(
    cu_seqlens: torch.Tensor, total_length: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Causal block-diagonal attention mask ``[1, 1, N, N]`` for a packed row.

    Args:
        cu_seqlens: ``[num_seqs + 1]`` sequence boundaries (as from :func:`pack_batch`).
        total_length: ``N``.
        dtype: None for a bool mask (True = attend; what sdpa takes); a float dtype for an
            additive mask (0 = attend, ``finfo(dtype).min`` = blocked; what eager attention adds).
    """
    lengths = cu_seqlens.diff().long()
    seq_index = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    if seq_index.numel() != total_length:
        raise ValueError(
            f"block_diagonal_mask: cu_seqlens covers {seq_index.numel()} tokens, "
            f"total_length is {total_length}."
        )
    positions = torch.arange(total_length, device=lengths.device)
    same_sequence = seq_index[:, None] == seq_index[None, :]
    causal = positions[:, None] >= positions[None, :]
    allowed = (same_sequence & causal)[None, None]
    if dtype is None:
        return allowed
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=lengths.device)
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=lengths.device), blocked)


def packed_model_inputs(
    packed: dict, attn_implementation: str, dtype: torch.dtype = torch.float32
) -> dict:
    """Keyword arguments for ``model(**kwargs)`` / ``model.model(**kwargs)`` on a packed row.

    Args:
        packed: output of :func:`pack_batch`.
        attn_implementation: the model's ``config._attn_implementation``. Varlen kernels
            (``"flash_attention_2"``, ``"flash_attention_3"``, kernels-hub flash variants,
            ``"torch_varlen"``) get the varlen kwargs and no mask; ``"sdpa"`` a bool
            block-diagonal mask; ``"eager"`` an additive one.
        dtype: the model's compute dtype (only used for the eager additive mask).
    """
    kwargs = {
        "input_ids": packed["input_ids"],
        "position_ids": packed["position_ids"],
        # A KV cache disables transformers' packed-sequence handling; training needs none.
        "use_cache": False,
    }
    cu_seqlens, total_length = packed["cu_seqlens"], packed["input_ids"].shape[1]
    if runs_varlen(attn_implementation):
        kwargs.update(
            cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens,
            max_length_q=packed["max_seqlen"],
            max_length_k=packed["max_seqlen"],
        )
    elif attn_implementation == "sdpa":
        kwargs["attention_mask"] = block_diagonal_mask(cu_seqlens, total_length)
    elif attn_implementation == "eager":
        kwargs["attention_mask"] = block_diagonal_mask(cu_seqlens, total_length, dtype)
    else:
        raise ValueError(
            f"packed_model_inputs: no packed attention for attn_implementation="
            f"{attn_implementation!r}; use flash_attention_2, torch_varlen, sdpa or eager, or "
            "padded batches."
        )
    return kwargs
