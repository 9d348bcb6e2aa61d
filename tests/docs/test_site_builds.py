"""The documentation site builds with `mkdocs build --strict`, as `make docs` runs it: no broken
link or anchor, no page left out of the nav, no griffe warning on a docstring of the API pages.

Skipped where mkdocs is not installed (the `docs` extra; `make install` has it)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
MISSING = [name for name in PACKAGES if importlib.util.find_spec(name.split(".")[0]) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"the docs extra is not installed ({MISSING})")
def test_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    # The pages are there, the API reference is rendered from the docstrings, and the
    # benchmarks page is bench/README.md with its images.
    module = (site / "api" / "module.html").read_text()
    assert "compute_loss" in module and "live_reference" in module
    benchmarks = (site / "benchmarks.html").read_text()
    assert "Verdicts" in benchmarks and 'src="results/replicate/curves.png"' in benchmarks
    assert (site / "results" / "replicate" / "curves.png").is_file()
    onpolicy = (site / "onpolicy.html").read_text()
    assert 'href="benchmarks.html#onpolicy_looppy' in onpolicy  # ../bench/README.md rewritten
