"""Per-token log-probabilities without materializing ``[batch, seq, vocab]`` float32 logits.

Only the positions whose token is scored (response tokens) go through the ``lm_head``, in chunks
of ``chunk_size`` rows. A custom autograd function keeps just the hidden states and one
log-sum-exp per row for the backward pass and recomputes each chunk's logits there, so peak
memory holds one ``[chunk_size, vocab]`` float32 block instead of all of them. Values and
gradients equal ``log_softmax(logits).gather(...)`` (see tests/forward/test_logprobs.py).

Gemma-2 applies final-logit soft-capping, ``z = cap * tanh(logits / cap)``, before the softmax:
pass ``softcap=cap``.
"""

from __future__ import annotations

import torch

from treg_lightning.models.unwrap import base_causal_lm, decoder_and_head


def _logit_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits are upcast to float32 (float64 inputs stay float64, for exact tests)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(hidden, weight, bias, softcap):
    """Float32 logits of one chunk (after soft-capping) and, for the backward pass, tanh."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(_logit_dtype(logits.dtype))
    if softcap is None:
        return logits, None
    tanh = torch.tanh(logits / softcap)
    return softcap * tanh, tanh


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap):
        n = hidden.shape[0]
        dtype = _logit_dtype(hidden.dtype)
        token_logps = torch.empty(n, dtype=dtype, device=hidden.device)
        logsumexp = torch.empty(n, dtype=dtype, device=hidden.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            logits, _ = _chunk_logits(hidden[rows], weight, bias, softcap)
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
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        acc_dtype = logsumexp.dtype  # accumulate weight gradients in float32 (or float64)
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=acc_dtype) if ctx.needs_input_grad[2] else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            logits, tanh = _chunk_logits(hidden[rows], weight, bias, ctx.softcap)
            # d logp / d z_j = onehot_j - softmax_j, scaled by the incoming gradient.
            # In place: logits is this chunk's own tensor, and at a 128k vocabulary every
            # extra [chunk, vocab] float32 temporary costs half a gigabyte.
            grad_logits = logits.sub_(logsumexp[rows, None]).exp_().neg_()
            grad_logits.scatter_add_(-1, targets[rows, None], torch.ones_like(grad_logits[:, :1]))
            grad_logits *= grad_token_logps[rows, None]
            if tanh is not None:  # chain rule through z = cap * tanh(l / cap)
                grad_logits *= 1 - tanh * tanh
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, hidden[rows].to(acc_dtype))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            del logits, tanh, grad_logits  # one [chunk, vocab] block at a time, not two
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
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
