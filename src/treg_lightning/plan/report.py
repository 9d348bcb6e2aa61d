"""The plan of a parsed config, as ``treg plan`` prints it and ``treg fit`` logs it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from treg_lightning.plan.estimate import GIB, Estimate, estimate, max_micro_batch
from treg_lightning.plan.settings import check_counts, settings_from_config
from treg_lightning.plan.shapes import PlanError, resolve_shape
from treg_lightning.plan.suggest import Suggestion, suggestions

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
DEFAULT_RESERVE = "1GiB"  # CUDA context, NCCL and cuBLAS workspaces, allocator slack


def parse_size(text: str | int | float, setting: str = "--plan.gpu_memory") -> float:
    """``"80GB"`` (10**9 bytes), ``"79.6GiB"`` (2**30), ``"81559MiB"``... -> bytes."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS:
        raise PlanError(
            f"{setting} {text!r} is not a size: give a number and a unit, e.g. 80GB (10^9 "
            "bytes) or 79.6GiB (2^30 bytes; an 80 GB H100 has 79.6 GiB)."
        )
    return float(match.group(1)) * _UNITS[unit]


@dataclass(frozen=True)
class PlanSettings:
    """The own settings of ``treg plan`` (``--plan.*``): the machines the run is planned for."""

    devices: int | None = None
    """Devices per node (>= 1); None: ``trainer.devices``."""

    num_nodes: int | None = None
    """Nodes (>= 1); None: ``trainer.num_nodes``."""

    gpu_memory: str | None = None
    """Memory of one device, e.g. 80GB (10^9 bytes) or 79.6GiB (2^30); None: 80GB, or this
    machine's RAM when trainer.accelerator is cpu."""

    reserve: str = DEFAULT_RESERVE
    """Memory kept aside per device (CUDA context, NCCL and cuBLAS workspaces)."""


@dataclass(frozen=True)
class Plan:
    """A configuration's estimate against a device's memory.

    Attributes:
        estimate: the per-device parts at the configured micro-batch.
        device_memory: bytes per device.
        reserve: bytes kept aside (CUDA context, communication buffers).
        max_micro_batch: the largest micro-batch (pairs) that fits; 0 when none does.
        suggestions: single changes and their peaks (listed when the configuration does not
            fit).
    """

    estimate: Estimate
    device_memory: float
    reserve: float
    max_micro_batch: int
    suggestions: tuple[Suggestion, ...]

    @property
    def budget(self) -> float:
        return self.device_memory - self.reserve

    @property
    def fits(self) -> bool:
        return self.estimate.peak <= self.budget


def plan_from_config(
    config: dict,
    devices: int | None = None,
    num_nodes: int | None = None,
    gpu_memory: str | float | None = None,
    reserve: str | float = DEFAULT_RESERVE,
) -> Plan:
    """The :class:`Plan` of a parsed ``treg`` config (``trainer``/``model``/``data`` dicts).

    Reads the model's config.json (see :func:`~treg_lightning.plan.shapes.resolve_shape`),
    never its weights, and instantiates nothing. ``gpu_memory`` defaults to 80GB, or to this
    machine's RAM for a CPU run.
    """
    check_counts(config, devices, num_nodes)
    model = config["model"]
    trust = bool(model.get("trust_remote_code"))
    shape = resolve_shape(model["model"], trust_remote_code=trust)
    settings = settings_from_config(config, shape.model_type, devices, num_nodes)
    reference = settings.reference_model
    reference_shape = shape
    if settings.live_reference and reference not in (None, settings.model):
        reference_shape = resolve_shape(reference, trust_remote_code=trust)
    if gpu_memory is None:
        gpu_memory = "80GB" if settings.device_type == "cuda" else machine_memory()
    memory = parse_size(gpu_memory, "--plan.gpu_memory")
    kept = parse_size(reserve, "--plan.reserve")
    budget = memory - kept
    if budget <= 0:
        raise PlanError(
            f"--plan.gpu_memory {gpu_memory} leaves nothing after --plan.reserve {reserve}: give "
            "the memory of one device (e.g. 80GB) and a smaller reserve."
        )
    result = estimate(settings, shape, reference_shape)
    best = max_micro_batch(settings, shape, budget, reference_shape)
    ideas = (
        ()
        if result.peak <= budget
        else tuple(suggestions(settings, shape, budget, reference_shape))
    )
    return Plan(result, memory, kept, best, ideas)


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f}"


def format_plan(plan: Plan, short: bool = False) -> str:
    """The plan as a table; ``short`` drops the header details and suggestions (fit log)."""
    est, s = plan.estimate, plan.estimate.settings
    shape = est.shape
    lines = []
    if not short:
        lines += [
            f"treg plan: {s.model} ({shape.model_type}, {shape.num_params() / 1e9:.2f}B "
            f"parameters; {shape.source})",
            f"  {s.world_size} device(s) ({s.devices} x {s.num_nodes} node(s)), "
            f"{s.sharding.name}; {s.param_dtype} weights, {s.compute_dtype} compute",
            f"  micro-batch {est.micro_batch} pairs = {2 * est.micro_batch} sequences x "
            f"{s.max_length} tokens; attention {s.attn_implementation} ({s.attn_note})",
        ]
        lines += [f"  note: {note}" for note in s.notes]
    lines.append(f"  {'per device':<26}{'GiB':>8}   how")
    for part in est.parts:
        name = part.name + (" *" if part.transient else "")
        lines.append(f"  {name:<26}{_gib(part.bytes)}   {part.detail}")
        if part.name == "activations":
            other = (
                est.activations_full if s.gradient_checkpointing else (est.activations_checkpointed)
            )  # held activations, as the line above
            label = "without" if s.gradient_checkpointing else "with"
            lines.append(f"    ({label} checkpointing{_gib(other)})")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(
        f"  {'total':<26}{_gib(est.peak)}   of {plan.budget / GIB:.2f} GiB usable "
        f"({plan.device_memory / GIB:.2f} GiB - {plan.reserve / GIB:.2f} GiB reserve): {verdict}"
    )
    lines.append("  * not held at the same time: the larger counts in the total")
    for part in est.host:
        lines.append(f"  {'CPU memory: ' + part.name:<26}{_gib(part.bytes)}   {part.detail}")
    best = plan.max_micro_batch
    lines.append(
        f"  largest micro-batch that fits: {best} pair(s) at max_length {s.max_length}"
        if best
        else "  no micro-batch fits at this length"
    )
    if plan.suggestions and not short:
        lines.append("  to fit, change one of (peak per device with that change alone):")
        for idea in plan.suggestions:
            mark = "fits" if idea.fits else "still too large"
            host = f" (+{idea.host / GIB:.1f} GiB CPU memory)" if idea.host else ""
            lines.append(
                f"    {idea.change:<34}{_gib(idea.peak)} GiB  {mark:<16}{idea.flags}{host}"
            )
    return "\n".join(lines)


def run_plan(config: dict, settings: PlanSettings = PlanSettings()) -> Plan:
    """``treg plan``: print the plan of the config; a bad setting exits with status 2."""
    import sys

    try:
        plan = plan_from_config(config, settings.devices, settings.num_nodes,
                                settings.gpu_memory, settings.reserve)  # fmt: skip
    except PlanError as err:
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(2) from err
    print(format_plan(plan), flush=True)
    return plan


def device_memory_of(trainer) -> float:
    """Memory of one device of a live trainer: the GPU's, else the machine's RAM."""
    import torch

    device = trainer.strategy.root_device
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return machine_memory()


def machine_memory() -> float:
    """Physical memory of this machine, in bytes."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def log_fit_plan(config: dict, trainer) -> Plan | None:
    """Log the plan at the start of ``fit`` (rank 0); a plan that cannot be made only warns."""
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

    try:
        plan = plan_from_config(
            config, trainer.num_devices, trainer.num_nodes, device_memory_of(trainer)
        )
    except Exception as err:  # the plan informs; it must never stop a run that may fit
        rank_zero_warn(f"memory plan skipped: {type(err).__name__}: {err}")
        return None
    rank_zero_info("memory plan (treg plan), per device:\n" + format_plan(plan, short=True))
    return plan
