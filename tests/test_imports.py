"""Every module of the package imports (a loss file that no longer imports is caught here, not
by a user). The list is whatever ``pkgutil.walk_packages`` finds at collection time."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import treg_lightning


def _module_names() -> list[str]:
    prefix = treg_lightning.__name__ + "."
    walked = pkgutil.walk_packages(treg_lightning.__path__, prefix, onerror=lambda name: None)
    return sorted([treg_lightning.__name__] + [info.name for info in walked])


MODULES = _module_names()


def test_the_walk_finds_the_core_modules():
    for name in (
        "treg_lightning.forward.logprobs",
        "treg_lightning.losses",
        "treg_lightning.losses.treg",
    ):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    module = importlib.import_module(name)
    for exported in getattr(module, "__all__", []):
        assert hasattr(module, exported), f"{name}.__all__ names {exported!r}, which is missing"
