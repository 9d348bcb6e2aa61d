"""The one checkpoint reader, and the checks of a ``--ckpt_path`` at start-up.

Every verb reads checkpoints here: :func:`load_checkpoint` (the only ``torch.load`` of the
package: tensors only, memory-mapped, friendly errors), :func:`read_state` (the module state of a
``.ckpt`` file or a sharded folder), :func:`read_hparams` (the module hyperparameters, upgraded
from older versions' names by
:func:`~treg_lightning.models.renames.upgrade_hparams`), :func:`policy_state` (the policy's own
weights) and :func:`load_policy_weights` (into a built policy, full or LoRA).

The checks:
Lightning finds out that a checkpoint is empty, truncated, a text file or another model's only
after the annotate pass and the model load, and then says so with a bare ``EOFError``, a pickle
error or torch's advice to load with ``weights_only=False`` (which would run the file's code).
:func:`check_checkpoint_file` reads only the file's structure (tensors are memory-mapped, not
read) and :func:`check_checkpoint_fits` compares its policy weights' names and shapes with the
configured model built on the meta device (no weights), each failing with a
:class:`~treg_lightning.errors.CheckpointError` that names the file and what to do.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from treg_lightning.errors import CheckpointError, MissingFileError
from treg_lightning.models.renames import upgrade_hparams
from treg_lightning.models.state_names import POLICY_PREFIX, WRAPPER_PREFIX

# --ckpt_path values that Lightning resolves itself (not files).
SPECIAL_PATHS = ("last", "best", "hpc", "registry")
# What torch raises when weights_only loading meets other objects (pickle's error class; taken
# from torch so this package imports no pickle-family module itself).
_UNPICKLING_ERROR = torch.serialization.pickle.UnpicklingError
_RESUME = (
    "Use another checkpoint (ModelCheckpoint keeps the earlier ones beside it, e.g. "
    "epoch=0-step=100.ckpt), or drop --ckpt_path to start a new run."
)


def is_file_path(ckpt_path: Any) -> bool:
    """Whether ``ckpt_path`` names a file or folder (not "last", "registry:...", a URL)."""
    if ckpt_path is None:
        return False
    text = str(ckpt_path)
    return text.split(":")[0] not in SPECIAL_PATHS and "://" not in text


def check_checkpoint_file(ckpt_path: str | Path, setting: str = "--ckpt_path") -> None:
    """Refuse a checkpoint file or sharded folder that cannot be loaded as one.

    Raises:
        MissingFileError: it does not exist.
        CheckpointError: empty, truncated, not a checkpoint, holding Python objects (refused:
            unpickling them could run code), or not written by ``PreferenceModule``.
    """
    path = Path(ckpt_path).expanduser()
    if not path.exists():
        raise MissingFileError(
            f"{setting} {ckpt_path} does not exist: give the .ckpt file (or sharded "
            "checkpoint folder) to resume from, e.g. <dirpath>/last.ckpt, or drop "
            "--ckpt_path to start a new run."
        )
    policy_shapes(path, setting)  # reads the structure only: .metadata, or mmap'd tensors


def policy_shapes(path: Path, setting: str = "--ckpt_path") -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the policy weights in a checkpoint, without reading tensor data.

    Names drop the ``policy.`` prefix (``model.layers.0...``), as in the Hugging Face model.
    """
    entries = _folder_entries(path, setting) if path.is_dir() else _file_entries(path, setting)
    # A sharded folder names its weights "state_dict.policy.*" beside "optimizer_0.state.policy.*"
    # (the optimizer's moments), which are not weights.
    policy = {
        name.removeprefix("state_dict.")[len(POLICY_PREFIX) :].replace(WRAPPER_PREFIX, ""): shape
        for name, shape in entries.items()
        if name.removeprefix("state_dict.").startswith(POLICY_PREFIX)
    }
    if not policy:
        tops = sorted({name.split(".")[0] for name in entries})[:8]
        raise CheckpointError(
            f"{setting} {path} holds no policy weights: it was not written by treg-lightning's "
            f"PreferenceModule (its weights start with {tops or 'nothing'}). Pass a checkpoint "
            "of a `treg fit` run; a Hugging Face model folder goes to --model.model instead."
        )
    return policy


def _file_entries(path: Path, setting: str) -> dict[str, tuple[int, ...]]:
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"{setting} {path} is empty (0 bytes): the run that wrote it was stopped while "
            f"saving, or the disk was full. {_RESUME}"
        )
    with path.open("rb") as f:
        head = f.read(512)
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK"):
            what = f"is truncated ({size} bytes, its end is missing): the copy or save was cut off"
        elif _is_text(head):
            what = "is a text file, not a checkpoint"
        else:
            what = "is not a PyTorch checkpoint (torch.save writes a zip archive)"
        raise CheckpointError(f"{setting} {path} {what}. {_RESUME}")
    checkpoint = load_checkpoint(path, setting)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{setting} {path} is not a Lightning checkpoint: it has no 'state_dict' (it holds "
            f"{keys}). Pass a checkpoint of a `treg fit` run; a Hugging Face model folder goes "
            "to --model.model instead."
        )
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_checkpoint(path: str | Path, setting: str = "--ckpt_path") -> dict[str, Any]:
    """``torch.load`` of a checkpoint file: tensors and plain values only (``weights_only``),
    memory-mapped (only what is used is read), on CPU.

    Raises:
        CheckpointError: it holds Python objects (refused: unpickling them could run code), or
            it is damaged.
    """
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except _UNPICKLING_ERROR:
        raise CheckpointError(
            f"{setting} {path} holds Python objects other than tensors and plain values, so it "
            "is refused: unpickling them could run code from the file. Checkpoints written by "
            "`treg fit` hold none; pass one of those."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"{setting} {path} is damaged and cannot be read ({first}). {_RESUME}"
        ) from None


def _folder_entries(path: Path, setting: str) -> dict[str, tuple[int, ...]]:
    metadata = path / ".metadata"
    if not metadata.is_file():
        raise CheckpointError(
            f"{setting} {path} is a folder but not a sharded (torch.distributed.checkpoint) "
            "checkpoint: it has no .metadata file. Pass a .ckpt file, or a checkpoint folder "
            "written by ModelParallelStrategy / FSDPStrategy (it holds .metadata and "
            "__0_0.distcp files)."
        )
    # Lazy: torch.distributed.checkpoint takes seconds to import and only sharded folders need it.
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        entries = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as error:  # noqa: BLE001 - a damaged .metadata fails in many ways
        raise CheckpointError(
            f"{setting} {path} has a damaged .metadata file ({type(error).__name__}): the save "
            f"was cut off. {_RESUME}"
        ) from None
    return {
        name: tuple(meta.size)
        for name, meta in entries.items()
        if isinstance(meta, TensorStorageMetadata)
    }


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in head


def check_checkpoint_fits(ckpt_path: str | Path, module, setting: str = "--ckpt_path") -> None:
    """Refuse a checkpoint whose policy weights do not fit ``module``'s configured model.

    The model is built on the meta device from its config (no weights load); skipped when the
    config cannot be read without loading (a .gguf file).

    Raises:
        CheckpointError: a weight is missing or has another shape (another model's checkpoint).
    """
    expected = _expected_shapes(module)
    if expected is None:
        return
    got = policy_shapes(Path(ckpt_path).expanduser(), setting)
    missing = sorted(set(expected) - set(got))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if not missing and not wrong:
        return
    name = module.model_name
    if wrong:
        key = wrong[0]
        detail = (
            f"e.g. {key} has shape {list(got[key])} in the checkpoint but {list(expected[key])} "
            f"in {name}"
        )
    else:
        detail = f"it lacks {len(missing)} of the model's weights, e.g. {missing[:2]}"
    lora = getattr(module, "peft", None) is not None
    if lora != any(".lora_" in k for k in got):
        detail += (
            "; it holds LoRA adapters but model.peft is not set"
            if not lora
            else "; it holds no LoRA adapters but model.peft is set"
        )
    raise CheckpointError(
        f"{setting} {ckpt_path} was written for another model than model.model={name} "
        f"({detail}). Use the config of the run that wrote it (its model.model), or a "
        "checkpoint of this model."
    )


def _expected_shapes(module) -> dict[str, tuple[int, ...]] | None:
    # Lazy: transformers (and models.loading, which imports it) take seconds to import; the
    # reader itself needs torch only.
    from transformers import AutoConfig, AutoModelForCausalLM

    from treg_lightning.models.loading import resolve_model_source

    source = resolve_model_source(module.model_name)
    if source.gguf_file is not None:
        return None
    if getattr(module, "peft", None) is not None:
        # A LoRA run's checkpoints hold its adapters only (treg_lightning.models.adapters;
        # lazy, as it imports transformers).
        from treg_lightning.models.adapters import adapter_shapes

        return adapter_shapes(module)
    trust = bool(getattr(module, "trust_remote_code", False))
    config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def read_state(ckpt_path: str | Path, setting: str = "--ckpt_path") -> dict[str, Any]:
    """The LightningModule ``state_dict`` of a ``.ckpt`` file or a sharded checkpoint folder
    (``torch.distributed.checkpoint``, consolidated here on one process), checked first."""
    path = Path(ckpt_path).expanduser()
    check_checkpoint_file(path, setting)
    if path.is_dir():
        # Lazy: Lightning takes seconds to import and only sharded folders need it. A private
        # function (no public one consolidates a sharded checkpoint in memory): its signature
        # is checked in tests/test_private_hooks.py.
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        return _load_distributed_checkpoint(path)["state_dict"]
    return load_checkpoint(path, setting)["state_dict"]


def read_hparams(ckpt_path: str | Path, setting: str = "--ckpt_path") -> dict[str, Any]:
    """The module hyperparameters a checkpoint was written with, in today's names; ``{}`` when
    it holds none (a sharded folder keeps them in ``meta.pt``)."""
    path = Path(ckpt_path).expanduser()
    check_checkpoint_file(path, setting)
    source = path / "meta.pt" if path.is_dir() else path
    if not source.is_file():
        return {}
    saved = load_checkpoint(source, setting).get("hyper_parameters")
    hparams = upgrade_hparams(dict(saved or {}), source=str(source))
    hparams.pop("_instantiator", None)
    return hparams


def policy_state(state: dict[str, Any], source: str = "the checkpoint") -> dict[str, Any]:
    """The policy's own weights of a module state (``policy.model.layers...`` ->
    ``model.layers...``), without activation checkpointing's wrapper prefix."""
    policy = {
        k[len(POLICY_PREFIX) :].replace(WRAPPER_PREFIX, ""): v
        for k, v in state.items()
        if k.startswith(POLICY_PREFIX)
    }
    if not policy:
        raise CheckpointError(
            f"{source} holds no policy weights: it was not written by treg-lightning's "
            f"PreferenceModule (its keys start with {sorted({k.split('.')[0] for k in state})[:8]}"
            ")."
            " Pass a checkpoint of a `treg fit` run; a Hugging Face model folder goes to "
            "--model.model instead."
        )
    return policy


def load_policy_weights(policy, state: dict[str, Any], lora: bool, source: str) -> None:
    """Load a checkpoint's policy weights (:func:`policy_state`) into a built ``policy``: every
    weight for a full fine-tune, the adapters onto a PEFT-wrapped policy for a LoRA run (its
    checkpoints hold the adapters only)."""
    if lora:
        from treg_lightning.models.adapters import load_adapters  # lazy: imports transformers

        load_adapters(policy, state, assign=False, where=source)
        return
    own = policy.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        hint = (
            " It holds LoRA adapters: set model.peft as in the run that wrote it."
            if any(".lora_" in k for k in state)
            else ""
        )
        raise CheckpointError(
            f"{source} lacks {len(missing)} weights of the policy (e.g. {missing[:3]}): it was "
            f"trained with another model.{hint} Use the config of the run that wrote it."
        )
    policy.load_state_dict({k: state[k].to(v.dtype) for k, v in own.items()}, strict=True)
