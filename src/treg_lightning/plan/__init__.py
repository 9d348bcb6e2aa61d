"""``treg plan``: per-device memory of a run from the model's config.json and the run settings.

No weights are read and nothing is instantiated: :func:`plan_from_config` takes the parsed
config (``trainer`` / ``model`` / ``data`` dicts) and returns a :class:`Plan`; :mod:`.report`
prints it.
"""

from treg_lightning.plan.estimate import Estimate, Part, estimate, max_micro_batch
from treg_lightning.plan.report import Plan, parse_size, plan_from_config
from treg_lightning.plan.settings import RunSettings, settings_from_config
from treg_lightning.plan.shapes import SHIPPED_SHAPES, ModelShape, PlanError, resolve_shape

__all__ = [
    "SHIPPED_SHAPES",
    "Estimate",
    "ModelShape",
    "Part",
    "Plan",
    "PlanError",
    "RunSettings",
    "estimate",
    "max_micro_batch",
    "parse_size",
    "plan_from_config",
    "resolve_shape",
    "settings_from_config",
]
