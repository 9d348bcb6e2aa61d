"""The fingerprinted on-disk token-reward cache.

API (what the datamodule calls)::

    annotator = TokenRewardAnnotator(template="instruct", batch_size=8)
    ds = cached_token_rewards(rows, cache_dir, evaluator, tok, annotator, model_name="smollm2",
                              settings={"max_length": 512, "max_prompt_length": 384})

which is short for::

    fp = compute_fingerprint(model=evaluator, tokenizer=tok, template=annotator.template,
                             rows=rows, settings={**annotator.settings(), "max_length": 512, ...},
                             model_name="smollm2")
    ds = load_or_build(rows, cache_dir, fp,
                       annotate_fn=lambda rows, work_dir: annotator(evaluator, tok, rows, work_dir))

``rows``: tokenized pairs, ``{"index", "prompt" (messages), "chosen", "rejected" (texts),
"prompt_ids", "chosen_ids", "rejected_ids"}``. ``annotate_fn(rows, work_dir)`` runs on every rank
(each annotates its shard, resumably, in ``work_dir``) and returns the merged
``datasets.Dataset`` on rank 0 (anything on other ranks). ``load_or_build`` returns the cached
dataset on every rank, with the columns of CONTRACT "Token-reward cache rows".

Layout of ``cache_dir``: ``meta.json`` (written last: its presence marks a finished cache),
``data/`` (``Dataset.save_to_disk``), ``work/`` (chunk files of an unfinished build; removed once
the cache is complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch

from treg_lightning.errors import UserError
from treg_lightning.outputs import disk_full_hint

FORMAT = "treg-lightning-token-rewards"
FORMAT_VERSION = 1
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
# Config keys that name or place a model rather than define it.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_attn_implementation_autoset")


class CacheError(UserError, RuntimeError):
    """A token-reward cache exists but cannot be used (the message says why and what to do)."""


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


def data_identity(rows: Iterable[Mapping[str, Any]]) -> str:
    """sha256 of every row's index, texts and token ids."""
    h = hashlib.sha256()
    for i, row in enumerate(rows):
        texts = {k: row.get(k) for k in ("prompt", "chosen", "rejected")}
        ids = {k: list(row[k]) for k in ID_COLUMNS}
        h.update(_json([row.get("index", i), texts, ids]).encode())
    return h.hexdigest()


def compute_fingerprint(
    *,
    model: torch.nn.Module,
    tokenizer,
    template,
    rows: list[Mapping[str, Any]],
    settings: Mapping[str, Any],
    model_name: str = "",
) -> Fingerprint:
    """Fingerprint of a token-reward cache.

    The model enters by content (:func:`model_identity`), not by path, so moving a model folder
    keeps its cache valid. ``settings`` should hold everything else that changes the cached
    values: lengths, dtype, ``store_reference_logps``, context length limit.
    """
    template_dict = template.to_dict() if hasattr(template, "to_dict") else {"repr": repr(template)}
    parts = {
        "model": model_identity(model),
        "tokenizer": tokenizer_identity(tokenizer),
        "template": _sha(_json(template_dict)),
        "settings": _sha(_json(dict(settings))),
        "data": data_identity(rows),
    }
    description = {
        "model": model_name or getattr(getattr(model, "config", None), "_name_or_path", "?"),
        "template": template_dict.get("name", "?"),
        "settings": dict(settings),
        "num_rows": len(rows),
    }
    return Fingerprint(_sha(_json(parts)), parts, description)


def cached_token_rewards(
    rows: list[Mapping[str, Any]],
    cache_dir: str | Path,
    model: torch.nn.Module,
    tokenizer,
    annotator,
    model_name: str = "",
    settings: Mapping[str, Any] | None = None,
) -> datasets.Dataset:
    """Fingerprint + :func:`load_or_build` with a :class:`TokenRewardAnnotator` in one call.

    Args:
        rows: tokenized pairs (see the module docstring).
        cache_dir: cache folder.
        model: the evaluator (already on its device).
        tokenizer: the tokenizer that produced the rows.
        annotator: a ``TokenRewardAnnotator``.
        model_name: label shown in cache mismatch messages.
        settings: extra settings that change the cached values (lengths, dtype); the
            annotator's own settings are always included.
    """
    fp = annotation_fingerprint(model, tokenizer, annotator, rows, settings, model_name)
    return load_or_build(rows, cache_dir, fp, lambda r, w: annotator(model, tokenizer, r, w))


def annotation_fingerprint(
    model: torch.nn.Module,
    tokenizer,
    annotator,
    rows: list[Mapping[str, Any]],
    settings: Mapping[str, Any] | None = None,
    model_name: str = "",
) -> Fingerprint:
    """The fingerprint of annotating ``rows`` with ``annotator`` and the evaluator ``model``.

    ``settings`` are the extra inputs that change the cached values (lengths); the annotator's
    own settings and the evaluator's dtype are always included.
    """
    settings = {**annotator.settings(), **dict(settings or {})}
    settings["dtype"] = str(next(model.parameters()).dtype)
    return compute_fingerprint(
        model=model,
        tokenizer=tokenizer,
        template=annotator.template,
        rows=rows,
        settings=settings,
        model_name=model_name,
    )


def read_meta(cache_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a finished cache; :class:`CacheError` if unreadable or foreign."""
    path = Path(cache_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(
            f"Token-reward cache at {cache_dir} is damaged: {path} is unreadable ({err}). "
            "Delete the folder and rerun the annotation."
        ) from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CacheError(
            f"{path} is not a treg-lightning token-reward cache (no format={FORMAT!r}); point "
            "cache_dir at a new or empty folder."
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"Token-reward cache at {cache_dir} has format version {meta.get('format_version')}, "
            f"this treg-lightning reads version {FORMAT_VERSION}: delete it and rerun."
        )
    return meta


def load_or_build(
    rows: list[Mapping[str, Any]],
    cache_dir: str | Path,
    fingerprint: Fingerprint | str,
    annotate_fn: Callable[[list[Mapping[str, Any]], Path], datasets.Dataset | None],
    check_rows: int | None = None,
) -> datasets.Dataset:
    """Reuse the cache at ``cache_dir`` if its fingerprint matches, else build it.

    Args:
        rows: the tokenized pairs, in order (the cache has one row per pair, same order).
        cache_dir: folder of the cache; created if missing.
        fingerprint: from :func:`compute_fingerprint` (or a plain digest string).
        annotate_fn: ``annotate_fn(rows, work_dir)`` computes the rewards, resumably, in
            ``work_dir``; called on every rank; returns the dataset on rank 0.
        check_rows: compare the stored token ids with ``rows`` on this many rows (evenly
            spread); None checks all.

    Raises:
        CacheError: the folder holds a cache for other inputs, one whose token ids differ from
            ``rows``, a damaged cache, or files that are not ours.
    """
    fp = fingerprint if isinstance(fingerprint, Fingerprint) else Fingerprint(str(fingerprint))
    cache_dir = Path(cache_dir)
    rank, barrier = _rank_and_barrier()
    if not (cache_dir / "meta.json").exists():
        work_dir = cache_dir / "work"
        _check_buildable(cache_dir, fp)
        barrier()  # every rank has looked before rank 0 writes anything
        if rank == 0:
            work_dir.mkdir(parents=True, exist_ok=True)
            _write_json(work_dir / "fingerprint.json", _fp_record(fp))
        barrier()
        dataset = annotate_fn(list(rows), work_dir)
        if rank == 0:
            _save(dataset, cache_dir, fp)
        barrier()
    return _load_checked(rows, cache_dir, fp, check_rows)


def _rank_and_barrier() -> tuple[int, Callable[[], None]]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.barrier
    return 0, lambda: None


def _fp_record(fp: Fingerprint) -> dict[str, Any]:
    return {"fingerprint": fp.digest, "parts": fp.parts, "description": fp.description}


def _mismatch(cache_dir: Path, stored: Mapping[str, Any], fp: Fingerprint, what: str) -> str:
    old, new = stored.get("description", {}), fp.description
    changed = [k for k, v in fp.parts.items() if stored.get("parts", {}).get(k) != v]
    return (
        f"{what} at {cache_dir} was built for model {old.get('model', '?')!r} / template "
        f"{old.get('template', '?')!r} (settings {old.get('settings', '?')}), but the current run "
        f"uses model {new.get('model', '?')!r} / template {new.get('template', '?')!r} (settings "
        f"{new.get('settings', '?')}); differing inputs: {', '.join(changed) or 'fingerprint'}. "
        "Delete it or point cache_dir elsewhere."
    )


def _check_buildable(cache_dir: Path, fp: Fingerprint) -> None:
    """Building may start in a missing/empty folder or resume an unfinished build of ours."""
    if not cache_dir.exists() or not any(cache_dir.iterdir()):
        return
    record_path = cache_dir / "work" / "fingerprint.json"
    if not record_path.is_file() and (cache_dir / "data").exists():
        raise CacheError(
            f"Token-reward cache at {cache_dir} is damaged: it has data/ but no meta.json (the "
            "build was cut off while saving, or files were deleted). Delete the folder and rerun."
        )
    if not record_path.is_file():
        raise CacheError(
            f"cache_dir {cache_dir} is not empty and holds no token-reward cache (no meta.json, "
            "no unfinished work/): point cache_dir at a new or empty folder."
        )
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(
            f"Unfinished token-reward cache at {cache_dir}: {record_path} is unreadable ({err}); "
            "delete the folder and rerun."
        ) from err
    if record.get("fingerprint") != fp.digest:
        raise CacheError(_mismatch(cache_dir, record, fp, "The unfinished token-reward cache"))


def _save(dataset: datasets.Dataset | None, cache_dir: Path, fp: Fingerprint) -> None:
    """Write data/ then meta.json (each atomically), then drop the work folder."""
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"annotate_fn must return a datasets.Dataset on rank 0, got {dataset!r}.")
    tmp = cache_dir / f".data.tmp-{uuid.uuid4().hex[:8]}"
    advice = "free space or point cache_dir elsewhere; finished chunks are kept in work/"
    try:
        with disk_full_hint(tmp, advice):
            dataset.save_to_disk(str(tmp))
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # free what the failed write took
        raise
    shutil.rmtree(cache_dir / "data", ignore_errors=True)  # left by a run killed right here
    os.replace(tmp, cache_dir / "data")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **_fp_record(fp),
        "num_rows": len(dataset),
        "columns": dataset.column_names,
    }
    _write_json(cache_dir / "meta.json", meta)
    shutil.rmtree(cache_dir / "work", ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def _load_checked(rows, cache_dir: Path, fp: Fingerprint, check_rows: int | None):
    meta = read_meta(cache_dir)
    if meta.get("fingerprint") != fp.digest:
        raise CacheError(_mismatch(cache_dir, meta, fp, "The token-reward cache"))
    try:
        dataset = datasets.load_from_disk(str(cache_dir / "data"))
    except Exception as err:  # noqa: BLE001 -- any read failure means a damaged cache
        raise CacheError(
            f"Token-reward cache at {cache_dir} is damaged: its Arrow data in {cache_dir / 'data'} "
            f"cannot be read ({type(err).__name__}: {err}). Delete the folder and rerun."
        ) from err
    if len(dataset) != meta.get("num_rows") or len(dataset) != len(rows):
        raise CacheError(
            f"Token-reward cache at {cache_dir} has {len(dataset)} rows, its meta.json says "
            f"{meta.get('num_rows')} and the data has {len(rows)} pairs: delete it and rerun."
        )
    _check_ids(rows, dataset, cache_dir, check_rows)
    return dataset


def _check_ids(rows, dataset: datasets.Dataset, cache_dir: Path, check_rows: int | None) -> None:
    n = len(rows)
    step = 1 if check_rows is None or check_rows >= n else max(n // max(check_rows, 1), 1)
    picks = list(range(0, n, step))
    stored = dataset.select_columns(list(ID_COLUMNS)).select(picks).to_dict()
    for j, i in enumerate(picks):
        for column in ID_COLUMNS:
            if list(rows[i][column]) != stored[column][j]:
                raise CacheError(
                    f"Token-reward cache at {cache_dir} is stale: row {i} (source index "
                    f"{rows[i].get('index', i)}) has different {column} than the current "
                    "tokenization (tokenizer or truncation changed). Delete it and rerun."
                )
