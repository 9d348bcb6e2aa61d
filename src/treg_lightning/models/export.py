"""Write the trained policy as a Hugging Face folder (safetensors + tokenizer).

Two entry points:

- :func:`export_checkpoint`: from a Lightning checkpoint on disk: a ``.ckpt`` file (single
  device, DDP, FSDP with a full state dict) or a sharded checkpoint folder written by
  ``ModelParallelStrategy`` (FSDP2) or ``FSDPStrategy`` (``torch.distributed.checkpoint``
  format, consolidated here on one process);
- :func:`export_module`: from a live :class:`PreferenceModule` (after ``fit``), gathering
  FSDP2 shards onto rank 0 first.

Either folder loads with ``AutoModelForCausalLM.from_pretrained(folder)``. A LoRA policy
(``model.peft``) is written with its adapters merged into the base weights, or, with
``adapter_only``, as the adapter alone (:func:`treg_lightning.models.adapters.export_adapters`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from treg_lightning.errors import ConfigError
from treg_lightning.models.checkpoints import load_policy_weights, policy_state, read_state
from treg_lightning.models.save import save_pretrained
from treg_lightning.models.state_names import WRAPPER_PREFIX


@dataclass(frozen=True)
class ExportSettings:
    """The own settings of ``treg export`` (``--export.*``)."""

    adapter_only: bool = False
    """With LoRA, write the adapter alone (``adapter_config.json`` + safetensors;
    ``PeftModel.from_pretrained(base, folder)`` loads it) instead of the merged model."""


def export_checkpoint(
    module, ckpt_path: str | Path, output_dir: str | Path, adapter_only: bool = False
) -> Path:
    """Load the policy of ``module`` from ``ckpt_path`` and write it to ``output_dir``.

    ``module`` is an unconfigured :class:`PreferenceModule` with the run's settings (the CLI
    reads them from the checkpoint); its policy is built on CPU, then overwritten. With LoRA the
    checkpoint's adapters go onto the base of ``model.model`` (``adapter_only``: the adapter
    alone is written).
    """
    from treg_lightning.models.loading import load_tokenizer

    state = policy_state(read_state(ckpt_path), str(ckpt_path))
    tokenizer = load_tokenizer(module.model_name, trust_remote_code=module.trust_remote_code)
    if getattr(module, "peft", None) is not None:
        from treg_lightning.models.adapters import export_adapters

        return export_adapters(module, state, output_dir, tokenizer, adapter_only, str(ckpt_path))
    _check_adapter_only(adapter_only)
    module.build_policy()
    load_policy_weights(module.policy, state, lora=False, source=str(ckpt_path))
    return save_pretrained(module.policy, output_dir, tokenizer)


def _check_adapter_only(adapter_only: bool) -> None:
    if adapter_only:
        raise ConfigError(
            "adapter_only writes the LoRA adapter alone, but this run has no adapters "
            "(model.peft is not set): drop adapter_only to export the whole policy."
        )


def export_module(
    module, output_dir: str | Path, tokenizer=None, adapter_only: bool = False
) -> Path | None:
    """Write the live policy of ``module``; collective under FSDP1 and FSDP2 (call on every
    rank).

    Returns the folder on global rank 0 and None on other ranks.
    """
    from treg_lightning.models.parallel import fsdp1_policy_state, fsdp1_root, is_sharded

    policy = module.policy
    root = fsdp1_root(module)
    if getattr(module, "peft", None) is not None:
        from treg_lightning.models.adapters import export_adapters, live_adapter_state

        state = live_adapter_state(policy)  # collective under FSDP2
        if module.global_rank != 0:
            return None
        return export_adapters(module, state, output_dir, tokenizer, adapter_only)
    _check_adapter_only(adapter_only)
    state_dict = None
    if root is not None:
        state_dict = fsdp1_policy_state(root)
    elif is_sharded(policy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state_dict = get_model_state_dict(policy, options=options)
    if module.global_rank != 0:
        return None
    if state_dict is not None:
        state_dict = {k.replace(WRAPPER_PREFIX, ""): v for k, v in state_dict.items()}
    return save_pretrained(policy, output_dir, tokenizer, state_dict=state_dict)
