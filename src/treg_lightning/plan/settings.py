"""The run settings memory depends on, read from a parsed ``treg`` config without instantiating.

:func:`settings_from_config` takes the ``trainer`` / ``model`` / ``data`` sections as a plain dict
(``TRegCLI``'s parsed namespace, ``namespace.as_dict()``): ``class_path`` entries are imported to
read class attributes (a loss's ``needs_reference``, the strategy's kind) but nothing is built,
so a config written for GPUs plans on a CPU-only machine.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from treg_lightning.plan.activations import LoraSpec
from treg_lightning.plan.shapes import PlanError

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass(frozen=True)
class Sharding:
    """How weights, gradients and optimizer states are split over the devices.

    Attributes:
        name: the strategy, as printed.
        params: devices sharing one copy of the weights (1: every device holds all of them).
        grads: devices sharing one copy of the gradients.
        optim: devices sharing one copy of the optimizer states.
        fsdp: FSDP (all-gathers each unit's weights for compute).
        cpu_offload: sharded weights, gradients and optimizer states live in CPU memory.
        bucket_copy: DDP keeps its gradient buckets beside the gradients
            (``gradient_as_bucket_view: false``).
    """

    name: str
    params: int = 1
    grads: int = 1
    optim: int = 1
    fsdp: bool = False
    cpu_offload: bool = False
    bucket_copy: bool = False


@dataclass(frozen=True)
class RunSettings:
    """Everything the memory plan reads from the run's config."""

    model: str
    reference_model: str | None
    trust_remote_code: bool
    devices: int
    num_nodes: int
    device_type: str
    sharding: Sharding
    param_dtype: str
    compute_dtype: str
    attn_implementation: str
    attn_note: str
    packing: bool
    gradient_checkpointing: bool
    logp_chunk_size: int
    micro_batch: int
    max_length: int
    accumulate_grad_batches: int
    optimizer_states: int
    optimizer_name: str
    needs_reference: bool
    live_reference: bool
    lora: LoraSpec | None
    fsdp_sync_every_micro_batch: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def param_bytes(self) -> int:
        return _BYTES[self.param_dtype]

    @property
    def compute_bytes(self) -> int:
        return _BYTES[self.compute_dtype]


def import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise PlanError(f"Cannot import {class_path!r} named in the config: {err}") from err


def _class_and_args(value: Any) -> tuple[type | None, dict]:
    """``(class, init_args)`` of a config entry: a ``class_path`` dict, or an object."""
    if value is None:
        return None, {}
    if isinstance(value, dict):
        if "class_path" not in value:
            return None, {}
        return import_class(value["class_path"]), dict(value.get("init_args") or {})
    if isinstance(value, str):
        return None, {}
    # jsonargparse's lazy_instance subclasses the real class; a class attribute needs no init.
    cls = next(c for c in type(value).__mro__ if not c.__module__.startswith("jsonargparse"))
    return cls, {}


def _dtype_name(value: Any) -> str:
    from treg_lightning.models.loading import parse_dtype

    return str(parse_dtype(value)).removeprefix("torch.")


def count_devices(devices: Any) -> int | None:
    """Devices per node of a ``trainer.devices`` value; None when it is ``"auto"`` / ``-1``."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, int):
        return None if devices < 0 else devices
    text = str(devices).strip()
    if text in ("auto", "-1"):
        return None
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    return int(text) if text.isdigit() else None


def sharding_of(
    trainer: dict, world: int, devices: int, notes: list[str] | None = None
) -> Sharding:
    """The :class:`Sharding` of ``trainer.strategy`` on ``world`` processes.

    With ``notes`` (a device count given on the command line), an explicit
    ``data_parallel_size`` that no longer matches is re-derived and the change noted; without,
    the mismatch is an error, as it is for Lightning.
    """
    from lightning.pytorch.strategies import (
        DDPStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
        StrategyRegistry,
    )

    strategy = trainer.get("strategy", "auto")
    cls, args = _class_and_args(strategy)
    if cls is None and isinstance(strategy, str):
        if strategy == "auto":
            cls = DDPStrategy if world > 1 else SingleDeviceStrategy
        elif strategy in StrategyRegistry:
            entry = StrategyRegistry[strategy]
            cls, args = entry["strategy"], dict(entry.get("init_params") or {})
        else:
            raise PlanError(f"trainer.strategy {strategy!r} is not a strategy Lightning knows.")
    name = cls.__name__
    if issubclass(cls, ModelParallelStrategy):
        shards = _data_parallel_size(args, world, devices, notes)
        return Sharding(name + " (FSDP2)", shards, shards, shards, fsdp=True)
    if issubclass(cls, FSDPStrategy):
        kind = str(args.get("sharding_strategy", "FULL_SHARD")).rsplit(".", 1)[-1].upper()
        within = devices if kind.startswith("HYBRID") else world
        params = 1 if kind in ("NO_SHARD", "SHARD_GRAD_OP", "_HYBRID_SHARD_ZERO2") else within
        grads = 1 if kind == "NO_SHARD" else within
        offload = bool(args.get("cpu_offload"))
        return Sharding(f"{name} ({kind})", params, grads, grads, True, offload)
    if issubclass(cls, DDPStrategy):
        return Sharding(name, bucket_copy=not args.get("gradient_as_bucket_view", False))
    if world > 1:
        return Sharding(f"{name} (not modelled: planned as replicated)")
    return Sharding(name)


def _data_parallel_size(args: dict, world: int, devices: int, notes: list | None) -> int:
    tensor = args.get("tensor_parallel_size", "auto")
    tensor = devices if tensor == "auto" else int(tensor)
    data = args.get("data_parallel_size", "auto")
    data = world // tensor if data == "auto" else int(data)
    if data * tensor != world and notes is not None and world % tensor == 0:
        notes.append(
            f"data_parallel_size {data} of the config planned as {world // tensor} "
            f"for {world} devices (set it so in the run)"
        )
        data = world // tensor
    if data * tensor != world:
        raise PlanError(
            f"ModelParallelStrategy: data_parallel_size {data} x tensor_parallel_size {tensor} "
            f"must equal devices x num_nodes = {world} (as Lightning requires); for pure FSDP2 "
            f"set --trainer.strategy.init_args.data_parallel_size {world} "
            "--trainer.strategy.init_args.tensor_parallel_size 1."
        )
    return data


def _precision(trainer: dict) -> str:
    from lightning.fabric.connector import _convert_precision_to_unified_args

    return str(_convert_precision_to_unified_args(trainer.get("precision")) or "32-true")


def _optimizer_states(optimizer: Any) -> tuple[int, str, str | None]:
    """``(states per parameter, name, note)`` of ``model.optimizer`` (None: AdamW)."""
    import torch

    cls, args = _class_and_args(optimizer)
    if cls is None:
        return 2, "AdamW", None
    if issubclass(cls, (torch.optim.Adam, torch.optim.AdamW)):
        return (3 if args.get("amsgrad") else 2), cls.__name__, None
    if issubclass(cls, torch.optim.SGD):
        return (1 if args.get("momentum", 0) else 0), cls.__name__, None
    if issubclass(cls, (torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax)):
        return 2, cls.__name__, None
    return 2, cls.__name__, f"optimizer {cls.__name__} not modelled: 2 states assumed"


def serves_cached_reference(data: dict) -> bool:
    """Whether ``data.rewards`` caches reference log-probs, read from the config without
    building the source: ContrastiveRewards does unless ``store_reference_logps`` is false; a
    source of another class is taken not to (the plan then counts a live reference)."""
    rewards = data.get("rewards")
    if not isinstance(rewards, dict):
        return False
    if str(rewards.get("class_path", "")).rsplit(".", 1)[-1] != "ContrastiveRewards":
        return False
    return bool((rewards.get("init_args") or {}).get("store_reference_logps", True))


def lora_spec_of(model: dict) -> LoraSpec | None:
    """The :class:`LoraSpec` of ``model.peft`` (a ``peft.LoraConfig`` entry), or None."""
    value = model.get("peft")
    if value is None:
        return None
    if isinstance(value, dict):
        args = dict(value.get("init_args") or {})
    else:
        args = {k: getattr(value, k) for k in ("r", "lora_dropout", "target_modules", "use_dora")}
    targets = args.get("target_modules") or "all-linear"
    targets = targets if isinstance(targets, str) else tuple(targets)
    return LoraSpec(
        r=int(args.get("r", 8)),
        dropout=float(args.get("lora_dropout", 0.0)),
        target_modules=targets,
        use_dora=bool(args.get("use_dora", False)),
    )


def check_counts(config: dict, devices: int | None, num_nodes: int | None) -> None:
    """Refuse device counts and LoRA ranks a run cannot have, before anything is read.

    Raises:
        PlanError: ``--plan.devices`` / ``--plan.num_nodes`` below 1, ``trainer.devices`` 0 or
            below -1, ``trainer.num_nodes`` below 1, or a ``model.peft`` rank below 1 or dropout
            outside [0, 1).
    """
    for value, flag, what in ((devices, "--plan.devices", "devices per node"),
                              (num_nodes, "--plan.num_nodes", "machines")):  # fmt: skip
        if value is not None and int(value) < 1:
            raise PlanError(f"{flag} {value}: the number of {what} must be >= 1.")
    trainer = config.get("trainer") or {}
    configured = trainer.get("devices", "auto")
    if isinstance(configured, int) and configured < -1 or configured in (0, "0"):
        raise PlanError(
            f"trainer.devices {configured!r}: a run needs at least one device per node; set "
            "trainer.devices to a count >= 1 (-1 or 'auto': all of them), or pass --plan.devices N."
        )
    nodes = trainer.get("num_nodes")
    if num_nodes is None and nodes is not None and int(nodes) < 1:
        raise PlanError(f"trainer.num_nodes {nodes}: the number of machines must be >= 1.")
    peft = (config.get("model") or {}).get("peft")
    if peft is None:
        return
    args = dict(peft.get("init_args") or {}) if isinstance(peft, dict) else vars(peft)
    rank, dropout = args.get("r", 8), args.get("lora_dropout", 0.0)
    if rank is not None and int(rank) < 1:
        raise PlanError(
            f"model.peft r {rank}: the LoRA rank must be >= 1 (8 or 16 are usual); to train "
            "all weights instead, set model.peft: null."
        )
    if dropout is not None and not 0 <= float(dropout) < 1:
        raise PlanError(f"model.peft lora_dropout {dropout}: must be in [0, 1).")


def settings_from_config(
    config: dict, model_type: str, devices: int | None = None, num_nodes: int | None = None
) -> RunSettings:
    """:class:`RunSettings` from the parsed config (``trainer``, ``model``, ``data`` dicts).

    Args:
        config: the subcommand's parsed config as a dict.
        model_type: the policy's ``config.model_type`` (for the automatic attention kernel).
        devices: devices per node, overriding ``trainer.devices``.
        num_nodes: nodes, overriding ``trainer.num_nodes``.
    """
    from treg_lightning.models.loading import choose_attn_implementation, is_half

    trainer, model, data = config["trainer"], config["model"], config["data"]
    notes: list[str] = []
    per_node = devices or count_devices(trainer.get("devices", "auto"))
    if per_node is None:
        devices_set = trainer.get("devices")
        notes.append(f"trainer.devices={devices_set!r}: planned for 1; pass --plan.devices")
        per_node = 1
    nodes = num_nodes or int(trainer.get("num_nodes") or 1)
    overridden = devices is not None or num_nodes is not None
    sharding = sharding_of(trainer, per_node * nodes, per_node, notes if overridden else None)

    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator == "auto":
        import torch

        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = "cuda" if accelerator in ("gpu", "cuda") else accelerator

    precision = _precision(trainer)
    param_dtype = _dtype_name(model.get("torch_dtype") or "float32")
    if precision in ("bf16-true", "16-true"):
        param_dtype = "bfloat16" if precision.startswith("bf16") else "float16"
    compute_dtype = param_dtype
    if sharding.fsdp and "FSDP2" in sharding.name and model.get("fsdp_param_dtype"):
        compute_dtype = _dtype_name(model["fsdp_param_dtype"])
    elif precision in ("bf16-mixed", "16-mixed"):
        compute_dtype = "bfloat16" if precision.startswith("bf16") else "float16"
        notes.append(f"precision {precision}: activations planned in {compute_dtype} (autocast)")

    attn = model.get("attn_implementation")
    attn_note = "as configured"
    if attn in (None, "auto"):
        attn = choose_attn_implementation(None, device_type, model_type, compute_dtype)
        attn_note = "auto on this machine"
        if device_type == "cuda" and not is_half(compute_dtype):
            attn_note = f"auto: flash-attention takes no {compute_dtype} compute"
        elif device_type == "cuda" and "flash" not in attn:
            attn_note = (
                "auto: flash-attn is not installed here; add --model.attn_implementation "
                "flash_attention_2 to plan for a machine that has it"
            )
    packing = model.get("packing")
    packing = "flash" in attn if packing is None else bool(packing)

    checkpointing = bool(model.get("gradient_checkpointing"))
    strategy_args = _class_and_args(trainer.get("strategy"))[1]
    if strategy_args.get("activation_checkpointing_policy") is not None:
        checkpointing = True  # FSDPStrategy checkpoints the wrapped layers itself
    if "FSDP2" in sharding.name and model.get("fsdp_cpu_offload"):
        sharding = Sharding(**{**sharding.__dict__, "cpu_offload": True})

    states, optimizer_name, optimizer_note = _optimizer_states(model.get("optimizer"))
    if optimizer_note:
        notes.append(optimizer_note)
    if model.get("quantization") is not None:
        notes.append(f"4-bit base (model.quantization) not modelled: weights as {param_dtype}")
    loss_cls, _ = _class_and_args(model.get("loss"))
    needs_reference = bool(getattr(loss_cls, "needs_reference", False)) if loss_cls else False
    live = model.get("live_reference")
    if live is None:
        live = needs_reference and not serves_cached_reference(data)
    return RunSettings(
        model=str(model["model"]),
        reference_model=model.get("reference_model"),
        trust_remote_code=bool(model.get("trust_remote_code")),
        devices=per_node,
        num_nodes=nodes,
        device_type=device_type,
        sharding=sharding,
        param_dtype=param_dtype,
        compute_dtype=compute_dtype,
        attn_implementation=attn,
        attn_note=attn_note,
        packing=packing,
        gradient_checkpointing=checkpointing,
        logp_chunk_size=int(model.get("logp_chunk_size") or 1024),
        micro_batch=int(data.get("batch_size") or 1),
        max_length=int(data.get("max_length") or 2048),
        accumulate_grad_batches=int(trainer.get("accumulate_grad_batches") or 1),
        optimizer_states=states,
        optimizer_name=optimizer_name,
        needs_reference=needs_reference,
        live_reference=bool(live),
        lora=lora_spec_of(model),
        fsdp_sync_every_micro_batch=bool(model.get("fsdp_sync_every_micro_batch")),
        notes=tuple(notes),
    )
