"""What to change when a configuration does not fit: each single change with its peak, and the
cheapest combination when none fits alone."""

from __future__ import annotations

from dataclasses import dataclass, replace

from treg_lightning.plan.activations import LoraSpec
from treg_lightning.plan.estimate import estimate, max_micro_batch, unsynced_gradient_bytes
from treg_lightning.plan.settings import RunSettings, Sharding
from treg_lightning.plan.shapes import ModelShape


@dataclass(frozen=True)
class Suggestion:
    """A change to the config, the flags that make it, and its peak per device."""

    change: str
    flags: str
    peak: float
    fits: bool
    host: float = 0.0  # CPU memory per device it needs (offload)


def _options(settings: RunSettings) -> list[tuple[str, str, object]]:
    """``(change, flags, transform)`` of each single change that can lower the peak, cheapest
    first (the order changes are combined in when none fits alone)."""
    options = []
    if not settings.gradient_checkpointing:
        options.append(
            (
                "activation checkpointing",
                "--model.gradient_checkpointing true",
                lambda s: replace(s, gradient_checkpointing=True),
            )
        )
    if settings.live_reference and settings.lora is None:
        options.append(
            (
                "cached reference log-probs",
                "--model.live_reference false --data.rewards.store_reference_logps true",
                lambda s: replace(s, live_reference=False),
            )
        )
    if unsynced_gradient_bytes(settings, 1):
        options.append(
            (
                "FSDP2 gradient sync every micro-batch",
                "--model.fsdp_sync_every_micro_batch true",
                lambda s: replace(s, fsdp_sync_every_micro_batch=True),
            )
        )
    if not settings.sharding.fsdp and settings.world_size > 1:
        world = settings.world_size
        options.append(
            (
                f"FSDP2 over the {world} devices",
                "--config configs/strategy/fsdp2.yaml "
                f"--trainer.strategy.init_args.data_parallel_size {world}",
                lambda s: replace(s, sharding=_fsdp2(s.world_size, s.sharding)),
            )
        )
    if not settings.sharding.cpu_offload:
        options.append(
            (
                "FSDP2 CPU offload",
                "--model.fsdp_cpu_offload true"
                + (
                    ""
                    if "FSDP2" in settings.sharding.name
                    else " (with configs/strategy/fsdp2.yaml)"
                ),
                lambda s: replace(
                    s, sharding=replace(_fsdp2(s.world_size, s.sharding), cpu_offload=True)
                ),
            )
        )
    if settings.lora is None:
        options.append(
            (
                "LoRA r=16 on all linear layers",
                "model.peft: peft.LoraConfig(r=16)",
                lambda s: replace(s, lora=LoraSpec(r=16)),
            )
        )
    return options


def suggestions(
    settings: RunSettings,
    shape: ModelShape,
    budget: float,
    reference_shape: ModelShape | None = None,
) -> list[Suggestion]:
    """Each single change that lowers the peak, with its figure (at the configured batch); when
    none fits alone, the cheapest combination that does."""

    def peak(changed: RunSettings, batch: int | None = None) -> float:
        return estimate(changed, shape, reference_shape, batch).peak

    out = []
    for change, flags, transform in _options(settings):
        changed = estimate(transform(settings), shape, reference_shape)
        host = sum(part.bytes for part in changed.host)
        out.append(Suggestion(change, flags, changed.peak, changed.peak <= budget, host))
    more = _more_devices(settings, shape, budget, reference_shape)
    if more is not None:
        out.append(Suggestion(*more[:2], peak(more[2]), True))
    smaller = _smaller_batch(settings, shape, budget, reference_shape)
    if smaller is not None:
        out.append(Suggestion(*smaller[:2], peak(smaller[2], smaller[3]), True))
    if not any(idea.fits for idea in out):
        combined = _combination(settings, shape, budget, reference_shape)
        if combined is not None:
            out.append(combined)
    return out


def _smaller_batch(settings, shape, budget, reference_shape):
    best = max_micro_batch(settings, shape, budget, reference_shape)
    if not 0 < best < settings.micro_batch:
        return None
    accumulate = settings.accumulate_grad_batches * settings.micro_batch // best
    changed = replace(settings, micro_batch=best, accumulate_grad_batches=accumulate)
    return (
        f"micro-batch {best}",
        f"--data.batch_size {best} --trainer.accumulate_grad_batches {accumulate}",
        changed,
        best,
    )


def _combination(settings, shape, budget, reference_shape) -> Suggestion | None:
    """Apply the single changes in order, then a smaller micro-batch or more devices, until
    the plan fits."""
    changes, flags, current = [], [], settings
    for change, flag, transform in _options(settings):
        current = transform(current)
        changes.append(change)
        flags.append(flag)
        for extra in (_smaller_batch, _more_devices):
            found = extra(current, shape, budget, reference_shape)
            if found is not None:
                value = estimate(found[2], shape, reference_shape).peak
                return Suggestion(
                    " + ".join([*changes, found[0]]),
                    " ".join([*flags, found[1]]),
                    value,
                    value <= budget,
                )
        value = estimate(current, shape, reference_shape).peak
        if value <= budget:
            return Suggestion(" + ".join(changes), " ".join(flags), value, True)
    return None


def _fsdp2(world: int, like: Sharding | None = None) -> Sharding:
    offload = like is not None and like.cpu_offload
    return Sharding("ModelParallelStrategy (FSDP2)", world, world, world, True, offload)


def _more_devices(settings, shape, budget, reference_shape):
    """The fewest devices (powers of two past the current count) whose FSDP2 plan fits."""
    world = settings.world_size
    for count in (2**k for k in range(1, 11)):
        if count <= world:
            continue
        changed = replace(
            settings, sharding=_fsdp2(count, settings.sharding), devices=count, num_nodes=1
        )
        if estimate(changed, shape, reference_shape).peak <= budget:
            where = (
                f"--trainer.devices {count}"
                if count <= 8
                else (f"--trainer.devices 8 --trainer.num_nodes {count // 8}")
            )
            return (
                f"{count} devices with FSDP2",
                f"{where} --trainer.strategy.init_args.data_parallel_size {count}",
                changed,
            )
    return None
