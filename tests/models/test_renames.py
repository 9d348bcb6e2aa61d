"""Older class paths in checkpoints' hyperparameters are rewritten to today's modules
(treg_lightning.models.renames), and a parser error naming one is matched to today's path."""

from __future__ import annotations

import importlib

import pytest

from treg_lightning.models.renames import (
    MOVED_MODULES,
    current_path,
    renamed_paths,
    upgrade_hparams,
)

RENAMED_CLASSES = [
    ("treg_lightning.adapters.QLoRA", "treg_lightning.models.adapters.QLoRA"),
    ("treg_lightning.generation.VLLMBackend", "treg_lightning.answers.generation.VLLMBackend"),
    ("treg_lightning.callbacks.ExportOnFitEnd", "treg_lightning.training.callbacks.ExportOnFitEnd"),
    ("treg_lightning.guards.NonFiniteGuard", "treg_lightning.training.guards.NonFiniteGuard"),
    ("treg_lightning.schedulers.WarmupCosineLR", "treg_lightning.module.schedulers.WarmupCosineLR"),
    (
        "treg_lightning.training.schedulers.WarmupCosineLR",
        "treg_lightning.module.schedulers.WarmupCosineLR",
    ),
    ("treg_lightning.data.packing.pack_batch", "treg_lightning.forward.packing.pack_batch"),
]
UNCHANGED = [
    "treg_lightning.rewards.ContrastiveRewards",
    "treg_lightning.losses.DPOLoss",
    "treg_lightning.data.datamodule.PreferenceDataModule",
    "torch.optim.AdamW",
]


def _resolve(dotted: str):
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("old", "new"), RENAMED_CLASSES)
def test_old_class_path_is_rewritten_inside_hparams(old, new):
    assert current_path(old) == new
    _resolve(new)  # today's path imports
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old.rsplit(".", 1)[0])  # the old module does not
    hparams = {"scheduler": {"class_path": old, "init_args": {"x": [{"class_path": old}]}}}
    upgraded = upgrade_hparams(hparams)
    assert upgraded == {"scheduler": {"class_path": new, "init_args": {"x": [{"class_path": new}]}}}
    assert hparams["scheduler"]["class_path"] == old  # the input is not changed


@pytest.mark.parametrize("path", UNCHANGED)
def test_todays_paths_are_left_alone(path):
    _resolve(path)
    assert current_path(path) == path
    assert upgrade_hparams({"loss": {"class_path": path}}) == {"loss": {"class_path": path}}


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_every_table_entry_leads_to_a_live_module(old):
    """Each target imports (after the rename chain training.* -> module.*, no target is itself
    an old name)."""
    new = MOVED_MODULES[old]
    importlib.import_module(f"treg_lightning.{new}")
    assert current_path(f"treg_lightning.{new}") == f"treg_lightning.{new}"


def test_parser_errors_name_the_paths_to_rewrite():
    config_error = (
        'Parser key "model.scheduler": ... expects a function or a callable class: module '
        "'treg_lightning' has no attribute 'schedulers'. Got value: Namespace(class_path="
        "'treg_lightning.schedulers.WarmupCosineLR', init_args=Namespace(warmup_ratio=0.1))"
    )
    assert renamed_paths(config_error) == [
        (
            "treg_lightning.schedulers.WarmupCosineLR",
            "treg_lightning.module.schedulers.WarmupCosineLR",
        )
    ]
    flag_error = "module 'treg_lightning.data' has no attribute 'packing'"
    assert renamed_paths(flag_error) == [
        ("treg_lightning.data.packing", "treg_lightning.forward.packing")
    ]
    assert renamed_paths("Problem with given class_path 'treg_lightning.losses.DPOLoss'") == []
