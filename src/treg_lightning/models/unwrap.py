"""Reach the transformers model inside a PEFT wrapper: the one place that knows PEFT's layout.

Imports nothing of the package, so the forward pass and the log-prob kernel can use it without
loading the LoRA glue (:mod:`treg_lightning.models.lora`).
"""

from __future__ import annotations

import importlib.util

from torch import nn


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped by PEFT (a ``PeftModel``)."""
    if importlib.util.find_spec("peft") is None:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM (``LlamaForCausalLM``, ...) of a plain or PEFT-wrapped model.

    Under PEFT the adapters are injected into its modules, so its forward runs them (unless
    disabled).
    """
    return model.get_base_model() if is_peft_model(model) else model


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(decoder, lm_head)``: the module returning the final hidden states, and the output
    projection, of a plain or a PEFT-wrapped causal LM."""
    lm = base_causal_lm(model)
    return getattr(lm, lm.base_model_prefix), lm.get_output_embeddings()
