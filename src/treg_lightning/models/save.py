"""Write a model as a Hugging Face folder (safetensors + tokenizer), plain or LoRA-merged."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from treg_lightning.errors import ConfigError
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


# The entries of a Hugging Face model folder: what ``save_pretrained`` (transformers, peft, a
# tokenizer) and the model card write, and what ``from_pretrained`` reads. Every one of them in
# an earlier export is replaced as a whole by the next export; any other entry is the user's
# (notes, evaluation results, a .git folder) and is kept.
EXPORT_NAMES = frozenset(
    {
        "README.md",  # the model card (a user's own README is refused: check_replaceable)
        "config.json",
        "generation_config.json",
        "adapter_config.json",
        "pytorch_model.bin",
        "adapter_model.bin",
        "tf_model.h5",
        "flax_model.msgpack",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "spiece.model",
        "sentencepiece.bpe.model",
        "tekken.json",
        "chat_template.jinja",
        "chat_template.json",
        "additional_chat_templates",
        "preprocessor_config.json",
        "processor_config.json",
    }
)
EXPORT_PATTERNS = (
    "*.safetensors",  # weights and their shards, merged or adapter
    "*.safetensors.index.json",
    "pytorch_model-*.bin",
    "pytorch_model.bin.index.json",
    "*.gguf",
    "configuration_*.py",  # remote code copied beside the weights
    "modeling_*.py",
    "tokenization_*.py",
)
# The last line of every model card treg-lightning writes (treg_lightning.training.model_card).
CARD_MARK = "Written by treg-lightning"


def is_export_entry(name: str) -> bool:
    """Whether ``name`` (an entry of a model folder) is one an export writes or a loader reads."""
    return name in EXPORT_NAMES or any(fnmatch.fnmatchcase(name, p) for p in EXPORT_PATTERNS)


def user_entries(folder: str | Path) -> list[str]:
    """The entries of ``folder`` that no export writes (kept by :func:`staged_folder`)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    return sorted(e.name for e in folder.iterdir() if not is_export_entry(e.name))


def check_replaceable(output_dir: str | Path, setting: str = "--output.path") -> None:
    """Refuse an export folder whose replacement would lose a file of the user's: run before the
    export loads anything.

    Raises:
        ConfigError: ``output_dir`` is a file, or holds a ``README.md`` that is not a model card
            of treg-lightning (the new card would replace it).
    """
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"{path} ({setting}) is a file, not a folder: an export is a folder of weights, "
            f"tokenizer and model card. Choose a folder for {setting}."
        )
    card = path / "README.md"
    if card.is_file() and CARD_MARK not in card.read_text(encoding="utf-8", errors="replace"):
        raise ConfigError(
            f"{card} is not a model card written by treg-lightning (your own README?): the "
            f"export writes its model card under that name, so it would be lost. Move it out of "
            f"{path}, or choose another {setting}."
        )


@contextlib.contextmanager
def staged_folder(
    output_dir: str | Path, kept: list[str] | None = None, setting: str = "--output.path"
) -> Iterator[Path]:
    """An empty temporary sibling folder to write an export into, swapped in for
    ``output_dir`` at the end: the folder then holds the new export and nothing of an earlier
    one (two models never mix), so it always loads.

    A failed or interrupted export leaves ``output_dir`` as it was (an earlier export included)
    and removes the temporary folder. On success, the entries of an earlier ``output_dir`` that
    are not export entries (:func:`is_export_entry`: the user's own files) are carried into the
    new folder (hard links where the file system allows, else copies), their names appended to
    ``kept``; no export entry of the earlier folder (its weights, configs, adapter, tokenizer
    files or card) is. ``output_dir`` is checked first (:func:`check_replaceable`, naming
    ``setting``).
    """
    output_dir = Path(output_dir).expanduser()
    check_replaceable(output_dir, setting)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        yield staging
        if output_dir.is_dir():
            carried = _carry_user_entries(output_dir, staging)
            # Until this rename the earlier folder is untouched; from it on, the new one is there.
            replaced = Path(
                tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent)
            )
            os.replace(output_dir, replaced / output_dir.name)
            os.replace(staging, output_dir)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            carried = []
            os.replace(staging, output_dir)
        if kept is not None:
            kept.extend(carried)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _carry_user_entries(output_dir: Path, staging: Path) -> list[str]:
    """Link (or copy) the user's entries of ``output_dir`` into ``staging``, the originals left
    in place; an entry the new export wrote itself is the export's. Returns the names."""
    names = [n for n in user_entries(output_dir) if not os.path.lexists(staging / n)]
    for name in names:
        entry, target = output_dir / name, staging / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)
    return names


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    """A hard link (no second copy of a large file), or a copy where links are refused."""
    if os.path.islink(source):
        shutil.copy2(source, target, follow_symlinks=False)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
