"""Fingerprints of token-reward caches: what identifies the inputs a cache was built from.

The model enters by content, not by path (moving a model folder keeps its cache valid); the
tokenizer by vocabulary, chat template and special tokens; the data by every row's index, texts
and token ids; plus the scorer's template and settings (lengths, dtype, ...). One sha256 per
part, so a mismatch can say which input changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from treg_lightning.pairs import ID_FIELDS, SIDES

FORMAT = "treg-lightning-token-rewards"
# 2: per-token columns named as the pair contract's fields ({side}_token_rewards,
# {side}_ref_token_logps); version 1 called them {side}_rewards and {side}_ref_logps.
FORMAT_VERSION = 2

# Config keys that name or place a model rather than define it.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_attn_implementation_autoset")


@dataclass(frozen=True)
class Fingerprint:
    """Identity of a token-reward cache.

    Attributes:
        digest: sha256 over all ``parts``.
        parts: one sha256 per input (model, tokenizer, template, settings, data), so a mismatch
            can say which input changed.
        description: human-readable labels (model name, template name, settings) for messages.
    """

    digest: str
    parts: dict[str, str] = field(default_factory=dict)
    description: dict[str, Any] = field(default_factory=dict)


def _sha(*chunks: str | bytes) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk.encode() if isinstance(chunk, str) else chunk)
    return h.hexdigest()


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


@torch.no_grad()
def model_identity(model: torch.nn.Module) -> str:
    """sha256 of the config (minus paths/versions) and, per weight tensor, its name, shape, dtype,
    16 evenly spaced values and its float64 sum rounded to 10 significant digits (the rounding
    makes it independent of reduction order / device; a sum pass is cheap next to annotation)."""
    config = model.config.to_dict() if hasattr(model, "config") else {}
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    h = hashlib.sha256(_json(config).encode())
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() and flat.device.type != "meta":
            # float64: float32 cannot count past 2**24, and larger tensors (a 28M-entry
            # embedding) would round the last index past the end.
            picks = torch.linspace(0, flat.numel() - 1, 16, dtype=torch.float64)
            picks = picks.long().unique().to(flat.device)
            h.update(flat.index_select(0, picks).to("cpu", torch.float64).numpy().tobytes())
            h.update(f"{flat.sum(dtype=torch.float64).item():.9e}".encode())
    return h.hexdigest()


def tokenizer_identity(tokenizer) -> str:
    """sha256 of the vocabulary, chat template and special tokens."""
    return _sha(
        _json(sorted(tokenizer.get_vocab().items())),
        _json(getattr(tokenizer, "chat_template", None)),
        _json(
            {
                "special": sorted(map(str, tokenizer.all_special_tokens)),
                "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
            }
        ),
    )


def rows_digest(rows: Iterable[Mapping[str, Any]], salt: str = "") -> str:
    """sha256 of every row's index, texts and token ids (after ``salt``): the one row hash,
    for the data part of a fingerprint and for the key of each chunk of a build."""
    h = hashlib.sha256(salt.encode())
    for i, row in enumerate(rows):
        texts = {k: row.get(k) for k in ("prompt", *SIDES)}
        ids = {k: list(row[k]) for k in ID_FIELDS}
        h.update(_json([row.get("index", i), texts, ids]).encode())
    return h.hexdigest()


def compute_fingerprint(
    *,
    model: torch.nn.Module | None,
    tokenizer,
    template=None,
    rows: list[Mapping[str, Any]],
    settings: Mapping[str, Any],
    model_name: str = "",
) -> Fingerprint:
    """Fingerprint of a token-reward cache.

    The model enters by content (:func:`model_identity`), not by path, so moving a model folder
    keeps its cache valid; ``model=None`` is a source without one (values read from the data).
    ``settings`` should hold everything else that changes the cached
    values: lengths, dtype, ``store_reference_logps``, context length limit.
    """
    template_dict = template.to_dict() if hasattr(template, "to_dict") else {"repr": repr(template)}
    # template=None (a source without one) gives the part of {"repr": "None"}: still stable.
    parts = {
        # A new format never shares a folder (digest) with caches of an older one.
        "format": _sha(f"{FORMAT}/{FORMAT_VERSION}"),
        "model": _sha("no model") if model is None else model_identity(model),
        "tokenizer": tokenizer_identity(tokenizer),
        "template": _sha(_json(template_dict)),
        "settings": _sha(_json(dict(settings))),
        "data": rows_digest(rows),
    }
    description = {
        "model": model_name or getattr(getattr(model, "config", None), "_name_or_path", "?"),
        "template": template_dict.get("name", "?"),
        "settings": dict(settings),
        "num_rows": len(rows),
    }
    return Fingerprint(_sha(_json(parts)), parts, description)
