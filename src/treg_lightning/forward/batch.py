"""Token log-probs of both responses of a batch of pairs, in one forward of a causal LM.

Three layouts of the same pairs, equal in values and gradients; each returns per side
``[B, T_side]`` token log-probs aligned with the batch's ``input_ids``:

- shared prompt (default with sdpa / eager / flex_attention): each pair is one sequence
  ``[prompt | chosen | rejected]`` whose rejected block attends to the prompt but not to the
  chosen one (:mod:`treg_lightning.forward.shared_prompt`), so each prompt is computed once;
- padded: chosen stacked over rejected, ``[2B, T]``, right-padded to the longer side
  (:func:`concat_pairs`);
- packed (default with a varlen kernel: flash-attention, or torch's ``torch_varlen`` where
  flash-attn is missing): all ``2B`` sequences' real tokens in one row ``[1, N]``
  (:mod:`treg_lightning.forward.packing`), no padding computed.

Why the shared prompt is the default where it is (``PreferenceModule(shared_prompt=None)``):
measured on the 2-core CPU machine with pair lengths from HH-RLHF (bench/README.md,
``bench/shared_prompt_options.py``: forward + backward of one batch through each path in turn,
median of the per-batch ratios against the unshared padded batch), one padded row per pair ran
1.37x as fast on SmolLM2-135M's shape with gradient checkpointing, 1.13x on the 11M
``--size cpu`` model (its 32k x 256 lm_head, the same work on both paths, is most of the compute
there), and 1.21x on the 135M shape with responses 8x longer (UltraFeedback-like). Only the 11M
model at the long lengths ran slower in training (0.90x), where the attention over the longer
shared row outweighs the prompt saved; real model shapes have a wider hidden size. One row per
pair beat all pairs in one packed row (a dense ``[N, N]`` mask; 1.08x with checkpointing).

Not the default with flash-attention (flash-attn's or torch's varlen kernel): it takes
contiguous causal segments only and cannot let the rejected response skip the chosen one in one
call, so the module packs instead. On such a GPU, ``attn_implementation="flex_attention"`` runs
the shared layout in one call with a sparse ``BlockMask`` (``packing=True`` puts all pairs in
one row, whose empty tiles it skips); two varlen calls per layer (``[prompt, chosen]`` against
itself, rejected queries against ``[prompt, rejected]``, bottom-right causal) would be the other
way, not implemented.
Reusing the prompt's KV cache instead was slower here (0.91x) and does not work with gradient
checkpointing (transformers drops the cache then).
"""

from __future__ import annotations

import warnings
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from treg_lightning.forward.logprobs import causal_lm_token_logps
from treg_lightning.forward.shared_prompt import (
    prompt_lengths,
    shared_prompt_layout,
    shared_prompt_model_inputs,
    unpack_shared,
)
from treg_lightning.models.varlen_attention import runs_varlen
from treg_lightning.pairs import SIDES, field


def bind_token_logps(lm: nn.Module) -> nn.Module:
    """Bind :func:`~treg_lightning.forward.logprobs.causal_lm_token_logps` as ``lm.token_logps``, so
    FSDP2 can register it as a forward method (its root unit, which owns ``lm_head``, is then
    unsharded while the head's weight is read)."""
    lm.token_logps = MethodType(causal_lm_token_logps, lm)
    return lm


def _pad_to(tensor: torch.Tensor, length: int, value: float | int | bool) -> torch.Tensor:
    return F.pad(tensor, (0, length - tensor.shape[1]), value=value)


def concat_pairs(batch: dict[str, torch.Tensor], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack chosen over rejected (``[2 * batch, seq]``), right-padding to the longer side."""
    length = max(batch[field(side, "input_ids")].shape[1] for side in SIDES)
    out = {}
    for name, value in (("input_ids", pad_id), ("attention_mask", 0), ("response_mask", False)):
        out[name] = torch.cat([_pad_to(batch[field(side, name)], length, value) for side in SIDES])
    return out


def padded_token_logps(
    lm: nn.Module, batch: dict, chunk_size: int, softcap: float | None, pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """``{side: [B, T_side]}`` token log-probs with chosen and rejected in one padded forward."""
    pair = concat_pairs(batch, pad_id)
    model_inputs = {
        "input_ids": pair["input_ids"],
        "attention_mask": pair["attention_mask"],
        "use_cache": False,
    }
    token_logps = lm.token_logps(model_inputs, pair["response_mask"], chunk_size, softcap)
    n = batch[field("chosen", "input_ids")].shape[0]
    return {
        side: rows[:, : batch[field(side, "input_ids")].shape[1]]
        for side, rows in zip(SIDES, (token_logps[:n], token_logps[n:]), strict=True)
    }


def packed_token_logps(
    lm: nn.Module, batch: dict, chunk_size: int, softcap: float | None
) -> dict[str, torch.Tensor]:
    """As :func:`padded_token_logps`, with all ``2B`` sequences packed into one ``[1, N]`` row."""
    from treg_lightning.forward.packing import pack_batch, packed_model_inputs, unpack_pairs

    packed = pack_batch(batch)
    model_inputs = packed_model_inputs(
        packed, lm.config._attn_implementation, dtype=lm.get_output_embeddings().weight.dtype
    )
    token_logps = lm.token_logps(model_inputs, packed["response_mask"], chunk_size, softcap)
    return dict(zip(SIDES, unpack_pairs(token_logps, packed), strict=True))


def uses_flash_attention(lm: nn.Module) -> bool:
    """Whether ``lm`` runs a flash-attention varlen kernel, flash-attn's or torch's own
    (``torch_varlen``): packing saves the padding there."""
    return runs_varlen(getattr(lm.config, "_attn_implementation", None))


def uses_shared_prompt(lm: nn.Module, setting: bool | None, batch: dict | None = None) -> bool:
    """``setting`` if given (True raises later on a batch whose sides differ in their prompts).

    Auto (None): on unless the model runs flash-attention (see the module docstring), and only
    for a batch whose two sides carry the same prompts (a subclass may serve different ones);
    such a batch is computed unshared, with the same values, and a warning says so.
    """
    if setting is not None:
        return setting
    if uses_flash_attention(lm):
        return False
    if batch is None:
        return True
    try:
        prompt_lengths(batch)
    except ValueError as error:
        warnings.warn(f"shared_prompt=None (auto) computes this batch unshared: {error}")
        return False
    return True


def shared_prompt_token_logps(
    lm: nn.Module,
    batch: dict[str, torch.Tensor],
    chunk_size: int,
    softcap: float | None,
    packed: bool = False,
) -> dict[str, torch.Tensor]:
    """``{side: [B, T_side]}`` token log-probs of ``lm``, each prompt computed once.

    ``lm.token_logps`` is the module's bound forward (base model + chunked log-probs, registered
    with FSDP2), so sharding, checkpointing and the alignment are those of the unshared path.
    ``packed``: all pairs in one row (for flex_attention) instead of one padded row per pair.
    """
    layout = shared_prompt_layout(batch, packed=packed)
    dtype = lm.get_output_embeddings().weight.dtype
    model_inputs = shared_prompt_model_inputs(layout, lm.config._attn_implementation, dtype)
    token_logps = lm.token_logps(model_inputs, layout["response_mask"], chunk_size, softcap)
    chosen, rejected = unpack_shared(token_logps, layout)
    return dict(zip(SIDES, (chosen, rejected), strict=True))
