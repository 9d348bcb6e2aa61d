"""Per-token log-probabilities without materializing ``[batch, seq, vocab]`` float32 logits.

Only the positions whose token is scored (response tokens) go through the ``lm_head``. A custom
autograd function keeps just their hidden states and one log-sum-exp per row for the backward
pass, and computes the logits in blocks of about ``chunk_size x vocab`` float32 values: the
forward in chunks of ``chunk_size`` rows (a row's log-sum-exp needs its whole vocabulary), the
backward in vocabulary slices of all rows (a slice's logits follow from the saved log-sum-exp).
So peak memory holds one such block instead of all logits, and no float32 ``[vocab, hidden]``
gradient accumulator: each slice's weight gradient is one GEMM over all rows, written once.

Precision, for a model computing in bfloat16 (or float16): every GEMM takes its operands in
that dtype and accumulates in float32, as tensor cores do, and the logits come out of the GEMM
in float32 (``torch.mm(..., out_dtype=float32)`` on CUDA), never rounded to bfloat16 first; the
backward's logit gradients are rounded to bfloat16 as GEMM operands, like any bf16 layer's.
Without such a GEMM (CPU) the operands are rounded to the compute dtype and multiplied in float32,
which gives the same products. float32 and float64 models compute in their own dtype.

Exactness: values and gradients equal ``log_softmax(logits).gather(...)`` up to the rounding of
the compute dtype (float64: 1e-12, tests/forward/test_logprobs.py
``test_chunked_equals_naive_float64``; bfloat16 against a float64 reference:
``test_bfloat16_gemm_operands_and_float32_logits``).

Gemma-2 applies final-logit soft-capping, ``z = cap * tanh(logits / cap)``, before the softmax:
pass ``softcap=cap``.
"""

from __future__ import annotations

import torch

from treg_lightning.models.unwrap import base_causal_lm, decoder_and_head


def _logit_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits are float32 (float64 inputs stay float64, for exact tests)."""
    return torch.promote_types(dtype, torch.float32)


def _float32_output_gemm(device: torch.device) -> bool:
    """Whether torch multiplies half-precision matrices into a float32 result on ``device``
    (``torch.mm(..., out_dtype=torch.float32)``, tensor cores accumulating in float32: CUDA)."""
    return device.type == "cuda"


def _mm(a: torch.Tensor, b: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` with operands in ``compute_dtype`` and the result in its logit dtype (float32
    for bfloat16 / float16): one rounding of the operands, none of the result."""
    out_dtype = _logit_dtype(compute_dtype)
    a, b = a.to(compute_dtype), b.to(compute_dtype)
    if compute_dtype == out_dtype:
        return a @ b
    if _float32_output_gemm(a.device):
        return torch.mm(a, b, out_dtype=out_dtype)
    return a.to(out_dtype) @ b.to(out_dtype)  # products of bf16 values are exact in float32


def _block_logits(hidden, weight, bias, softcap):
    """Logits of a block (after soft-capping) in the logit dtype and, for the backward, tanh."""
    logits = _mm(hidden, weight.T, weight.dtype)
    if bias is not None:
        logits = logits + bias
    if softcap is None:
        return logits, None
    tanh = torch.tanh(logits / softcap)
    return softcap * tanh, tanh


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap):
        n = hidden.shape[0]
        dtype = _logit_dtype(weight.dtype)
        token_logps = torch.empty(n, dtype=dtype, device=hidden.device)
        logsumexp = torch.empty(n, dtype=dtype, device=hidden.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            logits, _ = _block_logits(hidden[rows], weight, bias, softcap)
            logsumexp[rows] = torch.logsumexp(logits, dim=-1)
            target_logits = logits.gather(-1, targets[rows, None]).squeeze(-1)
            token_logps[rows] = target_logits - logsumexp[rows]
            del logits  # else it lives on while the next chunk's logits are computed
        ctx.save_for_backward(hidden, weight, bias, targets, logsumexp)
        ctx.chunk_size, ctx.softcap = chunk_size, softcap
        return token_logps

    @staticmethod
    def backward(ctx, grad_token_logps):
        hidden, weight, bias, targets, logsumexp = ctx.saved_tensors
        n, vocab = hidden.shape[0], weight.shape[0]
        acc_dtype = logsumexp.dtype  # float32 (float64 for float64 inputs)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = hidden.new_zeros(hidden.shape, dtype=acc_dtype) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.empty_like(bias) if need_bias else None
        rows = torch.arange(n, device=hidden.device)
        # Vocabulary slices of all n rows, as many values per block as a forward chunk.
        width = max(1, min(vocab, ctx.chunk_size * vocab // max(n, 1)))
        for start in range(0, vocab, width):
            cols = slice(start, start + width)
            slice_bias = bias[cols] if bias is not None else None
            logits, tanh = _block_logits(hidden, weight[cols], slice_bias, ctx.softcap)
            # d logp / d z_j = onehot_j - softmax_j, scaled by the incoming gradient.
            # In place: logits is this block's own tensor, and at a 128k vocabulary every
            # extra block-sized float32 temporary costs half a gigabyte.
            grad_logits = logits.sub_(logsumexp[:, None]).exp_().neg_()
            here = (targets >= start) & (targets < start + grad_logits.shape[1])
            grad_logits[rows[here], targets[here] - start] += 1
            grad_logits *= grad_token_logps[:, None]
            if tanh is not None:  # chain rule through z = cap * tanh(l / cap)
                grad_logits *= 1 - tanh * tanh
            if grad_bias is not None:
                grad_bias[cols] = grad_logits.sum(0)
            operand = grad_logits.to(weight.dtype)  # the GEMMs' operand: rounded once
            del logits, tanh, grad_logits  # one block at a time, not two
            if grad_hidden is not None:
                grad_hidden += _mm(operand, weight[cols], weight.dtype)
            if grad_weight is not None:  # one GEMM over all rows: accumulated in float32
                grad_weight[cols] = _mm(operand.T, hidden, weight.dtype)
            del operand
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def token_logps_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int = 1024,
    softcap: float | None = None,
    lm_head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probability of each masked-in token given the tokens before it.

    Args:
        hidden: ``[batch, seq, hidden]`` final hidden states (after the last norm).
        lm_head_weight: ``[vocab, hidden]`` output projection.
        input_ids: ``[batch, seq]`` token ids.
        mask: ``[batch, seq]`` bool, True where the token at that position is scored (response
            tokens). Position 0 has no context and is never scored.
        chunk_size: rows of ``[chunk_size, vocab]`` logits computed at a time.
        softcap: final-logit soft-capping value (Gemma-2: 30.0), or None.
        lm_head_bias: ``[vocab]`` bias of the output projection, if it has one.

    Returns:
        ``[batch, seq]`` float32 (float64 for float64 inputs), aligned with ``input_ids``:
        entry ``t`` is ``log p(input_ids[t] | input_ids[<t])``; 0 where ``mask`` is False.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    scored = mask.bool().clone()
    scored[:, 0] = False
    batch_idx, pos_idx = scored.nonzero(as_tuple=True)
    # The token at position t is predicted by the hidden state at position t - 1.
    selected_hidden = hidden[batch_idx, pos_idx - 1]
    targets = input_ids[batch_idx, pos_idx]
    selected_logps = _ChunkedTokenLogps.apply(
        selected_hidden, lm_head_weight, lm_head_bias, targets, chunk_size, softcap
    )
    token_logps = torch.zeros(mask.shape, dtype=selected_logps.dtype, device=hidden.device)
    return token_logps.index_put((batch_idx, pos_idx), selected_logps)


def check_plain_logits(lm: torch.nn.Module) -> None:
    """Logits must be ``lm_head(hidden)`` (+ Gemma-2 soft-capping, which is handled)."""
    lm = base_causal_lm(lm)
    for key in ("logit_scale", "logits_scaling"):
        value = getattr(lm.config, key, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(lm).__name__} scales its logits ({key}={value}); token log-probs are "
                "computed from lm_head(hidden) and would be wrong for this model."
            )


def model_softcap(lm: torch.nn.Module) -> float | None:
    """The model's final-logit soft-capping value (Gemma-2: 30.0), or None."""
    return getattr(base_causal_lm(lm).config, "final_logit_softcapping", None)


def causal_lm_token_logps(
    lm: torch.nn.Module,
    model_inputs: dict,
    score_mask: torch.Tensor,
    chunk_size: int = 1024,
    softcap: float | None = None,
) -> torch.Tensor:
    """``[batch, seq]`` token log-probs of a Hugging Face causal LM, via its final hidden states.

    The one place where a model's forward becomes token log-probs: the training module, the
    reference and the annotate pass all call it. ``model_inputs`` go to the base model
    (``input_ids`` and either ``attention_mask`` or packed-row arguments); ``score_mask`` marks
    the tokens to score (see :func:`token_logps_from_hidden`). Under FSDP2 it is bound to the
    model and registered as a forward method (``treg_lightning.forward.batch.bind_token_logps``), so
    the root unit that owns ``lm_head`` is unsharded while its weight is read here.

    ``lm`` may be wrapped by PEFT (:func:`~treg_lightning.models.lora.apply_lora`): the decoder
    is then found through the wrapped causal LM
    (:func:`~treg_lightning.models.unwrap.decoder_and_head`), and its forward runs the adapters
    unless they are disabled.
    """
    check_plain_logits(lm)
    decoder, head = decoder_and_head(lm)
    hidden = decoder(**model_inputs)[0]
    return token_logps_from_hidden(
        hidden,
        head.weight,
        model_inputs["input_ids"],
        score_mask,
        chunk_size=chunk_size,
        softcap=softcap,
        lm_head_bias=getattr(head, "bias", None),
    )
