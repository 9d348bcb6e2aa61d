"""Write a model as a Hugging Face folder (safetensors + tokenizer), plain or LoRA-merged."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from treg_lightning.models.lora import merge_adapters


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


def save_merged(
    model: nn.Module, output_dir: str | Path, tokenizer=None, in_place: bool = False
) -> Path:
    """Write the merged model as a Hugging Face folder (safetensors; loads without PEFT)."""
    merged = merge_adapters(model, in_place=in_place)
    return save_pretrained(merged, output_dir, tokenizer)


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
