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
``adapter_only``, as the adapter alone (:func:`treg_lightning.adapters.export_adapters`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

POLICY_PREFIX = "policy."


def load_checkpoint_state(ckpt_path: str | Path) -> dict[str, Any]:
    """The LightningModule ``state_dict`` of a checkpoint file or sharded checkpoint folder."""
    path = Path(ckpt_path)
    if path.is_dir():
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        if not (path / ".metadata").is_file():
            raise FileNotFoundError(
                f"{path} is a folder but not a sharded (torch.distributed.checkpoint) "
                "checkpoint: it has no .metadata file. Pass a .ckpt file or a checkpoint folder "
                "written by ModelParallelStrategy / FSDPStrategy."
            )
        return _load_distributed_checkpoint(path)["state_dict"]
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; check --ckpt_path.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint["state_dict"]


def remove_stale_weights(output_dir: str | Path) -> list[Path]:
    """Delete the weight files (``*.safetensors`` and their index) of an earlier export in
    ``output_dir``, so an overwriting export never leaves another model's shards beside its own
    (a 3-shard export over a 4-shard one would load shard 4 of the old model)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    stale = sorted([*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")])
    for path in stale:
        path.unlink()
    return stale


def _is_weight_file(path: Path) -> bool:
    return path.name.endswith((".safetensors", ".safetensors.index.json"))


@contextlib.contextmanager
def staged_folder(output_dir: str | Path) -> Iterator[Path]:
    """A temporary sibling folder to write an export into, swapped in for ``output_dir`` at the
    end: a failed or interrupted export leaves ``output_dir`` as it was (an earlier export's
    weights included) and removes the temporary folder.

    On success, the entries of an earlier ``output_dir`` that the new export did not write are
    copied over first, except weight files (``*.safetensors`` and their index: another model's
    shards must not sit beside the new ones); then the folders are swapped by renames.
    """
    output_dir = Path(output_dir).expanduser()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        yield staging
        if output_dir.is_dir():
            for entry in output_dir.iterdir():
                target = staging / entry.name
                if target.exists() or target.is_symlink() or _is_weight_file(entry):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, target, symlinks=True)
                else:
                    shutil.copy2(entry, target, follow_symlinks=False)
            replaced = Path(
                tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent)
            )
            os.replace(output_dir, replaced / output_dir.name)
            os.replace(staging, output_dir)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.replace(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def policy_state_dict(state: dict[str, Any], prefix: str = POLICY_PREFIX) -> dict[str, Any]:
    """The policy's own keys (``policy.model.layers...`` -> ``model.layers...``)."""
    policy = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not policy:
        raise KeyError(
            f"The checkpoint holds no '{prefix}*' weights: it was not written by "
            "PreferenceModule (its keys start with "
            f"{sorted({k.split('.')[0] for k in state})})."
        )
    # checkpoint_wrapper (activation checkpointing) may leave its prefix in saved names.
    return {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in policy.items()}


def save_pretrained(
    policy: nn.Module, output_dir: str | Path, tokenizer=None, state_dict: dict | None = None
) -> Path:
    """``policy.save_pretrained`` (safetensors) and the tokenizer into ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return output_dir


def export_checkpoint(
    module, ckpt_path: str | Path, output_dir: str | Path, adapter_only: bool = False
) -> Path:
    """Load the policy of ``module`` from ``ckpt_path`` and write it to ``output_dir``.

    ``module`` is an unconfigured :class:`PreferenceModule` with the run's settings (the CLI
    reads them from the checkpoint); its policy is built on CPU, then overwritten. With LoRA the
    checkpoint's adapters go onto the base of ``model.model`` (``adapter_only``: the adapter
    alone is written).
    """
    from treg_lightning.models import load_tokenizer

    if getattr(module, "peft", None) is not None:
        from treg_lightning.adapters import export_adapters

        state = policy_state_dict(load_checkpoint_state(ckpt_path))
        tokenizer = load_tokenizer(module.model_name, trust_remote_code=module.trust_remote_code)
        return export_adapters(module, state, output_dir, tokenizer, adapter_only, str(ckpt_path))
    _check_adapter_only(adapter_only)
    module.build_policy()
    state = policy_state_dict(load_checkpoint_state(ckpt_path))
    state = {k: v.to(p.dtype) for (k, v), p in _matched(module.policy, state)}
    module.policy.load_state_dict(state, strict=True)
    tokenizer = load_tokenizer(module.model_name, trust_remote_code=module.trust_remote_code)
    return save_pretrained(module.policy, output_dir, tokenizer)


def _matched(policy: nn.Module, state: dict[str, Any]):
    own = policy.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise KeyError(
            f"The checkpoint lacks {len(missing)} policy weights (e.g. {missing[:3]}): it was "
            "trained with another model. Use the config of the run that wrote it."
        )
    return [((k, state[k]), own[k]) for k in own]


def _check_adapter_only(adapter_only: bool) -> None:
    if adapter_only:
        from treg_lightning.errors import ConfigError

        raise ConfigError(
            "adapter_only writes the LoRA adapter alone, but this run has no adapters "
            "(model.peft is not set): drop adapter_only to export the whole policy."
        )


def export_module(
    module, output_dir: str | Path, tokenizer=None, adapter_only: bool = False
) -> Path | None:
    """Write the live policy of ``module``; collective under FSDP2 (call on every rank).

    Returns the folder on global rank 0 and None on other ranks.
    """
    from treg_lightning.parallel import is_sharded

    policy = module.policy
    if getattr(module, "peft", None) is not None:
        from treg_lightning.adapters import export_adapters, live_adapter_state

        state = live_adapter_state(policy)  # collective under FSDP2
        if module.global_rank != 0:
            return None
        return export_adapters(module, state, output_dir, tokenizer, adapter_only)
    _check_adapter_only(adapter_only)
    state_dict = None
    if is_sharded(policy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state_dict = get_model_state_dict(policy, options=options)
    if module.global_rank != 0:
        return None
    if state_dict is not None:
        state_dict = {
            k.replace("_checkpoint_wrapped_module.", ""): v for k, v in state_dict.items()
        }
    return save_pretrained(policy, output_dir, tokenizer, state_dict=state_dict)
