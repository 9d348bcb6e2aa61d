"""Chunked token log-probs against the naive ``log_softmax(logits).gather(...)``.

Alignment (contract): ``token_logps[b, t] = log p(input_ids[b, t] | input_ids[b, <t])``, scored
from the hidden state at ``t - 1``; 0 at ``t = 0`` and wherever the mask is False.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from treg_lightning.forward.logprobs import token_logps_from_hidden
from treg_lightning.pairs import sequence_logps

BATCH, SEQ, HIDDEN, VOCAB = 3, 9, 8, 37


def naive_token_logps(hidden, weight, input_ids, mask, softcap=None, bias=None):
    """The reference: full ``[B, T, V]`` logits, log-softmax, gather, then align and mask."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logps = torch.log_softmax(logits[:, :-1], dim=-1)
    logps = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    scored = mask[:, 1:]
    aligned = torch.zeros(mask.shape, dtype=logps.dtype)
    aligned[:, 1:] = torch.where(scored, logps, 0.0)
    return aligned


def make_inputs(dtype=torch.float64, seed=0, with_bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=g, dtype=torch.float64)
    # Logits with a standard deviation of about 6, so that a softcap of 2 really bends them.
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64) * 2
    bias = torch.randn(VOCAB, generator=g, dtype=torch.float64) if with_bias else None
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    mask[0, 3:] = True  # prompt of 3, response to the end
    mask[1, 2:6] = True  # response followed by padding
    mask[2, 0:5] = True  # mask True at t = 0 must still be unscored
    upstream = torch.randn(BATCH, SEQ, generator=g, dtype=torch.float64)
    leaves = [hidden.to(dtype), weight.to(dtype)] + ([bias.to(dtype)] if with_bias else [])
    leaves = [t.requires_grad_(True) for t in leaves]
    return leaves, input_ids, mask, upstream


def values_and_grads(fn, leaves, upstream):
    out = fn(*leaves)
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), leaves)
    return out.detach(), grads


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
@pytest.mark.parametrize("softcap", [None, 30.0, 2.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_equals_naive_float64(chunk_size, softcap, with_bias):
    leaves, input_ids, mask, upstream = make_inputs(with_bias=with_bias)

    def chunked(hidden, weight, bias=None):
        return token_logps_from_hidden(
            hidden, weight, input_ids, mask, chunk_size, softcap=softcap, lm_head_bias=bias
        )

    def naive(hidden, weight, bias=None):
        return naive_token_logps(hidden, weight, input_ids, mask, softcap=softcap, bias=bias)

    ours, our_grads = values_and_grads(chunked, leaves, upstream)
    want, want_grads = values_and_grads(naive, leaves, upstream)
    assert ours.dtype == torch.float64 and ours.shape == (BATCH, SEQ)
    torch.testing.assert_close(ours, want, atol=1e-12, rtol=1e-12)
    for name, got, expected in zip(("hidden", "weight", "bias"), our_grads, want_grads):
        assert got.abs().max() > 0, name
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10, msg=name)
    # Alignment: nothing at t = 0 or outside the mask; every scored position is a log-prob < 0.
    scored = mask.clone()
    scored[:, 0] = False
    assert torch.all(ours[~scored] == 0)
    assert torch.all(ours[scored] < 0)


def test_softcap_changes_the_result():
    """Guards the softcap tests above against a cap that never bites."""
    (hidden, weight), input_ids, mask, _ = make_inputs()
    plain = token_logps_from_hidden(hidden, weight, input_ids, mask)
    capped = token_logps_from_hidden(hidden, weight, input_ids, mask, softcap=2.0)
    assert (plain - capped).abs().max() > 0.5


def test_hidden_state_t_minus_1_scores_token_t():
    """One scored position, worked by hand: logits = W h[0]; logp = logits[id] - logsumexp."""
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    weight = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]], dtype=torch.float64)
    input_ids = torch.tensor([[0, 2]])
    mask = torch.tensor([[True, True]])
    # h[0] = (1, 0) -> logits (2, 0, 1); token 2: 1 - log(e^2 + e^0 + e^1) = -1.4076059644443801
    out = token_logps_from_hidden(hidden, weight, input_ids, mask)
    torch.testing.assert_close(
        out, torch.tensor([[0.0, -1.4076059644443801]], dtype=torch.float64), atol=1e-14, rtol=0
    )


def test_float32_close_to_float64_reference():
    leaves, input_ids, mask, upstream = make_inputs(dtype=torch.float32, with_bias=True)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]

    def chunked(hidden, weight, bias):
        return token_logps_from_hidden(hidden, weight, input_ids, mask, 4, 30.0, bias)

    def naive(hidden, weight, bias):
        return naive_token_logps(hidden, weight, input_ids, mask, 30.0, bias)

    ours, our_grads = values_and_grads(chunked, leaves, upstream)
    want, want_grads = values_and_grads(naive, ref_leaves, upstream)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, want.float(), atol=2e-5, rtol=1e-5)
    for got, expected in zip(our_grads, want_grads, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected.float(), atol=2e-5, rtol=1e-4)


class GemmLog(TorchDispatchMode):
    """Records every matrix product (``aten.mm`` overload, operand dtypes, result dtype) and
    serves ``aten.mm.dtype`` on CPU: CUDA's product of half-precision matrices into a float32
    result, emulated by a float32 product of the same values (products of bf16 values are
    exact in float32, so only the summation order can differ)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.mm.dtype:
            a, b, out_dtype = args
            out = torch.mm(a.to(out_dtype), b.to(out_dtype))
        else:
            out = func(*args, **kwargs)
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            operands = [a.dtype for a in args if isinstance(a, torch.Tensor)]
            self.calls.append((str(func), *operands, out.dtype))
        return out


@pytest.mark.gpu_emulation
def test_bfloat16_gemm_operands_and_float32_logits(monkeypatch):
    """bf16 compute on the GPU path (its float32-output GEMM emulated): every product of the
    forward and backward takes bf16 operands and returns float32 (no float32 GEMM, and no
    logits rounded to bf16), so the values equal a float64 reference computed from the same
    bf16 numbers to float32 accuracy (rounding the logits to bf16 first costs ~0.05 here);
    gradients come back in bf16, within bf16 rounding of the reference. The CPU path (operands
    rounded to bf16, multiplied in float32) gives the same values."""
    from treg_lightning.forward import logprobs

    leaves, input_ids, mask, upstream = make_inputs(dtype=torch.bfloat16)
    reference = [t.detach().double().requires_grad_(True) for t in leaves]

    def chunked(hidden, weight):
        return token_logps_from_hidden(hidden, weight, input_ids, mask, 5)

    def naive(hidden, weight):
        return naive_token_logps(hidden, weight, input_ids, mask)

    monkeypatch.setattr(logprobs, "_float32_output_gemm", lambda device: True)
    with GemmLog() as log:
        ours, our_grads = values_and_grads(chunked, leaves, upstream)
    # 14 scored rows (6 + 4 + 4): 3 chunks of 5 rows; backward slices of 5 * 37 // 14 = 13
    # vocabulary columns: 3 slices of the 37.
    chunks, slices = 3, 3
    assert log.calls == [("aten.mm.dtype", torch.bfloat16, torch.bfloat16, torch.float32)] * (
        chunks + 3 * slices  # forward logits; backward logits, hidden and weight gradients
    )
    want, want_grads = values_and_grads(naive, reference, upstream)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), want, atol=2e-5, rtol=0)
    for got, expected in zip(our_grads, want_grads, strict=True):
        assert got.dtype == torch.bfloat16
        scale = expected.abs().max()
        torch.testing.assert_close(got.double() / scale, expected / scale, atol=1e-2, rtol=0)
    monkeypatch.setattr(logprobs, "_float32_output_gemm", lambda device: False)
    cpu, cpu_grads = values_and_grads(chunked, leaves, upstream)
    torch.testing.assert_close(cpu, ours, atol=1e-6, rtol=0)
    for got, expected in zip(cpu_grads, our_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=0, rtol=1e-2)


def test_float32_compute_stays_float32():
    """A float32 model multiplies in float32: nothing is rounded down to a half type."""
    leaves, input_ids, mask, upstream = make_inputs(dtype=torch.float32)
    with GemmLog() as log:
        values_and_grads(
            lambda h, w: token_logps_from_hidden(h, w, input_ids, mask, 5), leaves, upstream
        )
    assert log.calls and {c[1:] for c in log.calls} == {(torch.float32,) * 3}


def test_all_masked_rows_and_batches():
    (hidden, weight), input_ids, mask, upstream = make_inputs()
    mask[1] = False
    out = token_logps_from_hidden(hidden, weight, input_ids, mask, chunk_size=2)
    assert torch.all(out[1] == 0)
    (grad_hidden,) = torch.autograd.grad((out * upstream).sum(), [hidden])
    assert torch.all(grad_hidden[1] == 0)
    assert grad_hidden[0].abs().max() > 0

    nothing = torch.zeros_like(mask)
    out = token_logps_from_hidden(hidden, weight, input_ids, nothing)
    assert torch.equal(out, torch.zeros(BATCH, SEQ, dtype=torch.float64))
    grad_hidden, grad_weight = torch.autograd.grad(out.sum(), [hidden, weight], allow_unused=True)
    for grad in (grad_hidden, grad_weight):
        assert grad is None or torch.all(grad == 0)
    torch.testing.assert_close(sequence_logps(out, nothing), torch.zeros(BATCH, dtype=out.dtype))


def test_invalid_chunk_size():
    (hidden, weight), input_ids, mask, _ = make_inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        token_logps_from_hidden(hidden, weight, input_ids, mask, chunk_size=0)


def test_sequence_logps_sums_masked_in_positions_only():
    """(-1) + (-2) = -3 for row 0; row 1 sums -0.5 and ignores the junk outside its mask."""
    token_logps = torch.tensor([[0.0, -1.0, -2.0, 5.0], [float("nan"), -0.5, 1e30, 0.0]])
    mask = torch.tensor([[False, True, True, False], [False, True, False, False]])
    torch.testing.assert_close(sequence_logps(token_logps, mask), torch.tensor([-3.0, -0.5]))
    assert sequence_logps(token_logps, mask.long()).shape == (2,)


def test_real_llama_hidden_states_match_model_logits():
    """``model.model(...)`` final hidden states + ``lm_head.weight`` give the same token log-probs
    (and parameter gradients) as ``log_softmax(model(...).logits)``, with right padding."""
    from builders import tiny_llama

    model = tiny_llama(
        VOCAB, 0, torch.float64, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 7), generator=g)
    attention_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    response_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]]).bool()

    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    ours = token_logps_from_hidden(
        hidden, model.lm_head.weight, input_ids, response_mask, chunk_size=3
    )
    our_grads = torch.autograd.grad(sequence_logps(ours, response_mask).sum(), model.parameters())

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    full = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    want = torch.zeros_like(ours)
    want[:, 1:] = torch.where(response_mask[:, 1:], full, 0.0)
    want_grads = torch.autograd.grad(want.sum(), model.parameters())

    torch.testing.assert_close(ours, want, atol=1e-12, rtol=1e-12)
    for got, expected in zip(our_grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
