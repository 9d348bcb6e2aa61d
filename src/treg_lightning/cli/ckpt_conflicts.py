"""``--ckpt_path`` against the model settings the user gave: a contradiction is refused.

The checkpoint's module hyperparameters fill the ``model`` section of every verb that takes
``--ckpt_path`` (``fit``, ``validate``, ``test``, ``export``, ``predict``). A setting the user
gave (a flag or a ``--config`` file) that the checkpoint would replace with another value is a
contradiction: the run would use a loss, regularizer or LoRA setting the user did not ask for.
It is refused at start-up, naming both values, before anything loads.

The folders of the weights (``model.model``, ``model.reference_model``) are not settings of the
run but where its files are (they move between machines): a flag naming another folder is used,
the log says so, and the start-up check of the checkpoint's weight shapes runs against it.
"""

from __future__ import annotations

import logging
from typing import Any

from treg_lightning.errors import ConfigError

log = logging.getLogger(__name__)

# Model settings that name a folder: the user's value is used (see the module docstring).
LOCATION_KEYS = ("model", "reference_model")


def flatten(settings: Any, prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"init_args": {"beta": 2}}}`` -> ``{"loss.init_args.beta": 2}``."""
    if hasattr(settings, "as_dict"):  # a jsonargparse Namespace
        settings = settings.as_dict()
    if not isinstance(settings, dict) or not settings:
        return {prefix: settings} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def given_model_settings(parser, args: list[str], subcommand: str) -> dict[str, Any]:
    """The ``model`` settings the command line and its ``--config`` files give (defaults left
    out), flattened to dotted keys (:func:`flatten`)."""
    try:  # the same arguments parsed once already: this parse is expected to pass
        given = parser.parse_args(list(args), defaults=False)
    except SystemExit:
        return {}
    section = given.get(subcommand)
    model = section.get("model") if section is not None else None
    return flatten(model) if model is not None else {}


def keep_given_locations(
    hparams: dict[str, Any], given: dict[str, Any], source: str
) -> dict[str, Any]:
    """``hparams`` without the folder settings the user gave (their value is used); logs each
    one that differs from the checkpoint's."""
    kept = dict(hparams)
    for key in LOCATION_KEYS:
        if key in given and key in kept:
            saved = kept.pop(key)
            if saved != given[key]:
                log.warning(
                    "model.%s: using %s (given) instead of %s (the folder %s was trained "
                    "from); its weight shapes are checked against the checkpoint.",
                    key,
                    given[key],
                    saved,
                    source,
                )
    return kept


def _same(given: Any, merged: Any) -> bool:
    if isinstance(given, list) and isinstance(merged, list):
        if all(isinstance(v, str) for v in given + merged):  # target_modules: a set in peft
            return sorted(given) == sorted(merged)
    return given == merged


def conflicting_settings(given: dict[str, Any], merged: dict[str, Any]) -> list[tuple]:
    """``(key, given value, checkpoint value)`` of each given setting that the checkpoint's
    hyperparameters replaced (``merged``: the flattened ``model`` section after the merge)."""
    found = []
    for key, value in given.items():
        if key.split(".")[0] in LOCATION_KEYS:
            continue
        saved = _lookup(merged, key)
        if saved is not _ABSENT and not _same(value, saved):
            found.append((key, value, saved))
    return found


_ABSENT = object()


def _lookup(merged: dict[str, Any], key: str) -> Any:
    """The merged value at ``key``: the leaf, the subtree under it (``--model.peft=null`` given,
    a LoRA config saved), or None where a parent is None (``--model.peft.r=8`` given, no LoRA
    saved); ``_ABSENT`` where the checkpoint says nothing of it."""
    if key in merged:
        return merged[key]
    below = {k[len(key) + 1 :]: v for k, v in merged.items() if k.startswith(key + ".")}
    if below:
        return below
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:end])
        if parent in merged:
            return merged[parent] if merged[parent] is None else _ABSENT
    return _ABSENT


def check_no_conflicts(given: dict[str, Any], merged: Any, ckpt_path: str) -> None:
    """Refuse a checkpoint whose hyperparameters contradict settings the user gave.

    Args:
        given: the user's model settings (:func:`given_model_settings`).
        merged: the ``model`` section once the checkpoint's hyperparameters filled it.
        ckpt_path: the checkpoint, named in the message.

    Raises:
        ConfigError: naming each setting, the given value and the checkpoint's.
    """
    conflicts = conflicting_settings(given, flatten(merged))
    if not conflicts:
        return
    listed = "; ".join(
        f"--model.{key}={_shown(value)} but the checkpoint has {_shown(saved)}"
        for key, value, saved in conflicts
    )
    keys = ", ".join(f"--model.{key}" for key, _, _ in conflicts)
    raise ConfigError(
        f"--ckpt_path {ckpt_path} was trained with other model settings than the ones given: "
        f"{listed}. A checkpoint's settings cannot be changed by a flag (the run would silently "
        f"use the checkpoint's): drop {keys} (from the command line or the --config file) to use "
        "the checkpoint's settings, or start a new run without --ckpt_path."
    )


def _shown(value: Any) -> str:
    return "null" if value is None else str(value)
