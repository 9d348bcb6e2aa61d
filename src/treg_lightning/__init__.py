"""treg-lightning: preference optimization (DPO, IPO, SimPO) with T-REG token-level reward
regularization, as Lightning modules.

The package face. Layout (arrows point down only; nothing imports what is above it):
``cli`` -> ``training`` / ``answers`` / ``plan`` -> ``module`` / ``data`` / ``rewards`` ->
``forward`` / ``models`` -> ``losses`` -> ``pairs`` / ``errors`` / ``passes``.

Modules that an earlier version kept at the package root (``treg_lightning.adapters``,
``treg_lightning.generation``, ...) still import under their old names, so class paths in older
configs and checkpoints resolve; :data:`MOVED_MODULES` maps each old name to the new one.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

__version__ = "0.2.0"

# Old module name (under treg_lightning.) -> where it lives now. ``models``, ``forward`` and ``cli``
# were modules and are packages now, under the same names.
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
    "schedulers": "training.schedulers",
    "seeding": "training.seeding",
    "hparams": "training.hparams",
    "checks": "training.checks",
    "vocab": "training.vocab",
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


def current_path(dotted: str) -> str:
    """A dotted path (``treg_lightning.adapters.QLoRA``) in today's module names; unchanged
    when it names no moved module."""
    prefix = __name__ + "."
    if not dotted.startswith(prefix):
        return dotted
    rest = dotted[len(prefix) :]
    for old in sorted(MOVED_MODULES, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return prefix + MOVED_MODULES[old] + rest[len(old) :]
    return dotted


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``treg_lightning.<old name>`` as the module it moved to (the same module object,
    so classes compare equal whichever name loaded them)."""

    def __init__(self) -> None:
        self._own_specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + ".") and current_path(fullname) != fullname:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(current_path(spec.name))
        self._own_specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # The import system has just set the old name's spec on the module: give it back its own.
        module.__spec__ = self._own_specs.pop(module.__name__)


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
