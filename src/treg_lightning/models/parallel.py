"""Sharding for Hugging Face causal LMs: FSDP2 (``fully_shard``) and an FSDP1 wrap policy.

FSDP2 is what :class:`~treg_lightning.module.PreferenceModule` applies in ``configure_model()``
under Lightning's ``ModelParallelStrategy``; the FSDP1 helper serves ``FSDPStrategy`` users
(``configs/strategy/fsdp1.yaml``). Both find the decoder-layer class from the model's
``_no_split_modules``, the list Hugging Face keeps for exactly this purpose.
"""

from __future__ import annotations

import torch
from torch import nn

from treg_lightning.errors import ConfigError


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The transformer block classes of ``model`` (e.g. ``{LlamaDecoderLayer}``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(
            f"Cannot find the decoder layers of {type(model).__name__}: its `_no_split_modules` "
            f"is {sorted(names) or 'empty'}. Shard it yourself by overriding "
            "PreferenceModule.configure_model()."
        )
    return classes


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    classes = tuple(decoder_layer_classes(model))
    return [m for m in model.modules() if isinstance(m, classes)]


def _wrap_with_activation_checkpointing(model: nn.Module) -> None:
    """Replace every decoder layer by a non-reentrant checkpoint wrapper, in place.

    The wrapper strips its ``_checkpoint_wrapped_module.`` prefix from state dicts, so
    checkpoints and exports keep the plain Hugging Face parameter names.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    classes = tuple(decoder_layer_classes(model))
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, classes):
                parent.register_module(name, checkpoint_wrapper(child))


def apply_fsdp2(
    model: nn.Module,
    device_mesh,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    activation_checkpointing: bool = True,
    cpu_offload: bool = False,
    root: nn.Module | None = None,
) -> nn.Module:
    """Shard ``model`` with FSDP2, in place, and return it.

    Units: each decoder layer, the input embedding (when it is not tied to the output
    projection), then the root. The output projection (``lm_head``) stays in the root unit on
    purpose: PreferenceModule reads ``lm_head.weight`` directly for the chunked log-probs
    (:func:`treg_lightning.forward.logprobs.token_logps_from_hidden`), which is only valid while its
    owning unit is unsharded, and the root is unsharded for the whole root forward. A tied
    embedding stays in the root for the same reason.

    Args:
        model: a Hugging Face causal LM (anything with ``_no_split_modules``).
        device_mesh: the mesh from Lightning's ``ModelParallelStrategy`` (``self.device_mesh``);
            its ``"data_parallel"`` dimension is used when present.
        param_dtype: dtype of the all-gathered parameters for compute (``torch.bfloat16`` on
            GPU); None keeps the stored dtype (float32 on CPU with gloo).
        reduce_dtype: dtype of the gradient reduce-scatter; float32 keeps small updates exact.
        activation_checkpointing: recompute each decoder layer in the backward pass.
        cpu_offload: keep sharded parameters, gradients and optimizer states on CPU.
        root: the module to shard last as the root unit (default ``model``); pass the wrapper
            whose ``forward`` runs the model when the model's own forward is not called.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = _data_parallel_mesh(device_mesh)
    if activation_checkpointing:
        _wrap_with_activation_checkpointing(model)
    kwargs = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
    }
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        # The last layer's parameters are needed again right away by the backward pass.
        fully_shard(layer, reshard_after_forward=index < len(layers) - 1, **kwargs)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is not None and not _is_tied(model):
        fully_shard(embedding, **kwargs)
    fully_shard(root if root is not None else model, **kwargs)
    return model


def _data_parallel_mesh(device_mesh):
    names = getattr(device_mesh, "mesh_dim_names", None) or ()
    return device_mesh["data_parallel"] if "data_parallel" in names else device_mesh


def _is_tied(model: nn.Module) -> bool:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return output is not None and inputs is not None and output.weight is inputs.weight


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 has been applied to ``model`` or any of its submodules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Turn the gradient reduce-scatter of every FSDP2 unit of ``model`` on or off.

    FSDP2 reduce-scatters each unit's gradients after every backward pass; under gradient
    accumulation that is once per micro-batch, while only the sum at the optimizer step is
    needed. Off (``sync=False``) for the micro-batches that accumulate, FSDP2 keeps the unsharded
    gradients (in its ``reduce_dtype``, float32) and reduce-scatters their sum in the backward of
    the micro-batch that syncs: one collective per unit per optimizer step, at the memory of one
    unsharded float32 copy of the trainable parameters' gradients meanwhile (Lightning's own
    ``block_backward_sync`` does the same for DDP only). Nothing for an unsharded ``model``.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(sync, recurse=False)


def fsdp1_root(module: nn.Module) -> nn.Module | None:
    """The FSDP1 unit wrapping the LightningModule ``module`` whole under Lightning's
    ``FSDPStrategy`` (it holds every parameter outside the wrapped decoder layers, the policy's
    embedding and head included); None under any other strategy."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    strategy = getattr(getattr(module, "_trainer", None), "strategy", None)
    root = getattr(strategy, "model", None)
    return root if isinstance(root, FullyShardedDataParallel) else None


def fsdp1_policy_state(root: nn.Module) -> dict:
    """The whole ``policy`` weights of an FSDP1 ``root`` (:func:`fsdp1_root`), on CPU, by their
    names in the policy; a collective (every rank calls it). Gathered from the root: the
    policy's own state dict would read the root's parameters as this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Offloaded to CPU, on rank 0 only (the others get nothing): a whole 8B model per GPU would
    # not fit. Parameters already on CPU are gathered as they are (torch's offload of CPU
    # tensors crashes rank 0).
    offload = root.compute_device.type != "cpu"
    options = StateDictOptions(full_state_dict=True, cpu_offload=offload)
    state = get_model_state_dict(root, options=options)
    prefix = "policy."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


DEFAULT_DECODER_LAYERS = (
    "LlamaDecoderLayer",
    "Gemma2DecoderLayer",
    "MistralDecoderLayer",
    "Qwen2DecoderLayer",
)


class DecoderLayerWrapPolicy:
    """FSDP1 ``auto_wrap_policy``: one FSDP unit per transformer decoder layer.

    For ``lightning.pytorch.strategies.FSDPStrategy(auto_wrap_policy=...)`` (see
    ``configs/strategy/fsdp1.yaml``). Classes are matched by name, so no model code is imported
    to build the policy.

    Args:
        layer_class_names: names of the decoder-layer classes; the default covers Llama,
            Gemma-2, Mistral and Qwen2.
    """

    def __init__(self, layer_class_names: list[str] | None = None) -> None:
        self.layer_class_names = set(layer_class_names or DEFAULT_DECODER_LAYERS)

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        # The legacy FSDP1 callable-policy protocol: always recurse, wrap matching layers.
        return True if recurse else type(module).__name__ in self.layer_class_names


def prepare_for_training(
    lm: nn.Module,
    mesh=None,
    param_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
    compile_options: dict | None = None,
) -> nn.Module:
    """Shard ``lm`` with FSDP2 over ``mesh`` (None: one process, nothing to shard), keeping its
    bound ``token_logps`` forward an FSDP forward; then ``torch.compile`` each decoder layer when
    ``compile_options`` is given (after sharding, as FSDP2 expects)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    if mesh is not None:
        apply_fsdp2(
            lm,
            mesh,
            param_dtype=param_dtype,
            activation_checkpointing=activation_checkpointing,
            cpu_offload=cpu_offload,
        )
        register_fsdp_forward_method(lm, "token_logps")
    if compile_options is not None:
        for layer in decoder_layers(lm):
            layer.compile(**compile_options)
    return lm
