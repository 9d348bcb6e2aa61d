"""LoRA in a training run: what a :class:`~treg_lightning.module.PreferenceModule` with
``model.peft`` holds, checkpoints and exports (the adapters themselves:
:mod:`treg_lightning.models.lora`).

- :class:`QLoRA`: the ``model.quantization`` setting, a 4-bit base under the adapters (CUDA and
  bitsandbytes only; refused elsewhere at start-up, before any weights load);
- :func:`keep_adapters_only`: the module's state dict, so every checkpoint (single device, DDP,
  FSDP2 shards), holds the adapters and not the frozen base; on load the base weights come from
  the model just built from ``model.model``;
- :func:`adapter_shapes`: the adapter weights a checkpoint must hold, from the model's config on
  the meta device (the start-up check of ``--ckpt_path``);
- :func:`live_adapter_state` and :func:`export_adapters`: the merged model as a plain Hugging Face
  folder (base from ``model.model`` + adapters) or the adapter alone.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from treg_lightning.errors import CheckpointError, ConfigError
from treg_lightning.models.loading import parse_dtype
from treg_lightning.models.lora import (
    apply_lora,
    check_qlora_available,
    load_quantized_causal_lm,
    merge_adapters,
    qlora_config,
    require_peft,
    save_adapter,
)
from treg_lightning.models.save import save_pretrained
from treg_lightning.models.state_names import POLICY_PREFIX, WRAPPER_PREFIX

if importlib.util.find_spec("peft") is not None:
    from peft import LoraConfig
else:  # the `lora` extra is not installed: a config naming peft.LoraConfig says so

    class LoraConfig:  # type: ignore[no-redef]
        """LoRA adapters need the `peft` package: pip install 'treg-lightning[lora]'."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            require_peft()


class QLoRA:
    """Load the frozen base model in 4 bits (NF4 through bitsandbytes) under the LoRA adapters.

    CUDA only: on any other device the run is refused at start-up, before weights load. The
    merged export adds the adapters to the base in ``model.torch_dtype`` (not to the 4-bit
    weights they were trained against), as QLoRA merges usually do.

    Args:
        compute_dtype: dtype of the matmuls with the de-quantized weights.
        double_quant: quantize the quantization scales too (saves about 0.4 bits per weight).
    """

    def __init__(self, compute_dtype: str = "bfloat16", double_quant: bool = True) -> None:
        parse_dtype(compute_dtype)
        self.compute_dtype = compute_dtype
        self.double_quant = double_quant

    def check(self, device_type: str | None) -> None:
        """Refuse a device QLoRA cannot run on
        (:class:`~treg_lightning.models.lora.QLoRAUnavailable`)."""
        check_qlora_available(device_type)

    def load(
        self,
        name_or_path: str,
        torch_dtype: str = "bfloat16",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        device_type: str | None = None,
    ) -> nn.Module:
        """The causal LM with 4-bit weights (norms and embeddings stay in ``torch_dtype``)."""
        return load_quantized_causal_lm(
            name_or_path,
            qlora_config(self.compute_dtype, self.double_quant),
            torch_dtype=torch_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            device_type=device_type,
        )


ADALORA_REFUSED = (
    "model.peft is a peft.AdaLoraConfig: AdaLoRA is not supported. It reallocates its ranks in "
    "an update_and_allocate call after every optimizer step, which treg's training loop does not "
    "make (its ranks would never be allocated). Use class_path: peft.LoraConfig (a fixed rank r)."
)


def refuse_adalora(config: Any) -> None:
    """Refuse a parsed ``treg`` config (a jsonargparse namespace or a dict) whose ``peft``
    setting names ``peft.AdaLoraConfig`` (or a subclass), before the classes are built: its
    constructor would fail first, on a missing ``total_step``, in peft's words."""
    if importlib.util.find_spec("peft") is None:
        return
    from peft import AdaLoraConfig

    for class_path in _peft_class_paths(config.as_dict() if hasattr(config, "as_dict") else config):
        module, _, name = str(class_path).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            continue  # not a class this check can read: the parser reports it
        if isinstance(cls, type) and issubclass(cls, AdaLoraConfig):
            raise ConfigError(ADALORA_REFUSED)


def _peft_class_paths(value: Any, under_peft: bool = False):
    """The ``class_path`` values found under a ``peft`` key anywhere in ``value``."""
    if isinstance(value, dict):
        if under_peft and "class_path" in value:
            yield value["class_path"]
        for key, item in value.items():
            yield from _peft_class_paths(item, under_peft or key == "peft")
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _peft_class_paths(item, under_peft)


def check_adapter_settings(peft: Any, quantization: QLoRA | None) -> None:
    """At start-up: ``model.peft`` is a LoRA config, and a 4-bit base comes with adapters."""
    if peft is not None and not isinstance(peft, LoraConfig):
        raise ConfigError(
            f"model.peft must be a peft.LoraConfig (class_path: peft.LoraConfig), got "
            f"{type(peft).__name__}: other PEFT methods are not supported (prompt tuning would "
            "shift the token positions the log-probs are aligned with)."
        )
    if peft is not None:
        check_lora_values(peft)
    if quantization is not None and peft is None:
        raise ConfigError(
            "model.quantization loads the base model in 4 bits, which cannot be trained itself: "
            "add adapters (model.peft with class_path: peft.LoraConfig), or drop "
            "model.quantization."
        )


def check_lora_values(config: Any) -> None:
    """At start-up, before any model loads: the ``model.peft`` values peft would reject only
    once the model is loaded (``r``, ``rank_pattern``, ``lora_dropout``), and AdaLoRA.

    Raises:
        ConfigError: naming the setting, its value and the range.
    """
    from peft import AdaLoraConfig

    if isinstance(config, AdaLoraConfig):
        raise ConfigError(ADALORA_REFUSED)
    r = config.r
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(
            f"model.peft.r must be a positive integer (the adapters' rank, e.g. 8), got {r!r}."
        )
    for name, rank in (config.rank_pattern or {}).items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(
                f"model.peft.rank_pattern[{name!r}] must be a positive integer rank, got {rank!r}."
            )
    dropout = config.lora_dropout
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(
            f"model.peft.lora_dropout must be in [0, 1) (the share of the adapters' inputs "
            f"dropped, e.g. 0.05), got {dropout!r}."
        )


def check_lora_targets(module) -> None:
    """At start-up: ``model.peft.target_modules`` name layers of ``model.model``, checked on its
    config on the meta device (no weights read).

    Raises:
        ConfigError: a target matches no layer (the message lists the linear layers).
    """
    config = getattr(module, "peft", None)
    if config is None:
        return
    skeleton = peft_skeleton(module)  # peft refuses targets of which none matches
    targets = config.target_modules
    if targets is None or isinstance(targets, str):  # a regex or "all-linear": peft's to match
        return
    base = skeleton.get_base_model()
    names = [name for name, _ in base.named_modules()]
    unknown = sorted(t for t in targets if not any(n == t or n.endswith("." + t) for n in names))
    if unknown:
        linear = sorted({_layer_name(n) for n, m in base.named_modules() if _linear(n, m)})
        raise ConfigError(
            f"model.peft.target_modules names {unknown}, which {module.model_name} has no layer "
            f"of (peft would put no adapter there, without a word). Its linear layers are named "
            f"{linear} (or use target_modules: all-linear)."
        )


def _linear(name: str, module: nn.Module) -> bool:
    """A linear layer of the model itself, not one of the adapters peft added."""
    return isinstance(module, nn.Linear) and ".lora_" not in f".{name}"


def _layer_name(name: str) -> str:
    """``layers.0.self_attn.q_proj.base_layer`` (a layer peft wrapped) -> ``q_proj``."""
    return name.removesuffix(".base_layer").rsplit(".", 1)[-1]


def clean_name(name: str) -> str:
    """A parameter name as state dicts write it (no activation-checkpointing wrapper)."""
    return name.replace(WRAPPER_PREFIX, "")


def adapter_names(policy: nn.Module) -> set[str]:
    """The state-dict names of the trainable (adapter) weights of ``policy``."""
    return {clean_name(n) for n, p in policy.named_parameters() if p.requires_grad}


def keep_adapters_only(module: nn.Module) -> None:
    """Make ``module.state_dict()`` hold the policy's adapters, not its frozen base weights.

    Every checkpoint goes through the module's state dict (Lightning's ``.ckpt`` files, and the
    FSDP2 shards, which ``torch.distributed.checkpoint`` writes and reads by the same names), so
    a checkpoint is the size of the adapters (plus their optimizer state). On load the frozen
    weights are taken from the policy just built from ``model.model``: resuming needs that same
    base model. The policy's own ``state_dict()`` stays complete (export, tests).
    """
    if getattr(module, "_adapters_only_hooks", False):
        return
    module.register_state_dict_post_hook(_drop_frozen)
    module.register_load_state_dict_pre_hook(_fill_frozen)
    module._adapters_only_hooks = True


def _frozen_policy_keys(module: nn.Module, state_dict: dict, prefix: str) -> list[str]:
    keep = {prefix + POLICY_PREFIX + n for n in adapter_names(module.policy)}
    start = prefix + POLICY_PREFIX
    return [k for k in state_dict if k.startswith(start) and k not in keep]


def _drop_frozen(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    if module.policy is None:
        return
    for key in _frozen_policy_keys(module, state_dict, prefix):
        del state_dict[key]


def _fill_frozen(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    # Only frozen weights are filled in: a checkpoint lacking an adapter still fails strict loading.
    if module.policy is None:
        return
    adapters = adapter_names(module.policy)
    for name, value in module.policy.state_dict().items():
        if name not in adapters:
            state_dict.setdefault(prefix + POLICY_PREFIX + name, value)


def peft_skeleton(module) -> nn.Module:
    """The PEFT-wrapped model of ``module``'s settings on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from treg_lightning.models.loading import resolve_model_source

    source = resolve_model_source(module.model_name)
    trust = bool(module.trust_remote_code)
    if source.gguf_file is not None:
        config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
    else:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    return apply_lora(base, module.peft)


def adapter_shapes(module) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the adapter weights a checkpoint of ``module`` holds."""
    skeleton = peft_skeleton(module)
    return {
        clean_name(n): tuple(p.shape) for n, p in skeleton.named_parameters() if p.requires_grad
    }


def live_adapter_state(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of the live policy, whole; collective under FSDP2 (every rank).

    Only the adapters are gathered (``ignore_frozen_params``), never the sharded base.
    """
    from treg_lightning.models.parallel import is_sharded

    if is_sharded(policy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True
        )
        state = get_model_state_dict(policy, options=options)
        return {clean_name(k): v for k, v in state.items()}
    return {clean_name(n): p.detach() for n, p in policy.named_parameters() if p.requires_grad}


def load_adapters(model: nn.Module, state: dict[str, Any], assign: bool, where: str) -> None:
    names = adapter_names(model)
    missing = sorted(names - set(state))
    if missing:
        raise CheckpointError(
            f"{where} lacks {len(missing)} of the {len(names)} LoRA adapter weights of "
            f"model.peft (e.g. {missing[:2]}): it was written with other adapter settings or "
            "without model.peft. Use the config of the run that wrote it."
        )
    own = dict(model.named_parameters())
    adapters = {}
    for name in names:
        value = state[name]
        if tuple(value.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"{where}: adapter weight {name} has shape {list(value.shape)}, model.peft "
                f"gives {list(own[name].shape)} (another rank r?). Use the config of the run "
                "that wrote it."
            )
        adapters[name] = value if assign else value.to(own[name].dtype)
    model.load_state_dict(adapters, strict=False, assign=assign)


def export_adapters(
    module,
    adapter_state: dict[str, Any],
    output_dir: str | Path,
    tokenizer=None,
    adapter_only: bool = False,
    where: str = "the policy",
) -> Path:
    """Write a LoRA policy given its adapter weights.

    Args:
        module: the :class:`PreferenceModule` (its ``model``, ``peft``, ``torch_dtype``).
        adapter_state: ``{name: tensor}`` of the adapters (PEFT names, e.g.
            ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``); other
            entries are ignored.
        output_dir: the folder written.
        tokenizer: saved beside the weights when given.
        adapter_only: write the adapter alone (``adapter_config.json`` + safetensors, loaded back
            with ``PeftModel.from_pretrained(base, folder)``; no base weights are read). Else the
            base of ``model.model`` (in ``model.torch_dtype``, never 4-bit) with the adapters
            merged into its weights: a plain Hugging Face folder that loads without peft.
        where: what the weights came from, for errors.
    """
    if adapter_only:
        skeleton = peft_skeleton(module)
        load_adapters(skeleton, adapter_state, assign=True, where=where)
        return save_adapter(skeleton, output_dir, tokenizer)
    return save_pretrained(merged_lora_policy(module, adapter_state, where), output_dir, tokenizer)


def merged_lora_policy(
    module, adapter_state: dict[str, Any], where: str = "the policy"
) -> nn.Module:
    """The base of ``module.model_name`` (in ``model.torch_dtype``, never 4-bit) with the
    adapters of ``adapter_state`` merged into its weights: a plain transformers model, in eval
    mode."""
    from treg_lightning.models.loading import load_causal_lm

    base = load_causal_lm(
        module.model_name, module.torch_dtype, trust_remote_code=module.trust_remote_code
    )
    model = apply_lora(base, module.peft)
    load_adapters(model, adapter_state, assign=False, where=where)
    return merge_adapters(model.eval(), in_place=True).eval()
