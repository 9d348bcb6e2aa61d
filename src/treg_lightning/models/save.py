"""Write a model as a Hugging Face folder (safetensors + tokenizer), plain or LoRA-merged."""

from __future__ import annotations

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
