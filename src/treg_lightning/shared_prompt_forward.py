"""Token log-probs of a pair batch with each prompt computed once (``PreferenceModule``'s
``shared_prompt``): the layout and masks are :mod:`treg_lightning.data.shared_prompt`.

When it is used (``shared_prompt=None``, auto): with a mask-based attention kernel (sdpa, eager,
flex_attention), one padded row per pair. Measured on the 2-core CPU machine with pair lengths
from HH-RLHF (bench/README.md, ``bench/shared_prompt_options.py``: forward + backward of one
batch through each path in turn, median of the per-batch ratios against the unshared padded
batch): 1.37x on SmolLM2-135M's shape with gradient checkpointing, 1.13x on the 11M
``--size cpu`` model (its 32k x 256 lm_head, the same work on both paths, is most of the compute
there); with responses 8x longer (UltraFeedback-like) 1.21x on the 135M shape. Only the 11M
model at the long lengths ran slower in training (0.90x), where the attention over the longer
shared row outweighs the prompt saved; real model shapes have a wider hidden size. One row per
pair beat all pairs in one packed row (a dense ``[N, N]`` mask; 1.08x with checkpointing).

Not used (auto) with flash-attention: the module packs sequences for its varlen kernel, which
takes contiguous causal segments only and cannot let the rejected response skip the chosen one
in one call. On such a GPU, ``attn_implementation="flex_attention"`` runs the shared layout in
one call with a sparse :class:`BlockMask` (``packing=True`` puts all pairs in one row, whose
empty tiles it skips); the other way, two varlen calls per layer (queries of
``[prompt, chosen]`` against ``[prompt, chosen]``, and rejected queries against
``[prompt, rejected]``, bottom-right causal), is not implemented. Reusing the prompt's KV cache
instead was slower here (0.91x) and does not work with gradient checkpointing (transformers
drops the cache then).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from treg_lightning.data.shared_prompt import (
    prompt_lengths,
    shared_prompt_layout,
    shared_prompt_model_inputs,
    unpack_shared,
)


def uses_shared_prompt(lm: nn.Module, setting: bool | None, batch: dict | None = None) -> bool:
    """``setting`` if given (True raises later on a batch whose sides differ in their prompts).

    Auto (None): on unless the model runs flash-attention (see above), and only for a batch
    whose two sides carry the same prompts (a subclass may serve different ones); such a batch
    is computed unshared, with the same values, and a warning says so.
    """
    if setting is not None:
        return setting
    if "flash" in str(getattr(lm.config, "_attn_implementation", "")):
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
    """``{chosen,rejected}_token_logps`` ``[B, T_side]`` of ``lm``, each prompt computed once.

    ``lm.token_logps`` is the module's bound forward (base model + chunked log-probs, registered
    with FSDP2), so sharding, checkpointing and the alignment are those of the unshared path.
    ``packed``: all pairs in one row (for flex_attention) instead of one padded row per pair.
    """
    layout = shared_prompt_layout(batch, packed=packed)
    dtype = lm.get_output_embeddings().weight.dtype
    model_inputs = shared_prompt_model_inputs(layout, lm.config._attn_implementation, dtype)
    token_logps = lm.token_logps(model_inputs, layout["response_mask"], chunk_size, softcap)
    chosen, rejected = unpack_shared(token_logps, layout)
    return {"chosen_token_logps": chosen, "rejected_token_logps": rejected}
