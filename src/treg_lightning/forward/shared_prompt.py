"""Shared-prompt layout: each pair's prompt goes through the model once, for both responses.

The contract's batch holds every pair twice, ``[prompt, chosen]`` and ``[prompt, rejected]``, so
the prompt (on HH-RLHF the larger half of a pair: median 81 prompt tokens against 27 and 35
response tokens) is computed twice. Here each pair becomes ONE sequence of three blocks::

    shared: x_1 .. x_{P-1}  |  chosen: x_P  y_w  |  rejected: x_P'  y_l

- the chosen block attends to the shared block and causally to itself: exactly ``[x, y_w]``;
- the rejected block attends to the shared block and causally to itself, never to the chosen
  block: exactly ``[x, y_l]``;
- ``x_P'`` is a copy of the last prompt token (same id, same position ``P - 1``, same keys in
  view, hence the same hidden state as ``x_P``). Recomputing that one token gives the rejected
  response a predecessor of its own, so every scored token ``t`` is still predicted by the
  hidden state at ``t - 1``: the contract's alignment, which
  :func:`~treg_lightning.forward.logprobs.token_logps_from_hidden` and the model's forward keep
  unchanged.
  Cost: one token per pair;
- position ids continue from the prompt's on both sides: shared ``0 .. P-2``, chosen block
  ``P-1 .. P+C-1``, rejected block ``P-1 .. P+R-1``. A token's position id is also its column in
  its side's ``[B, T]`` tensors, which is how :func:`unpack_shared` maps values back (through
  :func:`treg_lightning.forward.packing.unpack_pairs`).

Two layouts: ``rows`` (one pair per row, ``[B, W]``, right-padded; a ``[B, 1, W, W]`` mask) and
``packed`` (all pairs in one row ``[1, N]``, no padding; a ``[1, 1, N, N]`` mask, or a sparse
flex-attention :class:`BlockMask`). Masks: :func:`shared_prompt_mask` (sdpa: bool; eager:
additive), :func:`shared_prompt_block_mask` (``flex_attention``). Flash-attention's varlen kernel
takes only contiguous causal segments and cannot express "rejected skips chosen" in one call; on
such GPUs use ``flex_attention`` (one call with this mask) or two varlen calls per layer (see
:mod:`treg_lightning.forward.batch`).

The prompt length ``P`` of a pair is the ``prompt_lengths`` batch field when present, else the
first response-mask position; both sides must carry the same ``P`` prompt ids (the tokenizer
truncates one prompt for both, data/tokenize.py), which :func:`prompt_lengths` checks.
"""

from __future__ import annotations

import torch

from treg_lightning.forward.packing import unpack_pairs

SIDES = ("chosen", "rejected")
# Block of each token: the shared prompt, the chosen block (last prompt token + chosen response),
# the rejected block (copy of the last prompt token + rejected response), padding.
SHARED, CHOSEN, REJECTED, PAD = 0, 1, 2, -1


def _pair_names(batch: dict, rows: torch.Tensor) -> list:
    """Dataset indices of the given batch rows (or the row numbers when the batch has none)."""
    index = batch.get("index")
    rows = rows.tolist()
    return [int(index[r]) for r in rows] if index is not None else rows


def _first_response_position(batch: dict, side: str) -> torch.Tensor:
    mask = batch[f"{side}_response_mask"].bool()
    empty = ~mask.any(-1)
    if empty.any():
        raise ValueError(
            f"shared prompt: pairs {_pair_names(batch, empty.nonzero().flatten())} have no "
            f"{side} response token, so the prompt length cannot be read off the response mask. "
            "Serve a `prompt_lengths` batch field, drop such pairs, or set "
            "model.shared_prompt: false."
        )
    return mask.int().argmax(-1)


def prompt_lengths(batch: dict) -> torch.Tensor:
    """``[B]`` long: prompt tokens of each pair, checked to be shared by both sides.

    From ``batch["prompt_lengths"]`` when present, else the first response-mask position of each
    side (which must agree). Raises ValueError, naming the pairs, when a prompt is empty, when a
    side scores a token inside the prompt, when the sides' prompt ids differ (e.g. a subclass
    serving different prompts per side), or when a side is not right-padded.
    """
    if "prompt_lengths" in batch:
        lengths = batch["prompt_lengths"].long()
    else:
        lengths = _first_response_position(batch, "chosen")
        other = _first_response_position(batch, "rejected")
        if (lengths != other).any():
            bad = _pair_names(batch, (lengths != other).nonzero().flatten())
            raise ValueError(
                f"shared prompt: pairs {bad} have their first chosen and rejected response "
                "tokens at different positions, so they do not share a prompt. Serve both sides "
                "with the same prompt_ids, or set model.shared_prompt: false."
            )
    _check_shared_prompts(batch, lengths)
    return lengths


def _check_shared_prompts(batch: dict, lengths: torch.Tensor) -> None:
    if (lengths < 1).any():
        raise ValueError(
            f"shared prompt: pairs {_pair_names(batch, (lengths < 1).nonzero().flatten())} have "
            "an empty prompt; every response token needs a prompt token before it (check the "
            "tokenization: prompt_ids must not be empty)."
        )
    for side in SIDES:
        ids, attention = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"].bool()
        columns = torch.arange(ids.shape[1], device=ids.device)[None]
        right_padded = attention == (columns < attention.sum(-1, keepdim=True))
        short = attention.sum(-1) < lengths
        if not right_padded.all() or short.any():
            bad = (~right_padded.all(-1) | short).nonzero().flatten()
            raise ValueError(
                f"shared prompt: the {side} sequences of pairs {_pair_names(batch, bad)} are not "
                "right-padded or are shorter than their prompt; the layout needs the contract's "
                "right padding (PreferenceCollator)."
            )
        in_prompt = batch[f"{side}_response_mask"].bool() & (columns < lengths[:, None])
        if in_prompt.any():
            raise ValueError(
                f"shared prompt: pairs {_pair_names(batch, in_prompt.any(-1).nonzero().flatten())}"
                f" score {side} tokens inside the prompt (prompt_lengths vs response mask); the "
                "shared layout computes the prompt once and cannot score it per side."
            )
    width = min(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    columns = torch.arange(width, device=lengths.device)[None]
    differs = (batch["chosen_input_ids"][:, :width] != batch["rejected_input_ids"][:, :width]) & (
        columns < lengths[:, None]
    )
    if differs.any():
        raise ValueError(
            f"shared prompt: pairs {_pair_names(batch, differs.any(-1).nonzero().flatten())} have "
            "different chosen and rejected prompt ids, so the prompt cannot be computed once. "
            "Serve both sides with the same prompt_ids (a subclass that changes one side's "
            "prompt must set model.shared_prompt: false)."
        )


def shared_prompt_layout(batch: dict, packed: bool = False) -> dict:
    """Lay the contract's pair batch out as one sequence per pair (see the module docstring).

    Args:
        batch: ``{chosen,rejected}_input_ids`` / ``_attention_mask`` / ``_response_mask``
            ``[B, T_side]`` (right-padded), optionally ``prompt_lengths`` ``[B]`` and ``index``.
        packed: all pairs in one padding-free row ``[1, N]`` instead of one row per pair.

    Returns:
        ``input_ids``, ``position_ids`` ``[R, W]`` long; ``response_mask`` ``[R, W]`` bool (the
        tokens to score); ``block`` ``[R, W]`` (SHARED / CHOSEN / REJECTED / PAD) and
        ``pair_index`` ``[R, W]`` (-1 at padding), which define the attention mask; ``real``
        ``[R, W]`` bool; ``destination``: what :func:`unpack_shared` needs. ``R`` = B (rows) or
        1 (packed).
    """
    lengths = prompt_lengths(batch)
    chosen_len = batch["chosen_attention_mask"].sum(-1)
    rejected_len = batch["rejected_attention_mask"].sum(-1)
    shared = lengths - 1
    total = chosen_len + rejected_len - shared
    num_pairs, device = len(lengths), lengths.device
    width = int(total.max())
    j = torch.arange(width, device=device)[None]
    # Columns [0, chosen_len): the chosen sequence as it is (shared prompt + chosen block); then
    # the rejected sequence from column P-1 on (its copy of the last prompt token + response).
    in_chosen = j < chosen_len[:, None]
    in_rejected = ~in_chosen & (j < total[:, None])
    source = torch.where(in_rejected, j - chosen_len[:, None] + shared[:, None], j)

    def take(field: str, fill) -> torch.Tensor:
        chosen, rejected = (batch[f"{side}_{field}"] for side in SIDES)
        picked_chosen = chosen.gather(1, source.clamp(max=chosen.shape[1] - 1))
        picked_rejected = rejected.gather(1, source.clamp(0, rejected.shape[1] - 1))
        rest = torch.where(in_rejected, picked_rejected, fill)
        return torch.where(in_chosen, picked_chosen, rest)

    real = in_chosen | in_rejected
    pairs = torch.arange(num_pairs, device=device)[:, None]
    layout = {
        "input_ids": take("input_ids", 0),
        "position_ids": torch.where(real, source, 0),
        "response_mask": take("response_mask", False).bool(),
        "block": torch.where(j < shared[:, None], SHARED, CHOSEN),
        "pair_index": torch.where(real, pairs, -1),
        "real": real,
    }
    layout["block"] = torch.where(in_rejected, REJECTED, layout["block"])
    layout["block"] = torch.where(real, layout["block"], PAD)
    # Each real token's place in the [2B, T] per-sequence layout of packing.unpack_tokens:
    # row b (chosen) or B + b (rejected), column = its position id.
    sequence = torch.where(in_rejected, pairs + num_pairs, pairs).expand(-1, width)
    layout["destination"] = {
        "seq_index": sequence[real][None],
        "position_ids": layout["position_ids"][real][None],
        "seq_lengths": torch.cat([chosen_len, rejected_len]),
        "max_seqlen": max(batch[f"{side}_input_ids"].shape[1] for side in SIDES),
        "num_pairs": num_pairs,
        "widths": tuple(batch[f"{side}_input_ids"].shape[1] for side in SIDES),
    }
    if packed:
        for key in ("input_ids", "position_ids", "response_mask", "block", "pair_index", "real"):
            layout[key] = layout[key][real][None]
    return layout


def unpack_shared(token_values: torch.Tensor, layout: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, W]`` values of the layout back to chosen ``[B, T_chosen]`` and rejected
    ``[B, T_rejected]``, aligned with the batch's own tensors (zeros elsewhere); differentiable.

    Shared prompt tokens land in the chosen rows (they are never scored, so their values are 0).
    """
    return unpack_pairs(token_values[layout["real"]][None], layout["destination"])


def allowed(pair_q, block_q, pair_k, block_k, q_idx, kv_idx):
    """Whether query ``q_idx`` attends to key ``kv_idx`` (tensors broadcast): same pair, causal
    in layout order, and never rejected-to-chosen. Padding attends to itself only, so no row of
    the mask is empty (an all-masked row gives NaN, and NaN * 0 is NaN in the backward)."""
    same_pair = (pair_q == pair_k) & (pair_q >= 0)
    rejected_to_chosen = (block_q == REJECTED) & (block_k == CHOSEN)
    return (same_pair & (kv_idx <= q_idx) & ~rejected_to_chosen) | (q_idx == kv_idx)


def shared_prompt_mask(layout: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense attention mask ``[R, 1, W, W]``: bool (True = attend; sdpa) for ``dtype=None``,
    else additive (0 or ``finfo(dtype).min``; eager attention)."""
    pair, block = layout["pair_index"], layout["block"]
    index = torch.arange(pair.shape[1], device=pair.device)
    mask = allowed(
        pair[:, :, None], block[:, :, None], pair[:, None, :], block[:, None, :],
        index[None, :, None], index[None, None, :],
    )[:, None]  # fmt: skip
    if dtype is None:
        return mask
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def shared_prompt_block_mask(layout: dict, block_size: int = 128):
    """The same mask as a flex-attention ``BlockMask`` (fully masked tiles are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    pair, block = layout["pair_index"], layout["block"]

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(pair[b, q_idx], block[b, q_idx], pair[b, kv_idx], block[b, kv_idx],
                       q_idx, kv_idx)  # fmt: skip

    rows, width = pair.shape
    return create_block_mask(
        mask_mod, rows, None, width, width, device=pair.device, BLOCK_SIZE=block_size
    )


def shared_prompt_model_inputs(
    layout: dict, attn_implementation: str, dtype: torch.dtype = torch.float32
) -> dict:
    """Keyword arguments for the base model on a shared-prompt layout.

    ``"sdpa"``: a bool mask; ``"eager"``: an additive one in ``dtype``; ``"flex_attention"``: a
    BlockMask. A varlen kernel (flash-attention, ``torch_varlen``) cannot express the mask in
    one call: ValueError.
    """
    kwargs = {
        "input_ids": layout["input_ids"],
        "position_ids": layout["position_ids"],
        "use_cache": False,
    }
    if attn_implementation == "sdpa":
        kwargs["attention_mask"] = shared_prompt_mask(layout)
    elif attn_implementation == "eager":
        kwargs["attention_mask"] = shared_prompt_mask(layout, dtype)
    elif attn_implementation == "flex_attention":
        kwargs["attention_mask"] = shared_prompt_block_mask(layout)
    else:
        raise ValueError(
            f"shared prompt: no mask for attn_implementation={attn_implementation!r}. A varlen "
            "kernel (flash-attention, torch_varlen) cannot let the rejected response skip the "
            "chosen one; use attn_implementation flex_attention or sdpa, or set "
            "model.shared_prompt: false."
        )
    return kwargs
