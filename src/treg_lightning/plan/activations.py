"""Bytes a decoder layer keeps for the backward pass, per token, derived from its shapes.

Notation: ``b`` bytes of the compute dtype (4 float32, 2 bf16), ``h`` hidden size, ``i``
intermediate size, ``H`` query heads, ``q = H * head_dim``, ``k = kv_heads * head_dim`` (``= q``
when the kernel repeats keys/values for grouped-query attention), ``s`` keys per query (the
sequence length; the packed length for a packed row without flash-attention). Per token, per
decoder layer, full fine-tuning:

Llama / Mistral / Qwen2 (two RMSNorms, SiLU-gated MLP)::

    norms      2 * (4h + 4 + 2bh)   float32 copy of the input, rsqrt, normalized x, weight * x
    attention  b(q + 2k + q)        q, k, v and the attention output the kernel saves
               + 4H                 float32 log-sum-exp (flash / sdpa kernels)
               + b s                sdpa with a padding mask: the float mask, per layer
               eager instead:       + 4Hs float32 softmax (+ bHs its cast when b < 4), no lse
    mlp        4bi                  gate out, its activation, up out, their product

Gemma-2 (four RMSNorms computed in float32, attention-logit soft-capping)::

    norms      4 * (8h + 4) + 2bh   float32 input and normalized x of each norm, rsqrt; the
                                    outputs of the two norms that feed projections
    attention  b(q + 2k + q)        + eager: (b + 4)Hs tanh and float32 softmax (+ bHs cast)
    mlp        4bi

(Gemma-1: the Gemma norms, two of them.) With a frozen base and LoRA adapters (PEFT) a frozen
projection saves nothing of its input and a frozen norm saves only ``4h + 4``; each adapter
saves its input once per distinct input tensor when the adapter dtype equals the compute dtype
and dropout is 0, else its own cast/dropped copy (``in * a`` with ``a`` the adapter dtype's
bytes, plus the dropout mask: 1 byte on CUDA, ``a`` bytes on CPU), and ``r * a`` for its
rank-``r`` activation; the MLP then saves ``3bi`` (+ ``bi`` when ``down_proj`` has an adapter
reading the shared product). DoRA adds ``out * (b + a)`` per adapter and token and one
``out x in`` product per adapter and layer (approximate: within 10 % of measured). Gemma norms
also keep ``1 + weight`` in float32, ``4h`` per norm and layer whatever the tokens.

These counts equal the bytes of the tensors autograd saves, measured with
``torch.autograd.graph.saved_tensors_hooks`` on tiny models (tests/plan/test_plan.py), for float32
and bf16, sdpa and eager. With activation checkpointing each layer keeps only its input,
``bh`` per token, and one layer at a time is recomputed in the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from treg_lightning.plan.shapes import ModelShape

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Linear layers of a decoder layer that read the same input tensor.
_INPUT_GROUPS = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "mlp_act",
}


@dataclass(frozen=True)
class AttentionKernel:
    """What an attention implementation keeps for the backward pass.

    Attributes:
        saves_lse: one float32 log-sum-exp per head and token (flash and sdpa kernels).
        repeats_kv: keys/values are expanded to every query head before the kernel.
        float_mask: a float mask of the keys is kept per layer (sdpa with padding).
        saves_probs: the ``[heads, keys]`` softmax probabilities are kept (eager).
    """

    saves_lse: bool
    repeats_kv: bool
    float_mask: bool
    saves_probs: bool


_FLASH = AttentionKernel(saves_lse=True, repeats_kv=False, float_mask=False, saves_probs=False)
KERNELS = {
    "flash_attention_2": _FLASH,
    "flash_attention_3": _FLASH,
    "sdpa": AttentionKernel(saves_lse=True, repeats_kv=True, float_mask=True, saves_probs=False),
    "eager": AttentionKernel(saves_lse=False, repeats_kv=True, float_mask=False, saves_probs=True),
}


def attention_kernel(name: str) -> AttentionKernel:
    """The kernel model of ``attn_implementation`` ``name`` (sdpa's for kernels not listed)."""
    return KERNELS.get(name, KERNELS["sdpa"])


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA settings memory depends on (from a ``peft.LoraConfig``).

    Attributes:
        r: adapter rank.
        dropout: ``lora_dropout``.
        target_modules: projection names, or ``"all-linear"`` (every projection of the layers).
        use_dora: DoRA adapters (a magnitude vector per output feature, more activations).
        adapter_bytes: bytes per adapter weight (4: PEFT keeps adapters in float32).
    """

    r: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = "all-linear"
    use_dora: bool = False
    adapter_bytes: int = 4

    def targets(self) -> tuple[str, ...]:
        if isinstance(self.target_modules, str):
            names = ALL_LINEAR if self.target_modules == "all-linear" else (self.target_modules,)
        else:
            names = tuple(self.target_modules)
        return tuple(name for name in ALL_LINEAR if name in names)

    def params(self, shape: ModelShape) -> int:
        """Adapter parameters of the whole model."""
        dims = shape.linear_dims()
        per_layer = sum(
            self.r * (dims[n][0] + dims[n][1]) + (dims[n][1] if self.use_dora else 0)
            for n in self.targets()
        )
        return shape.num_layers * per_layer


def _norm_bytes(shape: ModelShape, b: int, frozen: bool) -> int:
    """Per token: what the layer's norms save (without outputs read by adapters)."""
    h = shape.hidden_size
    if shape.model_type in ("gemma", "gemma2"):
        if frozen:
            return shape.norms_per_layer * (4 * h + 4)
        return shape.norms_per_layer * (8 * h + 4) + 2 * b * h
    return 2 * (4 * h + 4 + (0 if frozen else 2 * b * h))


def _attention_bytes(
    shape: ModelShape, b: int, kernel: AttentionKernel, keys: int, mask_keys: int, output: bool
) -> int:
    """Per token. ``output``: whether the attention output is kept (flash/sdpa always keep it;
    under eager only a trained o_proj, or its adapter reading it as is, keeps the copy)."""
    q = shape.num_heads * shape.head_dim
    k = q if kernel.repeats_kv else shape.num_kv_heads * shape.head_dim
    keeps_output = output or not kernel.saves_probs
    total = b * (q + 2 * k + (q if keeps_output else 0))
    if kernel.saves_lse:
        total += 4 * shape.num_heads
    if kernel.float_mask:
        total += b * mask_keys
    if kernel.saves_probs:
        probs = 4 + (b if b < 4 else 0)
        if shape.attn_logit_softcapping:
            probs += b  # the tanh of the capped scores
        total += shape.num_heads * keys * probs
    return total


def _lora_bytes(shape: ModelShape, b: int, lora: LoraSpec, dropout_mask_bytes: int) -> int:
    """Per token: what the adapters of one layer save (their inputs, ranks, DoRA terms).

    Adapters reading their input as is share it: the outputs of the norms are counted here
    once per tensor; the attention output and the MLP product by the attention and MLP terms.
    """
    dims = shape.linear_dims()
    a = lora.adapter_bytes
    total, counted = 0, set()
    for name in lora.targets():
        fan_in, fan_out = dims[name]
        group = _INPUT_GROUPS[name]
        if lora.dropout > 0:
            total += fan_in * (a + dropout_mask_bytes)  # the dropped copy and its mask
        elif a != b:
            total += fan_in * a  # the input cast to the adapter dtype
        elif group in ("attn_in", "mlp_in") and group not in counted:
            counted.add(group)
            total += fan_in * b
        total += lora.r * a
        if lora.use_dora:
            total += fan_out * (b + a)
    return total


def layer_activation_bytes(
    shape: ModelShape,
    seq_len: int,
    compute_bytes: int,
    kernel: AttentionKernel,
    lora: LoraSpec | None = None,
    mask_keys: int | None = None,
    dropout_mask_bytes: int = 1,
) -> float:
    """Bytes one decoder layer saves for the backward pass, per token (module docstring).

    Args:
        shape: the model.
        seq_len: keys per query (padded sequence length).
        compute_bytes: bytes of the compute dtype.
        kernel: the attention kernel's model (:func:`attention_kernel`).
        lora: the adapters when the base is frozen, else None (full fine-tuning).
        mask_keys: keys per row of the sdpa float mask (default ``seq_len``; the packed length
            for a packed row).
        dropout_mask_bytes: bytes per element of a LoRA dropout mask (1 on CUDA, the adapter
            dtype's on CPU).
    """
    b, i = compute_bytes, shape.intermediate_size
    mask_keys = mask_keys or seq_len
    if lora is None:
        total = _norm_bytes(shape, b, frozen=False)
        return total + _attention_bytes(shape, b, kernel, seq_len, mask_keys, True) + 4 * b * i
    targets = lora.targets()
    shares = lora.adapter_bytes == b and lora.dropout == 0  # adapters read the tensors as is
    total = _norm_bytes(shape, b, frozen=True)
    total += _attention_bytes(
        shape, b, kernel, seq_len, mask_keys, output=shares and "o_proj" in targets
    )
    total += (4 if shares and "down_proj" in targets else 3) * b * i
    return total + _lora_bytes(shape, b, lora, dropout_mask_bytes)


def layer_constant_bytes(shape: ModelShape, lora: LoraSpec | None = None) -> int:
    """Per layer, independent of the tokens: the float32 ``1 + weight`` of each Gemma norm,
    and the ``out x in`` product each DoRA adapter keeps."""
    total = 0
    if shape.model_type in ("gemma", "gemma2"):
        total += shape.norms_per_layer * shape.hidden_size * 4
    if lora is not None and lora.use_dora:
        dims = shape.linear_dims()
        total += sum(dims[n][0] * dims[n][1] for n in lora.targets()) * lora.adapter_bytes
    return total


def final_norm_bytes(shape: ModelShape, compute_bytes: int, frozen: bool) -> int:
    """Per token: the final norm's saved tensors (its output is read through a gather)."""
    h = shape.hidden_size
    if frozen:
        return 4 * h + 4
    if shape.model_type in ("gemma", "gemma2"):
        return 8 * h + 4
    return 4 * h + 4 + compute_bytes * h


def checkpointed_layer_bytes(shape: ModelShape, compute_bytes: int) -> int:
    """Per token and layer under activation checkpointing: the layer's input alone."""
    return compute_bytes * shape.hidden_size
