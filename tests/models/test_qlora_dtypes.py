"""QLoRA's k-bit preparation keeps the output projection and the embedding in the compute dtype
(bf16): the chunked head's matmuls do not run in float32. bitsandbytes needs CUDA, so the 4-bit
layers are stood in for by bf16 linear layers that behave as ``bnb.nn.Linear4bit`` does for
dtypes (weights of class ``Params4bit``, which peft leaves alone; inputs cast to the compute
dtype, outputs back to the input dtype); peft's real ``prepare_model_for_kbit_training`` runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from builders import tiny_llama
from treg_lightning.forward.logprobs import causal_lm_token_logps

VOCAB = 64


class Params4bit(nn.Parameter):
    """Stands in for bitsandbytes' 4-bit weight class (peft skips it by this class name)."""


class Linear4bit(nn.Linear):
    """The dtype behaviour of ``bnb.nn.Linear4bit``: computes in its weights' dtype and returns
    the dtype it was given."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def quantized_tiny_llama() -> nn.Module:
    """A bf16 tiny Llama whose decoder linear layers are "4-bit", flagged as transformers flags
    a bitsandbytes load."""
    model = tiny_llama(VOCAB, dtype=torch.bfloat16)
    for parent in list(model.model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                layer = Linear4bit(child.in_features, child.out_features, bias=False,
                                   dtype=child.weight.dtype)  # fmt: skip
                layer.weight = Params4bit(child.weight.data, requires_grad=False)
                parent.register_module(name, layer)
    model.is_loaded_in_4bit = True
    return model


@pytest.fixture
def prepared():
    from peft import LoraConfig

    from treg_lightning.models.lora import apply_lora

    return apply_lora(quantized_tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))


@pytest.mark.gpu_emulation
def test_head_and_embedding_stay_in_compute_dtype(prepared):
    base = prepared.get_base_model()
    assert base.lm_head.weight.dtype == torch.bfloat16
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    norms = [p for n, p in base.named_parameters() if "norm" in n]
    assert len(norms) == 5 and all(p.dtype == torch.float32 for p in norms)  # peft's choice
    quantized = [p for p in base.parameters() if isinstance(p, Params4bit)]
    assert len(quantized) == 14 and all(p.dtype == torch.bfloat16 for p in quantized)
    adapters = [p for p in prepared.parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)  # peft's autocast


@pytest.mark.gpu_emulation
def test_chunked_head_runs_in_bf16_and_matches_the_model_forward(prepared):
    """The decoder hands the head bf16 hidden states (its float32 norms would hand float32);
    the chunked log-probs equal log_softmax of transformers' own forward of the prepared model
    (to bf16 logit rounding), and gradients reach every adapter."""
    base = prepared.get_base_model()
    head_inputs = []
    base.model.register_forward_hook(lambda m, a, out: head_inputs.append(out[0].dtype))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    mask = attention_mask.bool()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    token_logps = causal_lm_token_logps(prepared, inputs, mask)
    token_logps.sum().backward()
    with torch.no_grad():
        logits = prepared(**inputs).logits.float()
    expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    scored = mask.clone()
    scored[:, 0] = False
    torch.testing.assert_close(
        token_logps[scored], expected[scored[:, 1:]], rtol=0, atol=4 * 2**-8 * logits.abs().max()
    )
    assert head_inputs == [torch.bfloat16, torch.bfloat16]
    grads = [p.grad for p in prepared.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
