"""One version number: ``treg_lightning.__version__``, which the installed package's metadata
(pyproject.toml's dynamic version) reads."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

import treg_lightning

tomllib = pytest.importorskip("tomllib")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_takes_the_version_from_the_package():
    config = tomllib.loads(PYPROJECT.read_text())
    assert "version" not in config["project"]
    assert "version" in config["project"]["dynamic"]
    dynamic = config["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "treg_lightning.__version__"}


def test_installed_metadata_matches_the_package():
    assert importlib.metadata.version("treg-lightning") == treg_lightning.__version__ == "0.2.0"
