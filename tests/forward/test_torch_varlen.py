"""Padding-free packing without flash-attn: torch's ``varlen_attn`` as ``torch_varlen``, on CPU.

``varlen_attn`` is CUDA-only, so a stand-in of its signature (``stand_in_kernels.varlen_attn``,
sdpa per segment, checking the argument types the real one needs) takes its place in
``torch.nn.attention.varlen``. Everything else is what a GPU without flash-attn runs: the
attention implementation registered by :mod:`treg_lightning.models.varlen_attention`, our
adapters to flash-attn's signatures, transformers' flash-attention wrapper (packed, unpadding
and decoding branches, sliding window), our packing, and the attention choice.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import varlen

import stand_in_kernels
from builders import tiny_llama
from pair_paths import (
    SIDES,
    TOLERANCE,
    VOCAB,
    assert_same,
    contract_batch,
    logps_and_grads,
    packed,
    padded,
)
from stand_in_kernels import CALLS, FLASH_CACHE, kept_flash_cache
from treg_lightning.errors import ConfigError
from treg_lightning.forward.batch import bind_token_logps, uses_flash_attention
from treg_lightning.forward.packing import pack_batch
from treg_lightning.models import loading
from treg_lightning.models.varlen_attention import (
    TORCH_VARLEN,
    flash_attn_varlen_func,
    runs_varlen,
)
from treg_lightning.module.checks import check_module_settings

LAYERS = 2
pytestmark = pytest.mark.gpu_emulation


@pytest.fixture
def stand_in_varlen(monkeypatch):
    """torch's varlen_attn replaced by the stand-in; transformers' flash cache restored after."""
    monkeypatch.setattr(varlen, "varlen_attn", stand_in_kernels.varlen_attn)
    with kept_flash_cache():
        CALLS.clear()
        yield CALLS


def torch_varlen_llama(dtype):
    """Built with ``attn_implementation="torch_varlen"``: transformers accepts the registered
    name at construction, as it would in ``from_pretrained``."""
    lm = tiny_llama(VOCAB, 0, dtype, attn_implementation=TORCH_VARLEN)
    assert lm.config._attn_implementation == TORCH_VARLEN
    return bind_token_logps(lm)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packed_rows_through_torch_varlen_equal_padded(stand_in_varlen, dtype):
    batch = contract_batch()
    want = logps_and_grads(padded, bind_token_logps(tiny_llama(VOCAB, 0, dtype)), batch)
    lm = torch_varlen_llama(dtype)
    assert uses_flash_attention(lm)  # so the module packs by default
    stand_in_varlen.clear()
    got = logps_and_grads(packed, lm, batch)
    boundaries = pack_batch(batch)["cu_seqlens"].tolist()
    assert [c["kind"] for c in stand_in_varlen] == ["torch_varlen"] * LAYERS
    for call in stand_in_varlen:
        assert call["cu_q"] == call["cu_k"] == boundaries and call["max_q"] == 12
        assert call["window"] == (-1, 0)  # causal, unbounded to the left
        assert call["dtype"] == dtype
    assert_same(got, want, batch, TOLERANCE[dtype])


def test_padded_batch_through_torch_varlen(stand_in_varlen):
    """The reference / annotate forwards (padded rows): unpadded into one segment per row."""
    batch = contract_batch(seed=1)
    want = logps_and_grads(padded, bind_token_logps(tiny_llama(VOCAB, 0, torch.float64)), batch)
    got = logps_and_grads(padded, torch_varlen_llama(torch.float64), batch)
    lengths = torch.cat([batch[f"{side}_attention_mask"].sum(-1) for side in SIDES])
    assert [c["kind"] for c in stand_in_varlen] == ["torch_varlen"] * LAYERS
    assert stand_in_varlen[0]["cu_q"] == [0, *lengths.cumsum(0).tolist()]
    assert_same(got, want, batch, TOLERANCE[torch.float64])


@pytest.mark.parametrize("left_padded", [False, True], ids=["full_rows", "left_padded"])
def test_generation_through_torch_varlen(stand_in_varlen, left_padded):
    """Batched greedy decoding: the prompt forward (left padding, as predict runs it, is
    unpadded into segments; full rows are one segment each), then one query per row against
    its cached keys (bottom-right causal). The tokens and scores of sdpa."""
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    attention = torch.ones_like(ids)
    attention[1, :2] = 0 if left_padded else 1  # the second prompt: 4 tokens, left-padded
    settings = {"max_new_tokens": 4, "do_sample": False, "output_scores": True}
    settings |= {"return_dict_in_generate": True, "pad_token_id": 0, "attention_mask": attention}
    want = tiny_llama(VOCAB, 0, torch.float64).generate(ids, **settings)
    got = torch_varlen_llama(torch.float64).generate(ids, **settings)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores))
    assert stand_in_varlen[0]["cu_q"] == ([0, 6, 10] if left_padded else [0, 6, 12])
    decode = [c for c in stand_in_varlen if c["max_q"] == 1]
    assert decode and all(c["window"] == (-1, 0) for c in decode)


def test_sliding_window_reaches_torch_varlen(stand_in_varlen):
    """A sliding-window model (Mistral, window 3 < the sequence lengths): transformers' window
    becomes varlen_attn's left window, and packed equals sdpa's padded sliding-window mask."""
    from transformers import MistralConfig, MistralForCausalLM

    def mistral(attn):
        torch.manual_seed(0)
        config = MistralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, sliding_window=3,
            attn_implementation=attn,
        )  # fmt: skip
        return bind_token_logps(MistralForCausalLM(config).to(torch.float64))

    batch = contract_batch(seed=2)
    want = logps_and_grads(padded, mistral("sdpa"), batch)
    got = logps_and_grads(packed, mistral(TORCH_VARLEN), batch)
    assert {c["window"] for c in stand_in_varlen} == {(2, 0)}  # 3 keys: itself and 2 before
    assert_same(got, want, batch, TOLERANCE[torch.float64])


def test_what_torch_varlen_cannot_do_is_refused(stand_in_varlen):
    """No dropout in the kernel: refused, not dropped. No soft-capping: transformers' wrapper
    refuses it (Gemma-2), so the automatic choice never gives Gemma-2 this kernel."""
    q = torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="attention_dropout"):
        flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, dropout_p=0.1, causal=True)
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        attn_implementation=TORCH_VARLEN,
    )  # fmt: skip
    with pytest.raises(ValueError, match="softcap"):
        Gemma2ForCausalLM(config)(torch.ones(1, 4, dtype=torch.long))


def test_attention_choice_for_packing(monkeypatch):
    """CUDA: flash-attn when installed, else torch's kernel (not for Gemma-2: soft-capping, nor
    for float32 compute); CPU: sdpa. An explicit torch_varlen where it cannot run is refused
    at load, before any weights."""
    monkeypatch.setattr(loading, "flash_attn_available", lambda: False)
    monkeypatch.setattr(loading, "torch_varlen_available", lambda: True)
    choose, bf16, fp32 = loading.choose_attn_implementation, torch.bfloat16, torch.float32
    assert choose(None, "cuda", "llama", bf16) == TORCH_VARLEN
    assert choose(None, "cuda", "llama", fp32) == "sdpa"  # torch's kernel takes no float32
    assert choose(None, "cuda", "gemma2", bf16) == "eager"
    assert choose(None, "cpu", "llama", bf16) == "sdpa"
    assert loading.varlen_attn_implementation("llama", bf16) == TORCH_VARLEN
    assert loading.varlen_attn_implementation("llama", fp32) is None
    assert choose(TORCH_VARLEN, "cuda", "llama", bf16) == TORCH_VARLEN
    with pytest.raises(ConfigError, match="float16 or bfloat16 only"):
        choose(TORCH_VARLEN, "cuda", "llama", fp32)
    with pytest.raises(ConfigError, match="CUDA GPU of the Ampere"):
        choose(TORCH_VARLEN, "cpu", "llama", bf16)
    monkeypatch.setattr(loading, "flash_attn_available", lambda: True)
    assert choose(None, "cuda", "llama", bf16) == "flash_attention_2"
    monkeypatch.setattr(loading, "flash_attn_available", lambda: False)
    monkeypatch.setattr(loading, "torch_varlen_available", lambda: False)
    assert choose(None, "cuda", "llama", bf16) == "sdpa"
    loading.check_attn_implementation(TORCH_VARLEN)  # a name transformers knows
    check_module_settings(1024, True, TORCH_VARLEN)  # packing: true is accepted with it
    assert runs_varlen(TORCH_VARLEN) and runs_varlen("kernels-community/flash-attn2")
    assert not runs_varlen("sdpa") and not runs_varlen(None)


def test_transformers_flash_cache_names_are_pinned():
    """The private globals of transformers that ``_load_into_transformers`` fills (its flash
    loader has no hook for a local kernel); a release that renames them fails here."""
    from transformers import modeling_flash_attention_utils as flash

    for name in (*FLASH_CACHE, "_lazy_define_process_function", "_pad_input", "_unpad_input"):
        assert hasattr(flash, name), f"transformers.modeling_flash_attention_utils.{name} is gone"
