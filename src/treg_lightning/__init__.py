"""treg-lightning: preference optimization (DPO, IPO, SimPO) with T-REG token-level reward
regularization, as Lightning modules.

The package face. Layout (arrows point down only; nothing imports what is above it, not even
inside a function; ``tests/test_layout.py`` checks every package):
``cli`` -> ``training`` / ``answers`` / ``plan`` -> ``module`` / ``data`` / ``rewards`` ->
``forward`` / ``models`` / ``metrics`` -> ``losses`` -> ``pairs`` / ``errors`` / ``outputs`` /
``passes``.
"""

# The one version number: pyproject.toml reads it from here (setuptools dynamic version).
__version__ = "0.2.0"
