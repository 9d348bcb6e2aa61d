"""Per-device memory of a training step, part by part, from a :class:`ModelShape` and the run's
:class:`RunSettings`; the largest micro-batch that fits; what to change when it does not.

The peak is taken at the start of the backward pass of a micro-batch after the first (with
gradient accumulation the gradients of the previous micro-batches are already there):

- weights ``P * p / S_w``, gradients ``T * g / S_g``, optimizer states ``n * T * g / S_o``, with
  ``P`` parameters, ``T`` trainable ones (the adapters under LoRA, kept in float32), ``p`` / ``g``
  their bytes, ``n`` states (AdamW: 2, in the parameter dtype) and ``S`` the devices sharing
  each (FSDP: the data-parallel size; DDP: 1). CPU offload moves all three to CPU memory;
- FSDP all-gather buffers: the root unit (output projection, final norm, tied embedding) and
  three decoder layers unsharded in the compute dtype, plus one layer's gradients before the
  reduce-scatter (modelled, not measured: the CPU benchmark runs one process);
- activations (:mod:`treg_lightning.plan.activations`) of ``2 * micro_batch`` sequences of
  ``max_length`` tokens (a pair is chosen + rejected in one forward, both at full length in
  the worst case), with or without activation checkpointing;
- the chunked log-prob block (:mod:`treg_lightning.forward.logprobs`): the gathered hidden states
  of the scored tokens, one ``[chunk, vocab]`` float32 block (and its temporaries), the output
  projection's gradient in the compute dtype, the hidden states' float32 gradient;
- FSDP2 under gradient accumulation with one gradient sync per optimizer step (the default,
  ``model.fsdp_sync_every_micro_batch: false``): one unsharded float32 copy of the trainable
  gradients, held between syncs;
- the reference: a live model holds its own weights (sharded like the policy); under LoRA the
  reference is the policy with adapters off (no weights); cached log-probs cost ``[B, T]``;
- transients, of which only the largest counts: the log-prob block's temporaries, one layer's
  backward (with checkpointing: plus its recomputed activations), the live reference's forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from treg_lightning.plan.activations import (
    LoraSpec,
    attention_kernel,
    checkpointed_layer_bytes,
    final_norm_bytes,
    layer_activation_bytes,
    layer_constant_bytes,
)
from treg_lightning.plan.settings import RunSettings
from treg_lightning.plan.shapes import ModelShape

GIB = 2**30
MAX_SEARCH = 1 << 16


@dataclass(frozen=True)
class Part:
    """One line of the plan: ``bytes`` per device, with how it was counted.

    ``transient`` parts live at different moments of the step (the log-prob block's
    temporaries, a layer's backward): only the largest of them counts in the peak.
    """

    name: str
    bytes: float
    detail: str = ""
    transient: bool = False


@dataclass(frozen=True)
class Estimate:
    """The plan of one configuration at one micro-batch.

    Attributes:
        parts: device memory at the peak, part by part.
        host: CPU memory per device (offloaded weights, gradients, optimizer states).
        activations_full: activations without checkpointing (for the report's both figures).
        activations_checkpointed: activations with checkpointing.
    """

    settings: RunSettings
    shape: ModelShape
    micro_batch: int
    parts: tuple[Part, ...]
    host: tuple[Part, ...]
    activations_full: float
    activations_checkpointed: float

    @property
    def peak(self) -> float:
        held = sum(part.bytes for part in self.parts if not part.transient)
        return held + max((part.bytes for part in self.parts if part.transient), default=0.0)


def estimate(
    settings: RunSettings,
    shape: ModelShape,
    reference_shape: ModelShape | None = None,
    micro_batch: int | None = None,
) -> Estimate:
    """Per-device memory of ``settings`` on ``shape`` (module docstring for the model)."""
    batch = micro_batch or settings.micro_batch
    sh, lora = settings.sharding, settings.lora
    pb, cb = settings.param_bytes, settings.compute_bytes
    params = shape.num_params()
    adapters = lora.params(shape) if lora else 0
    trainable, train_bytes = (adapters, lora.adapter_bytes) if lora else (params, pb)

    weights = params * pb / sh.params + adapters * train_bytes / sh.params
    grads = trainable * train_bytes / sh.grads
    optim = settings.optimizer_states * trainable * train_bytes / sh.optim
    what = f"{settings.param_dtype}" + (f", / {sh.params}" if sh.params > 1 else "")
    static = [
        Part("weights", weights, _weights_detail(shape, lora, what)),
        Part("gradients", grads, f"{'adapters' if lora else 'all'}, / {sh.grads}"),
        Part(
            "optimizer states",
            optim,
            f"{settings.optimizer_name}: {settings.optimizer_states} per parameter, / {sh.optim}",
        ),
    ]
    parts: list[Part] = []
    host: list[Part] = []
    if sh.cpu_offload:
        host = static
        parts += [Part(p.name, 0.0, "offloaded to CPU") for p in static]
    else:
        parts += static
    if sh.bucket_copy:
        parts.append(Part("DDP gradient buckets", grads, "gradient_as_bucket_view: false"))
    if sh.fsdp:
        parts.append(
            Part(
                "FSDP all-gather buffers",
                fsdp_buffer_bytes(shape, cb, lora is None),
                "root unit + 3 layers unsharded, 1 layer's gradients",
            )
        )

    held = unsynced_gradient_bytes(settings, trainable)
    if held:
        parts.append(
            Part(
                "unsynced gradients",
                held,
                f"FSDP2, {settings.accumulate_grad_batches} micro-batches per sync: all "
                "trainable, float32, unsharded (model.fsdp_sync_every_micro_batch true: none)",
            )
        )
    full, checkpointed, one_layer = activation_bytes(settings, shape, batch)
    act = checkpointed if settings.gradient_checkpointing else full
    ckpt = "with" if settings.gradient_checkpointing else "without"
    parts.append(
        Part(
            "activations",
            act,
            f"{ckpt} checkpointing; {2 * batch} x "
            f"{settings.max_length} tokens, {settings.attn_implementation}",
        )
    )
    saved, block = logits_bytes(settings, shape, batch)
    parts.append(Part("scored hidden states", saved, "kept for the log-prob backward"))
    parts.append(reference_part(settings, reference_shape or shape, batch, host))
    parts.append(
        Part(
            "log-prob logits block",
            block,
            f"chunk {settings.logp_chunk_size} x vocab {shape.vocab_size} float32, head gradient "
            f"in {settings.compute_dtype}",
            transient=True,
        )
    )
    layer_backward = backward_bytes(settings, shape, batch)
    if settings.gradient_checkpointing:
        layer_backward += one_layer
    parts.append(
        Part(
            "layer backward",
            layer_backward,
            "gradients through one layer"
            + (" + its recomputed activations" if settings.gradient_checkpointing else ""),
            transient=True,
        )
    )
    if settings.needs_reference and settings.live_reference:
        parts.append(
            Part(
                "reference forward",
                forward_bytes(settings, reference_shape or shape, batch),
                "one no-grad layer or log-prob block",
                transient=True,
            )
        )
    return Estimate(settings, shape, batch, tuple(parts), tuple(host), full, checkpointed)


def _weights_detail(shape: ModelShape, lora: LoraSpec | None, what: str) -> str:
    count = (
        f"{shape.num_params() / 1e9:.2f}B"
        if shape.num_params() > 1e8
        else (f"{shape.num_params() / 1e6:.1f}M")
    )
    if lora is None:
        return f"{count} params, {what}"
    return f"{count} frozen + {lora.params(shape) / 1e6:.1f}M adapters (r={lora.r}), {what}"


def tokens(settings: RunSettings, batch: int) -> tuple[int, int]:
    """``(tokens, scored tokens)`` of one micro-batch: 2 sequences per pair at max length."""
    sequences = 2 * batch
    return sequences * settings.max_length, sequences * (settings.max_length - 1)


def activation_bytes(
    settings: RunSettings, shape: ModelShape, batch: int
) -> tuple[float, float, float]:
    """Activations held through the backward pass of ``batch`` pairs: ``(without
    checkpointing, with checkpointing, one layer's)``; with checkpointing the layer being
    recomputed adds its own (counted with the layer's backward)."""
    n, _ = tokens(settings, batch)
    kernel = attention_kernel(settings.attn_implementation)
    # A packed row without flash-attention attends over all packed tokens through an [N, N] mask.
    keys = (
        n
        if settings.packing and not settings.attn_implementation.startswith("flash")
        else (settings.max_length)
    )
    dropout_mask = 1 if settings.device_type == "cuda" else 4
    lora = settings.lora
    per_layer = layer_activation_bytes(
        shape, keys, settings.compute_bytes, kernel, lora, keys, dropout_mask
    )
    final = n * final_norm_bytes(shape, settings.compute_bytes, frozen=lora is not None)
    layers = shape.num_layers
    one_layer = n * per_layer + layer_constant_bytes(shape, lora)
    full = layers * one_layer + final
    checkpointed = layers * n * checkpointed_layer_bytes(shape, settings.compute_bytes) + final
    return full, checkpointed, one_layer


def logits_bytes(settings: RunSettings, shape: ModelShape, batch: int) -> tuple[float, float]:
    """``(saved, transient)`` of the chunked log-prob pass: the hidden states of the scored
    tokens kept for the backward, and the temporaries at their peak (forward or backward)."""
    _, scored = tokens(settings, batch)
    cb, vocab, h = settings.compute_bytes, shape.vocab_size, shape.hidden_size
    chunk = min(settings.logp_chunk_size, scored)
    block = chunk * vocab  # values of one forward chunk or one backward vocabulary slice
    low = cb if cb < 4 else 0  # a block's logit gradients rounded to the GEMM operand dtype
    saved = scored * h * cb  # hidden states of the scored tokens, kept for the backward
    forward = block * (4 + 4)  # float32 logits out of the GEMM, logsumexp's temporary
    # The backward writes the head's weight gradient slice by slice in the weight's dtype (no
    # float32 [vocab, hidden] accumulator) and sums the hidden states' gradient in float32.
    head_grad = vocab * h * cb if settings.lora is None else 0
    backward = head_grad + scored * h * 4 + block * (4 + low)
    convert = head_grad + scored * h * (4 + cb)  # the hidden states' gradient cast back
    return saved, max(forward, backward, convert)


def unsynced_gradient_bytes(settings: RunSettings, trainable: int) -> float:
    """Bytes FSDP2 holds between gradient syncs: with several micro-batches per optimizer step
    and one reduce-scatter per step, each unit keeps its unsharded gradients in its reduce
    dtype (float32) until the micro-batch that syncs; 0 when it syncs every micro-batch."""
    sh = settings.sharding
    syncs_once = sh.fsdp and "FSDP2" in sh.name and not settings.fsdp_sync_every_micro_batch
    return trainable * 4.0 if syncs_once and settings.accumulate_grad_batches > 1 else 0.0


def fsdp_buffer_bytes(shape: ModelShape, compute_bytes: int, trains_base: bool) -> float:
    root = shape.head_params() + shape.hidden_size
    if shape.tied_embeddings:
        root += shape.embedding_params()
    layer = shape.layer_params()
    gathered = (root + 3 * layer) * compute_bytes
    return gathered + (layer * (compute_bytes + 4) if trains_base else 0)


def reference_part(settings: RunSettings, shape: ModelShape, batch: int, host: list) -> Part:
    same = settings.reference_model in (None, settings.model)
    if not settings.needs_reference:
        return Part("reference", 0.0, "none: the loss is reference-free")
    if not settings.live_reference:
        return Part("reference", 2 * batch * settings.max_length * 4, "cached log-probs")
    if settings.lora is not None and same:
        return Part("reference", 0.0, "the policy with adapters off (no second copy)")
    sh = settings.sharding
    weights = shape.num_params() * settings.param_bytes / sh.params
    if sh.cpu_offload:
        host.append(Part("reference weights", weights, "offloaded"))
        weights = 0.0
    if sh.fsdp:
        weights += fsdp_buffer_bytes(shape, settings.compute_bytes, trains_base=False)
    return Part("reference", weights, f"live model, {settings.param_dtype}, / {sh.params}")


def backward_bytes(settings: RunSettings, shape: ModelShape, batch: int) -> float:
    """Gradients of one layer's activations in flight, plus its largest weight gradient."""
    n, _ = tokens(settings, batch)
    cb, h, i = settings.compute_bytes, shape.hidden_size, shape.intermediate_size
    largest = max(a * b for a, b in shape.linear_dims().values())
    return n * (2 * h + 2 * i) * cb + (largest * 4 if settings.lora is None else 0)


def forward_bytes(settings: RunSettings, shape: ModelShape, batch: int) -> float:
    """Working set of a no-grad forward (the live reference's), beside the policy's held
    activations: one layer's intermediates with the residual stream, or its log-prob block.

    Attention: residual, normed input, q and k before and after the rotary embedding, v, the
    repeated k/v, the output; sdpa with padding adds the boolean mask and its float copy.
    MLP: residual, activation, up projection, their product.
    """
    n, scored = tokens(settings, batch)
    cb, h, i = settings.compute_bytes, shape.hidden_size, shape.intermediate_size
    kernel = attention_kernel(settings.attn_implementation)
    q = shape.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    attention = n * cb * (2 * h + 2 * q + 3 * kv + (2 * q if kernel.repeats_kv else 0))
    if kernel.saves_probs:
        attention += n * shape.num_heads * settings.max_length * 4
    if kernel.float_mask:
        attention += n * settings.max_length * (cb + 1)
    mlp = n * cb * (h + 3 * i)
    chunk = min(settings.logp_chunk_size, scored)
    low = cb if cb < 4 else 0
    logits = (n + scored) * h * cb + chunk * shape.vocab_size * (8 + low)
    return max(attention, mlp, logits)


def max_micro_batch(
    settings: RunSettings,
    shape: ModelShape,
    budget: float,
    reference_shape: ModelShape | None = None,
) -> int:
    """The largest micro-batch (pairs) whose peak fits ``budget`` bytes; 0 when none does."""

    def peak(batch: int) -> float:
        return estimate(settings, shape, reference_shape, batch).peak

    if peak(1) > budget:
        return 0
    low, high = 1, 2
    while high <= MAX_SEARCH and peak(high) <= budget:
        low, high = high, high * 2
    high = min(high, MAX_SEARCH + 1)
    while high - low > 1:  # peak(low) fits, peak(high) does not (or is past the search)
        mid = (low + high) // 2
        low, high = (mid, high) if peak(mid) <= budget else (low, mid)
    return low
