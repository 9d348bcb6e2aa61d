"""Token log-probs of both responses of a batch of pairs, in one forward of a causal LM.

Two layouts of the same pairs, equal in values and gradients:

- padded (default with sdpa / eager): chosen stacked over rejected, ``[2B, T]``, right-padded to
  the longer side (:func:`concat_pairs`);
- packed (default with flash-attention): all ``2B`` sequences' real tokens in one row ``[1, N]``
  (:mod:`treg_lightning.data.packing`), no padding computed.

Both return per side ``[B, T_side]`` token log-probs aligned with the batch's ``input_ids``.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from treg_lightning.logprobs import causal_lm_token_logps
from treg_lightning.pairs import SIDES, field


def bind_token_logps(lm: nn.Module) -> nn.Module:
    """Bind :func:`~treg_lightning.logprobs.causal_lm_token_logps` as ``lm.token_logps``, so
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
    from treg_lightning.data.packing import pack_batch, packed_model_inputs, unpack_pairs

    packed = pack_batch(batch)
    model_inputs = packed_model_inputs(
        packed, lm.config._attn_implementation, dtype=lm.get_output_embeddings().weight.dtype
    )
    token_logps = lm.token_logps(model_inputs, packed["response_mask"], chunk_size, softcap)
    return dict(zip(SIDES, unpack_pairs(token_logps, packed), strict=True))


def uses_flash_attention(lm: nn.Module) -> bool:
    """Whether ``lm`` runs a flash-attention kernel (varlen: packing saves the padding)."""
    return "flash" in str(getattr(lm.config, "_attn_implementation", ""))
