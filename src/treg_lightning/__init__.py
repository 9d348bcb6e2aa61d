"""treg-lightning: preference optimization (DPO, IPO, SimPO) with T-REG token-level reward
regularization, as Lightning modules.

The package face. Layers, top to bottom (a package imports only what is below it, not even
inside a function; ``tests/test_layout.py`` checks every package):
``cli`` -> ``training`` / ``answers`` / ``plan`` -> ``module`` / ``data`` / ``rewards`` ->
``forward`` / ``models`` / ``metrics`` -> ``losses`` -> ``passes`` / ``outputs`` / ``pairs`` /
``errors``. Inside a layer, arrows run left to right only (``training`` -> ``answers``,
``module`` -> ``data`` -> ``rewards``, ``forward`` -> ``models``, ``pairs`` -> ``errors``).
"""

# The one version number: pyproject.toml reads it from here (setuptools dynamic version).
__version__ = "0.2.0"
