"""``treg plan``: the per-device memory of a run, from its config, building nothing.

A plain function with its own parser: the run's ``trainer`` / ``model`` / ``data`` sections
(the same YAML as ``treg fit``) plus the plan's own options; no trainer is made (it would need the
configured accelerator), no model or data loads (:mod:`treg_lightning.plan`).

Usage::

    treg plan --config configs/llama3_dpo_treg.yaml --devices 4 --gpu-memory 80GB
"""

from __future__ import annotations

from jsonargparse import ActionConfigFile
from lightning.pytorch.cli import LightningArgumentParser

from treg_lightning.cli.parser import TRegArgumentParser, add_treg_arguments
from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.module import PreferenceModule
from treg_lightning.plan.report import DEFAULT_RESERVE, run_plan
from treg_lightning.training.trainer import TRegTrainer


def plan_parser() -> LightningArgumentParser:
    """The parser of ``treg plan``: a run's config (as ``treg fit`` reads it) and the plan's
    options (``--devices``, ``--num_nodes``, ``--gpu_memory``, ``--reserve``)."""
    parser = TRegArgumentParser(
        prog="treg plan",
        description="Print the per-device memory of the run, from the model's config.json (no "
        "weights load).",
    )
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="A run's YAML config.")
    parser.add_argument("--seed_everything", type=bool | int, default=True, help="As in fit.")
    parser.add_lightning_class_args(TRegTrainer, "trainer")
    parser.set_defaults({"trainer.use_distributed_sampler": False})
    parser.add_lightning_class_args(PreferenceModule, "model", subclass_mode=False)
    parser.add_lightning_class_args(PreferenceDataModule, "data", subclass_mode=False)
    add_treg_arguments(parser)
    parser.add_argument("--devices", type=int | None, default=None,
                        help="Devices per node (default: trainer.devices).")  # fmt: skip
    parser.add_argument("--num_nodes", type=int | None, default=None,
                        help="Nodes (default: trainer.num_nodes).")  # fmt: skip
    parser.add_argument(
        "--gpu_memory",
        type=str | None,
        default=None,
        help="Memory of one device, e.g. 80GB (10^9 bytes) or 79.6GiB (2^30); default 80GB, or "
        "this machine's RAM when trainer.accelerator is cpu.",
    )
    parser.add_argument(
        "--reserve",
        type=str,
        default=DEFAULT_RESERVE,
        help="Memory kept aside per device (CUDA context, NCCL and cuBLAS workspaces).",
    )
    return parser


def plan_option(arg: str) -> str:
    """``--gpu-memory=80GB`` -> ``--gpu_memory=80GB`` (the plan's own options only)."""
    key, sep, value = arg.partition("=")
    if key.startswith("--") and "." not in key:
        key = "--" + key[2:].replace("-", "_")
    return key + sep + value


def plan_main(args: list[str]) -> None:
    """``treg plan ARGS``: parse, then print the plan (a bad setting exits with status 2)."""
    parser = plan_parser()
    config = parser.parse_args([plan_option(arg) for arg in args]).as_dict()
    run_plan(
        config,
        devices=config.get("devices"),
        num_nodes=config.get("num_nodes"),
        gpu_memory=config.get("gpu_memory"),
        reserve=config.get("reserve") or DEFAULT_RESERVE,
    )
