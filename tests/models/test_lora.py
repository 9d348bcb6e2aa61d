"""LoRA / DoRA through PEFT (treg_lightning.models.lora): adapters-off equals the base model
exactly, chunked log-probs through a PeftModel, merged and adapter-only export, QLoRA refusal
on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft", reason="LoRA tests need peft (the `lora`/`dev` extra)")

from builders import tiny_gemma2, tiny_llama  # noqa: E402
from treg_lightning.forward.logprobs import causal_lm_token_logps  # noqa: E402
from treg_lightning.models import lora  # noqa: E402
from treg_lightning.models.save import save_merged  # noqa: E402
from treg_lightning.models.unwrap import base_causal_lm, decoder_and_head  # noqa: E402

VOCAB = 61


def build_tiny_model(vocab_size: int):
    return tiny_llama(vocab_size).train()


BUILDERS = {"llama": lambda: build_tiny_model(VOCAB), "gemma2": lambda: tiny_gemma2(VOCAB)}


def lora_config(use_dora: bool = False, dropout: float = 0.1):
    return peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", use_dora=use_dora
    )


def batch(seed: int = 1, n: int = 3, length: int = 12):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (n, length), generator=generator)
    attention_mask = torch.ones(n, length, dtype=torch.long)
    attention_mask[0, -3:] = 0  # one padded row
    score_mask = torch.zeros(n, length, dtype=torch.bool)
    score_mask[:, 4:] = True
    score_mask &= attention_mask.bool()
    return {"input_ids": input_ids, "attention_mask": attention_mask}, score_mask


def logps_of(model, inputs, mask, softcap=None):
    return causal_lm_token_logps(model, inputs, mask, chunk_size=5, softcap=softcap)


def softcap_of(model):
    return getattr(base_causal_lm(model).config, "final_logit_softcapping", None)


def train_one_step(model, lr: float = 0.05) -> None:
    inputs, mask = batch(seed=7)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = -logps_of(model, inputs, mask, softcap_of(model)).sum()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapters_off_equals_base_model_after_training(arch, use_dora):
    base = BUILDERS[arch]().eval()
    policy = lora.apply_lora(copy.deepcopy(base), lora_config(use_dora=use_dora))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    train_one_step(policy)
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the adapters do something now

    inputs, mask = batch()
    softcap = softcap_of(base)
    with torch.no_grad():
        expected = logps_of(base, inputs, mask, softcap)
        with lora.adapters_disabled(policy):
            reference = logps_of(policy, inputs, mask, softcap)
        adapted = logps_of(policy.eval(), inputs, mask, softcap)
    assert torch.equal(reference, expected)
    assert not torch.allclose(adapted, expected)  # adapters are on again outside the context


def test_adapters_disabled_restores_modes_and_needs_peft():
    policy = lora.apply_lora(build_tiny_model(VOCAB), lora_config())
    policy.train()
    dropout = next(m for n, m in policy.named_modules() if n.endswith("lora_dropout.default"))
    with lora.adapters_disabled(policy):
        assert not policy.training and not dropout.training
    assert policy.training and dropout.training
    with pytest.raises(TypeError, match="PEFT-wrapped"):
        with lora.adapters_disabled(build_tiny_model(VOCAB)):
            pass


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_chunked_logps_through_peft_equal_full_logits(arch):
    policy = lora.apply_lora(BUILDERS[arch](), lora_config(dropout=0.0))
    train_one_step(policy)
    policy.eval()
    # PEFT forwards attribute lookups to the causal LM, so the prefix lookup the plain-model
    # path uses finds the whole LM, not its decoder: decoder_and_head goes through the base.
    lm = policy.get_base_model()
    assert getattr(policy, lm.base_model_prefix) is lm
    decoder, head = decoder_and_head(policy)
    assert decoder is getattr(lm, lm.base_model_prefix) and head is lm.lm_head

    inputs, mask = batch()
    with torch.no_grad():
        ours = logps_of(policy, inputs, mask, softcap_of(policy))
        logits = policy(**inputs).logits.float()  # Gemma-2 soft-caps inside its forward
    full = torch.log_softmax(logits[:, :-1], -1).gather(-1, inputs["input_ids"][:, 1:, None])
    expected = torch.zeros_like(ours)
    expected[:, 1:] = full.squeeze(-1)
    expected = torch.where(mask, expected, 0.0)
    expected[:, 0] = 0.0
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert ours[mask].abs().min() > 0


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merged_export_loads_without_peft_and_equals_base_plus_adapter(tmp_path, use_dora):
    from transformers import AutoModelForCausalLM

    policy = lora.apply_lora(build_tiny_model(VOCAB), lora_config(use_dora=use_dora))
    train_one_step(policy)
    policy.eval()
    folder = save_merged(policy, tmp_path / "merged")
    assert not (folder / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    inputs, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(**inputs).logits, policy(**inputs).logits, atol=1e-5, rtol=0
        )
    assert lora.is_peft_model(policy)  # the default merges a copy: the policy trains on


def test_adapter_export_loads_back_with_peft(tmp_path):
    base = build_tiny_model(VOCAB)
    policy = lora.apply_lora(copy.deepcopy(base), lora_config())
    train_one_step(policy)
    policy.eval()
    folder = lora.save_adapter(policy, tmp_path / "adapter")
    assert (folder / "adapter_config.json").is_file()
    assert (folder / "adapter_model.safetensors").is_file()
    loaded = peft.PeftModel.from_pretrained(base, folder).eval()
    inputs, _ = batch()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, policy(**inputs).logits)


def test_lm_head_adapter_refused():
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="lm_head"):
        lora.apply_lora(build_tiny_model(VOCAB), config)


def test_unknown_target_names_listed():
    with pytest.raises(ValueError, match=r"named \[.*'q_proj'.*\]"):
        lora.apply_lora(build_tiny_model(VOCAB), peft.LoraConfig(r=2, target_modules=["qkv"]))


def test_other_peft_methods_refused():
    with pytest.raises(TypeError, match="peft.LoraConfig"):
        lora.apply_lora(build_tiny_model(VOCAB), peft.IA3Config(target_modules=["q_proj"]))


def test_qlora_refused_on_cpu_before_loading(tiny_model_dir, monkeypatch):
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(lora.QLoRAUnavailable, match="needs a CUDA device"):
        lora.check_qlora_available("cpu")
    with pytest.raises(lora.QLoRAUnavailable, match="plain LoRA"):
        lora.load_quantized_causal_lm(str(tiny_model_dir), device_type="cpu")


@pytest.mark.gpu
def test_qlora_trains_and_adapters_off_is_the_4bit_base(tiny_model_dir):
    if not torch.cuda.is_available():
        pytest.skip("QLoRA needs a CUDA device")
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    base = lora.load_quantized_causal_lm(str(tiny_model_dir), torch_dtype="bfloat16")
    policy = lora.apply_lora(base, lora_config(dropout=0.0))
    inputs, mask = batch()
    inputs = {k: v.cuda() for k, v in inputs.items()}
    mask = mask.cuda()
    with torch.no_grad(), lora.adapters_disabled(policy):
        before = logps_of(policy, inputs, mask)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=0.05)
    policy.train()
    (-logps_of(policy, inputs, mask).sum()).backward()
    optimizer.step()
    with torch.no_grad(), lora.adapters_disabled(policy):
        after = logps_of(policy, inputs, mask)
    assert torch.equal(before, after)
    with torch.no_grad():
        assert not torch.equal(logps_of(policy.eval(), inputs, mask), before)
