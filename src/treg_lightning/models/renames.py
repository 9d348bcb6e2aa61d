"""Names that earlier versions wrote into checkpoints and configs, in today's names.

A checkpoint keeps the module hyperparameters it was trained with, class paths included
(``scheduler: {class_path: treg_lightning.schedulers.WarmupCosineLR}``), and a user's config
names classes the same way. Modules have moved since (the root modules went into packages; the
module's own helpers left ``training/``), so :func:`upgrade_hparams` rewrites a checkpoint's
hyperparameters to today's names when they are read (every verb reads them through
:func:`treg_lightning.models.checkpoints.read_hparams`), and :func:`renamed_paths` finds the
older paths in a parser error, for the one-line hint ``treg`` prints under it. The old modules
themselves do not import: a config gets the hint, not a silent alias.
"""

from __future__ import annotations

import re
from typing import Any

from treg_lightning.errors import CheckpointError

PACKAGE = "treg_lightning"

# Old module name (under treg_lightning.) -> where it lives now. ``models``, ``forward``, ``cli``
# and ``module`` were modules and are packages now, under the same names.
MOVED_MODULES = {
    "logprobs": "forward.logprobs",
    "data.packing": "forward.packing",
    "data.shared_prompt": "forward.shared_prompt",
    "parallel": "models.parallel",
    "lora": "models.lora",
    "adapters": "models.adapters",
    "export": "models.export",
    "checkpoints": "models.checkpoints",
    "trainer": "training.trainer",
    "callbacks": "training.callbacks",
    "guards": "training.guards",
    "schedulers": "module.schedulers",
    "seeding": "module.seeding",
    "hparams": "module.hparams",
    "checks": "module.checks",
    "vocab": "module.vocab",
    "training.schedulers": "module.schedulers",
    "training.seeding": "module.seeding",
    "training.hparams": "module.hparams",
    "training.checks": "module.checks",
    "training.vocab": "module.vocab",
    "generation": "answers.generation",
    "predictions": "answers.predictions",
    "prompt_sets": "answers.prompt_sets",
    "reward_model": "answers.reward_model",
    "evaluation": "answers.evaluation",
    "plots": "answers.plots",
    "cli_help": "cli.help",
    "exits": "cli.exits",
    "noise": "cli.noise",
    "startup": "cli.startup",
}

# The regularizer's ``token_rewards`` string of checkpoints written before targets became objects
# (treg_lightning.losses.targets), and the class each string meant.
TARGETS_OF_OLD_NAMES = {
    "self": "treg_lightning.losses.targets.SelfGeneratedRewards",
    "sft": "treg_lightning.losses.targets.ChosenSFT",
    "implicit": "treg_lightning.losses.targets.ImplicitRewards",
}


def current_path(dotted: str) -> str:
    """A dotted path (``treg_lightning.adapters.QLoRA``) in today's module names; unchanged
    when it names no moved module."""
    prefix = PACKAGE + "."
    if not dotted.startswith(prefix):
        return dotted
    rest = dotted[len(prefix) :]
    for old in sorted(MOVED_MODULES, key=len, reverse=True):  # data.packing before data
        if rest == old or rest.startswith(old + "."):
            return prefix + MOVED_MODULES[old] + rest[len(old) :]
    return dotted


def current_class_paths(value: Any) -> Any:
    """``value`` with every ``class_path`` string in today's module names (a copy)."""
    if isinstance(value, dict):
        return {
            k: current_path(v)
            if k == "class_path" and isinstance(v, str)
            else current_class_paths(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [current_class_paths(v) for v in value]
    return value


def upgrade_hparams(hparams: dict[str, Any], source: str = "the checkpoint") -> dict[str, Any]:
    """The module hyperparameters of an older checkpoint in today's names (a new dict).

    ``regularizer.init_args.token_rewards: self | sft | implicit`` becomes
    ``regularizer.init_args.targets: {class_path: SelfGeneratedRewards | ChosenSFT |
    ImplicitRewards}``, and class paths through modules that have moved since
    (``treg_lightning.schedulers.WarmupCosineLR``) name today's module (:data:`MOVED_MODULES`);
    anything else is returned as it is. ``source`` names the file in errors.

    Raises:
        CheckpointError: a ``token_rewards`` value that no version wrote.
    """
    hparams = current_class_paths(hparams)
    regularizer = hparams.get("regularizer")
    init_args = regularizer.get("init_args") if isinstance(regularizer, dict) else None
    if not isinstance(init_args, dict) or "token_rewards" not in init_args:
        return dict(hparams)
    init_args = dict(init_args)
    old = init_args.pop("token_rewards")
    if old not in TARGETS_OF_OLD_NAMES:
        raise CheckpointError(
            f"{source}: its hyperparameters say regularizer.token_rewards={old!r}, which no "
            f"version of treg-lightning wrote (known: {', '.join(TARGETS_OF_OLD_NAMES)}). Pass "
            "the model settings in the config and load the weights with a new run instead."
        )
    init_args["targets"] = {"class_path": TARGETS_OF_OLD_NAMES[old]}
    return {**hparams, "regularizer": {**regularizer, "init_args": init_args}}


_DOTTED = re.compile(rf"\b{PACKAGE}(?:\.\w+)+")
# Python's message when ``import_module("treg_lightning").schedulers`` fails.
_NO_ATTRIBUTE = re.compile(rf"module '({PACKAGE}(?:\.\w+)*)' has no attribute '(\w+)'")


def renamed_paths(message: str) -> list[tuple[str, str]]:
    """``[(old, new)]`` for each older dotted path that a parser error names, in order.

    A config's ``class_path: treg_lightning.schedulers.WarmupCosineLR`` is named whole in the
    error; a flag's value only as the import failure ``module 'treg_lightning' has no attribute
    'schedulers'``, which gives the old module (``treg_lightning.schedulers``).
    """
    found = _DOTTED.findall(message)
    found += [f"{module}.{attribute}" for module, attribute in _NO_ATTRIBUTE.findall(message)]
    pairs: list[tuple[str, str]] = []
    for old in found:
        new = current_path(old)
        if new != old and (old, new) not in pairs:
            pairs.append((old, new))
    # A module path inside a full class path already named says nothing more.
    return [(o, n) for o, n in pairs if not any(p != o and p.startswith(o + ".") for p, _ in pairs)]
