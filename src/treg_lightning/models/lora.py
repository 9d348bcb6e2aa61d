"""LoRA / DoRA adapters through PEFT: the reference is the same model with its adapters off.

A policy trained with adapters keeps its base weights frozen, so the reference model of DPO /
IPO is the policy itself with the adapters disabled: no second copy of the weights.

- :func:`apply_lora`: wrap a loaded causal LM with the adapters of a ``peft.LoraConfig``
  (rank ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``; DoRA with ``use_dora``);
- :func:`adapters_disabled`: context in which the wrapped model computes the base model's
  outputs (eval mode inside, the previous modes restored after);
- :func:`~treg_lightning.models.unwrap.decoder_and_head`: what the one per-token forward
  (:func:`~treg_lightning.forward.logprobs.causal_lm_token_logps`) uses to run a plain or a
  PEFT-wrapped model; on a ``PeftModel``, ``getattr(model, model.base_model_prefix)`` is the
  whole causal LM (PEFT forwards attribute lookups to it), not its decoder, so the decoder is
  reached through
  ``get_base_model()``;
- :func:`save_adapter` (adapter alone, ``PeftModel.from_pretrained`` loads it back) and
  :func:`~treg_lightning.models.save.save_merged` (a plain Hugging Face folder with the adapters
  merged into the weights; loads in transformers without PEFT);
- QLoRA (4-bit base weights through bitsandbytes): :func:`load_quantized_causal_lm`, CUDA only;
  :func:`check_qlora_available` refuses it elsewhere with what to do instead.

Needs the ``peft`` package: ``pip install 'treg-lightning[lora]'`` (``[qlora]`` adds
bitsandbytes).
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from treg_lightning.errors import ConfigError, UserError
from treg_lightning.models.unwrap import is_peft_model


class QLoRAUnavailable(UserError, RuntimeError):
    """QLoRA was asked for where bitsandbytes or a CUDA device is missing."""


def require_peft():
    """Import ``peft`` or say how to install it."""
    if importlib.util.find_spec("peft") is None:
        raise ImportError(
            "LoRA adapters need the `peft` package: pip install 'treg-lightning[lora]' "
            "(or pip install peft)."
        )
    import peft

    return peft


def apply_lora(model: nn.Module, config: Any, autocast_adapter_dtype: bool = True) -> nn.Module:
    """Wrap the causal LM ``model`` with the adapters of ``config``; the base weights freeze.

    Args:
        model: a loaded Hugging Face causal LM (optionally 4-bit, see
            :func:`load_quantized_causal_lm`).
        config: a ``peft.LoraConfig``; ``task_type`` defaults to ``"CAUSAL_LM"``. Set
            ``use_dora=True`` for DoRA. The output projection (``lm_head``) cannot carry an
            adapter: the chunked log-probs read its weight directly.
        autocast_adapter_dtype: keep adapter weights in float32 when the base is bf16/fp16
            (PEFT's default; small updates survive).

    Returns:
        The ``peft.PeftModel``; only the adapter parameters require gradients.
    """
    peft = require_peft()
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(
            f"apply_lora takes a peft.LoraConfig (class_path: peft.LoraConfig), got "
            f"{type(config).__name__}: other PEFT methods are not supported here (prompt "
            "tuning would also shift the token positions the log-probs are aligned with)."
        )
    # A copy: PEFT writes into the config it is given (base model name, ...), and the same
    # config object builds the policy, its export and the start-up check's meta skeleton.
    config = copy.deepcopy(config)
    if config.task_type is None:
        config.task_type = "CAUSAL_LM"
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_kbit_model(model)
    try:
        wrapped = peft.get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter_dtype)
    except ValueError as err:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise ConfigError(
            f"peft.LoraConfig(target_modules={config.target_modules!r}) does not fit "
            f"{type(model).__name__}: {err} Its linear layers are named {names} (or use "
            "target_modules: all-linear)."
        ) from err
    _check_head_untouched(wrapped)
    return wrapped


def prepare_kbit_model(model: nn.Module) -> nn.Module:
    """peft's ``prepare_model_for_kbit_training`` (base frozen, normalization layers in float32
    for a stable k-bit training), keeping every other weight in the dtype it was loaded in.

    peft upcasts every non-quantized float16 / bfloat16 weight to float32, the embedding and the
    output projection (``lm_head``) included: the chunked log-probs would then run the head's
    ``[tokens, vocab]`` matmuls in float32, forward and backward, and the embedding would take
    twice its memory. Those weights go back to their load dtype; the normalization layers stay
    float32 as peft wants. Because those norms hand float32 hidden states on, the decoder's
    output is cast to the head's dtype (a forward hook), where the head reads it: the chunked
    log-probs and transformers' own ``lm_head(hidden)`` both get operands of one dtype.
    PreferenceModule enables gradient checkpointing itself when asked to.
    """
    peft = require_peft()
    loaded = {name: param.dtype for name, param in model.named_parameters()}
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for prefix, module in model.named_modules():
        if _is_norm(module):
            continue
        for name, param in module.named_parameters(recurse=False):
            dtype = loaded[f"{prefix}.{name}" if prefix else name]
            if param.dtype != dtype:
                param.data = param.data.to(dtype)
    _decoder_output_in_head_dtype(model)
    return model


def _is_norm(module: nn.Module) -> bool:
    # LayerNorm, LlamaRMSNorm, Gemma2RMSNorm, ...: the layers peft keeps in float32.
    return "norm" in type(module).__name__.lower()


def _decoder_output_in_head_dtype(model: nn.Module) -> None:
    decoder = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()

    def cast(module, args, output):
        dtype = head.weight.dtype
        if isinstance(output, tuple):
            return (output[0].to(dtype), *output[1:])
        output.last_hidden_state = output.last_hidden_state.to(dtype)
        return output

    decoder.register_forward_hook(cast)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def _check_head_untouched(model: nn.Module) -> None:
    """Refuse an adapter or a trained copy on the output projection (at start-up: the check of
    ``model.peft`` builds the wrapped model on the meta device).

    The chunked log-probs read the head's ``weight`` directly, never calling the head, so an
    adapter on it (``target_modules``) would take no part in training. A trained copy
    (``modules_to_save``) is not an adapter: vocab x hidden weights with their gradients and
    optimizer states (``treg plan`` counts adapters only), and where the head is tied to the
    input embedding (SmolLM2, Gemma) FSDP2 stops on the shared weight after the annotate pass.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    head = base.get_output_embeddings()
    if not isinstance(head, (BaseTunerLayer, ModulesToSaveWrapper)):
        return
    name = next((n for n, m in base.named_modules() if m is head), "lm_head").rsplit(".", 1)[-1]
    if isinstance(head, ModulesToSaveWrapper):
        raise ConfigError(
            f"model.peft.modules_to_save names the output projection ({name}), which is not "
            f"supported with LoRA: it would train a full copy of {name} (vocab x hidden weights, "
            "with their gradients and optimizer states: not an adapter, and not counted by treg "
            "plan), and where it is tied to the input embedding (SmolLM2, Gemma, ...) FSDP2 "
            f"cannot shard the two apart. Leave {name} out of modules_to_save (the adapters of "
            "the decoder layers train the policy); to train the output projection too, train "
            "without LoRA (model.peft: null)."
        )
    raise ConfigError(
        f"model.peft.target_modules puts an adapter on the output projection ({name}), which is "
        f"not supported: the log-probs are computed in chunks from {name}.weight, the frozen "
        f"base weight, so that adapter would take no part in training. Leave {name} out of "
        "target_modules (all-linear leaves it out by itself)."
    )


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model: adapters off and every submodule in eval mode.

    The reference log-probs of a LoRA policy: equal to the base model's (no second copy of
    the weights). Wrap the forward in ``torch.no_grad()`` as for any frozen reference. On exit
    the adapters are on again and each submodule gets back its previous train/eval mode.

    Only the adapter layers' "disabled" flag is switched, never ``requires_grad``: PEFT's own
    ``disable_adapter()`` also freezes and unfreezes the adapter weights, and under FSDP2 that
    lands on whichever tensor a unit holds at the moment (the sharded parameter, or the
    unsharded one of a unit not resharded after its forward, such as the last decoder layer), so
    that layer's adapters stayed frozen for good.
    """
    if not is_peft_model(model):
        raise TypeError(
            "adapters_disabled needs a PEFT-wrapped model (apply_lora), got "
            f"{type(model).__name__}."
        )
    layers = _adapter_layers(model)
    modes = [(module, module.training) for module in model.modules()]
    flags = [(layer, layer._disable_adapters) for layer in layers]
    model.eval()
    try:
        for layer in layers:
            layer._disable_adapters = True
        yield model
    finally:
        for layer, flag in flags:
            layer._disable_adapters = flag
        for module, training in modes:
            module.training = training


def _adapter_layers(model: nn.Module) -> list[nn.Module]:
    """The modules whose forward PEFT switches between base and adapted (the flag's owners)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]
    for layer in layers:
        if not hasattr(layer, "_disable_adapters"):  # a PEFT release that renamed the flag
            raise RuntimeError(
                f"{type(layer).__name__} of this peft version has no `_disable_adapters` flag; "
                "treg_lightning.models.lora.adapters_disabled switches it (tested with peft 0.21)."
            )
    return layers


def save_adapter(model: nn.Module, output_dir: str | Path, tokenizer=None) -> Path:
    """Write the adapter alone (``adapter_config.json`` + safetensors) into ``output_dir``.

    ``PeftModel.from_pretrained(base_model, output_dir)`` loads it back onto the base model.
    """
    if not is_peft_model(model):
        raise TypeError(f"save_adapter needs a PEFT-wrapped model, got {type(model).__name__}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return output_dir


def merge_adapters(model: nn.Module, in_place: bool = False) -> nn.Module:
    """A plain transformers model whose weights are base + adapter (LoRA or DoRA merged).

    Args:
        model: the PEFT-wrapped model.
        in_place: merge into ``model`` itself (it is no longer a PEFT model afterwards); the
            default merges a deep copy, leaving ``model`` training-ready (costs one copy).
    """
    if not is_peft_model(model):
        raise TypeError(f"merge_adapters needs a PEFT-wrapped model, got {type(model).__name__}.")
    target = model if in_place else copy.deepcopy(model)
    return target.merge_and_unload(safe_merge=True)


def check_qlora_available(device_type: str | None = None) -> None:
    """Refuse QLoRA where it cannot run: it needs bitsandbytes and a CUDA device.

    Args:
        device_type: the device the model will train on (default: CUDA when available).
    """
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type != "cuda" or not torch.cuda.is_available():
        raise QLoRAUnavailable(
            f"QLoRA (a 4-bit base model through bitsandbytes) needs a CUDA device; this run is "
            f"on {device_type!r}. Train plain LoRA instead (drop the quantization setting, keep "
            "the LoRA config), or run on a CUDA machine."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QLoRAUnavailable(
            "QLoRA needs the bitsandbytes package: pip install 'treg-lightning[qlora]' (on a "
            "CUDA machine), or drop the quantization setting to train plain LoRA."
        )


def qlora_config(compute_dtype: str = "bfloat16", double_quant: bool = True):
    """The usual QLoRA quantization: NF4 weights, ``compute_dtype`` matmuls, nested quantization
    of the scales (a ``transformers.BitsAndBytesConfig``)."""
    from transformers import BitsAndBytesConfig

    from treg_lightning.models.loading import parse_dtype

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=parse_dtype(compute_dtype),
        bnb_4bit_use_double_quant=double_quant,
    )


def load_quantized_causal_lm(
    name_or_path: str,
    quantization_config=None,
    torch_dtype: str = "bfloat16",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    device_type: str | None = None,
) -> nn.Module:
    """Load a causal LM with 4-bit base weights for QLoRA (then :func:`apply_lora`).

    Refused before anything loads unless a CUDA device and bitsandbytes are present.

    Args:
        name_or_path: hub id or local folder (``"smollm2"`` resolves to its folder).
        quantization_config: a ``transformers.BitsAndBytesConfig``; None = :func:`qlora_config`.
        torch_dtype: dtype of the weights that stay unquantized (norms, embeddings).
        attn_implementation: as :func:`treg_lightning.models.loading.load_causal_lm`.
        trust_remote_code: allow model code from the hub.
        device_type: the device the model trains on (default: CUDA when available).
    """
    check_qlora_available(device_type)
    from transformers import AutoConfig, AutoModelForCausalLM

    from treg_lightning.models.loading import (
        choose_attn_implementation,
        parse_dtype,
        resolve_model_source,
    )

    source = resolve_model_source(name_or_path)
    if source.gguf_file is not None:
        raise ValueError(f"{name_or_path}: QLoRA loads safetensors weights, not GGUF files.")
    config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    # Attention computes in torch_dtype: transformers casts the float32 queries that the
    # float32 norms of a prepared k-bit model produce to the dtype it was loaded in.
    attn = choose_attn_implementation(attn_implementation, "cuda", config.model_type, torch_dtype)
    return AutoModelForCausalLM.from_pretrained(
        source.path,
        quantization_config=quantization_config or qlora_config(torch_dtype),
        dtype=parse_dtype(torch_dtype),
        attn_implementation=attn,
        trust_remote_code=trust_remote_code,
        device_map={"": torch.cuda.current_device()},
    )
