"""Every private part of a dependency that treg overrides, calls or reads still exists, with the
signature the code relies on. A new release that renames one fails here, by name, instead of
breaking a run; pyproject.toml's upper bounds hold the tested range until this passes on the
next one. Each test names the place in treg that uses the hook."""

from __future__ import annotations

import argparse
import contextvars
import importlib.metadata
import inspect
import warnings
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser, lazy_instance
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from packaging.requirements import Requirement

from treg_lightning.cli.main import TRegCLI

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


# --- Lightning -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "parameters", "caller"),
    [
        # cli/main.py: drops a null --guard from the callbacks, fills data_parallel_size.
        ("_instantiate_trainer", ["self", "config", "callbacks"], LightningCLI.instantiate_trainer),
        # cli/main.py: Ctrl-C inside a verb becomes RunInterrupted with what was kept.
        ("_run_subcommand", ["self", "subcommand"], LightningCLI.__init__),
        # cli/main.py: --ckpt_path hyperparameters upgraded, sharded folders read.
        ("_parse_ckpt_path", ["self"], LightningCLI.__init__),
    ],
)
def test_overridden_lightning_cli_methods(name, parameters, caller):
    """The private method exists with this signature, Lightning still calls it through
    ``self`` (so the override runs), and TRegCLI's override keeps the signature."""
    assert _parameters(getattr(LightningCLI, name)) == parameters
    assert f"self.{name}(" in inspect.getsource(caller)
    assert getattr(TRegCLI, name) is not getattr(LightningCLI, name)
    assert _parameters(getattr(TRegCLI, name)) == parameters


def test_fit_loop_data_fetcher_and_combined_loader():
    """module/schedulers.py (estimated_training_steps) drops the loader loaded for the
    estimate: ``fit_loop._data_fetcher`` (torn down) and ``fit_loop._combined_loader``."""
    from lightning.pytorch.loops.fetchers import _DataFetcher

    fit_loop = Trainer(accelerator="cpu", logger=False).fit_loop
    assert fit_loop._data_fetcher is None and fit_loop._combined_loader is None
    assert _parameters(_DataFetcher.teardown) == ["self"]


def test_training_epoch_loop_counts_batches_that_stepped():
    """data/resumable.py (reopen_cut_epoch) corrects the epoch loop's saved
    ``_batches_that_stepped`` when it reopens an epoch cut by max_steps."""
    fit_loop = Trainer(accelerator="cpu", logger=False).fit_loop
    assert fit_loop.state_dict()["epoch_loop.state_dict"]["_batches_that_stepped"] == 0


def test_given_hyperparameters_context_var():
    """module/hparams.py (portable_hparams) asks whether LightningCLI is instantiating the
    module: ``hparams_mixin._given_hyperparameters`` is a ContextVar its instantiator sets."""
    from lightning.pytorch.core.mixins import hparams_mixin

    assert isinstance(hparams_mixin._given_hyperparameters, contextvars.ContextVar)
    assert hparams_mixin._given_hyperparameters.get() is None
    with hparams_mixin._given_hyperparameters_context({"a": 1}, "x.y"):
        assert hparams_mixin._given_hyperparameters.get() == {"a": 1, "_instantiator": "x.y"}


def test_hparams_instantiator_is_allowed_and_class_path_key_is_read():
    """module/hparams.py writes ``_instantiator: lightning.pytorch.cli.instantiate_module``
    (Lightning loads only allow-listed instantiators); cli/main.py and answers/evaluation.py
    read LightningCLI's ``_class_path`` key, which ``instantiate_module`` understands."""
    from lightning.pytorch.cli import instantiate_module
    from lightning.pytorch.core.saving import _ALLOWED_INSTANTIATORS

    assert "lightning.pytorch.cli.instantiate_module" in _ALLOWED_INSTANTIATORS
    assert _parameters(instantiate_module) == ["class_type", "config"]
    assert '"_class_path"' in inspect.getsource(instantiate_module)


def test_load_distributed_checkpoint():
    """models/checkpoints.py (read_state) consolidates a sharded checkpoint folder in memory."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    assert _parameters(_load_distributed_checkpoint) == ["checkpoint_folder"]


def test_convert_precision_to_unified_args():
    """plan/settings.py reads ``trainer.precision`` as Lightning does ("bf16" -> "bf16-mixed")."""
    from lightning.fabric.connector import _convert_precision_to_unified_args

    assert _parameters(_convert_precision_to_unified_args) == ["precision"]
    assert _convert_precision_to_unified_args("bf16") == "bf16-mixed"
    assert _convert_precision_to_unified_args(32) == "32-true"


def test_model_parallel_strategy_sizes():
    """cli/startup.py (fill_data_parallel_size) resolves data_parallel_size="auto" before
    the process group exists, through the strategy's two private sizes."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(tensor_parallel_size=2)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == ("auto", 2)


def test_lightning_module_trainer_attribute():
    """module/preference.py and module/vocab.py read ``_trainer`` (None when not attached;
    the public ``trainer`` property raises then)."""
    module = LightningModule()
    assert module._trainer is None
    with pytest.raises(RuntimeError):
        module.trainer  # noqa: B018


# --- argparse / jsonargparse -----------------------------------------------------------------


def test_argparse_action_lists():
    """cli/help.py (show_linked_target) puts a linked argument's help back in its group:
    ``parser._actions``, ``parser._action_groups`` and ``group._group_actions``."""
    parser = ArgumentParser()
    group = parser.add_argument_group("g")
    action = group.add_argument("--x.y", type=int)
    assert action in parser._actions
    assert group in parser._action_groups and action in group._group_actions


def test_subcommand_parsers_are_reachable():
    """cli/parser.py (did-you-mean keys of every verb) reads jsonargparse's
    ``_subcommands_action`` and argparse's ``_name_parser_map``."""
    parser = ArgumentParser()
    subcommands = parser.add_subcommands()
    fit = ArgumentParser()
    subcommands.add_subcommand("fit", fit)
    assert parser._subcommands_action is subcommands
    assert isinstance(subcommands, argparse._SubParsersAction)
    assert subcommands._name_parser_map["fit"] is fit


def test_docstring_parse_options_are_readable():
    """cli/parser.py (attribute_docstrings) reads jsonargparse's current attribute-docstring
    setting through ``jsonargparse._optionals.get_docstring_parse_options`` to restore it."""
    from jsonargparse import set_parsing_settings
    from jsonargparse._optionals import get_docstring_parse_options

    from treg_lightning.cli.parser import attribute_docstrings

    assert inspect.signature(get_docstring_parse_options).parameters == {}
    before = get_docstring_parse_options()["attribute_docstrings"]
    try:
        set_parsing_settings(docstring_parse_attribute_docstrings=False)
        with attribute_docstrings():
            assert get_docstring_parse_options()["attribute_docstrings"] is True
        assert get_docstring_parse_options()["attribute_docstrings"] is False
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=before)


def test_lazy_instance_public_description():
    """module/hparams.py (real_class) and module/preference.py read a ``lazy_instance`` through
    its public ``lazy_get_init_data`` / ``lazy_get_init_args`` (no private attribute)."""
    from treg_lightning.losses import SimPOLoss
    from treg_lightning.module.hparams import real_class

    lazy = lazy_instance(SimPOLoss, beta=3.0)
    assert lazy.lazy_get_init_data().class_path == "treg_lightning.losses.SimPOLoss"
    assert lazy.lazy_get_init_args().as_dict() == {"beta": 3.0}
    assert real_class(lazy) is SimPOLoss


# --- peft, torch, transformers ---------------------------------------------------------------


def test_peft_adapter_flag():
    """models/lora.py (adapters_disabled) flips ``_disable_adapters`` on each tuner layer
    itself: PEFT's public switch also (un)freezes the adapter weights, which under FSDP2 lands
    on whichever tensor a unit holds at the time."""
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    base = torch.nn.Sequential()
    base.add_module("q", torch.nn.Linear(4, 4))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q"]))
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(layer._disable_adapters is False for layer in layers)
    assert ModulesToSaveWrapper(torch.nn.Linear(2, 2), "default")._disable_adapters is False


def test_torch_checkpoint_wrapper():
    """models/parallel.py wraps each decoder layer for non-reentrant activation checkpointing
    (as Lightning's FSDP strategies do; torch has no public wrapper)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )

    assert _parameters(checkpoint_wrapper)[:2] == ["module", "checkpoint_impl"]
    default = inspect.signature(checkpoint_wrapper).parameters["checkpoint_impl"].default
    assert default is CheckpointImpl.NO_REENTRANT


def test_transformers_attention_and_split_modules():
    """forward/batch.py reads ``config._attn_implementation`` (models/loading.py sets it on a
    GGUF model's config); models/parallel.py finds the decoder layers by the model's
    ``_no_split_modules``."""
    from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig

    assert isinstance(inspect.getattr_static(PretrainedConfig, "_attn_implementation"), property)
    config = LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=16)  # fmt: skip
    config._attn_implementation = "eager"
    assert config._attn_implementation == "eager"
    assert LlamaForCausalLM._no_split_modules == ["LlamaDecoderLayer"]


def test_config_private_keys_are_left_out_of_cache_fingerprints():
    """rewards/cache/fingerprint.py leaves ``config.to_dict()``'s private keys (where a model
    was loaded from) out of a token-reward cache's fingerprint; a new private key would change
    every fingerprint and rebuild every cache."""
    from transformers import LlamaConfig

    from treg_lightning.rewards.cache.fingerprint import _VOLATILE_CONFIG_KEYS

    config = LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=16)  # fmt: skip
    private = {key for key in config.to_dict() if key.startswith("_")}
    assert private and private <= set(_VOLATILE_CONFIG_KEYS)


# --- the tested range ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lightning", "jsonargparse", "transformers", "peft"])
def test_hooked_dependencies_are_bounded_and_installed_in_range(name):
    """Each dependency used through private hooks has an upper bound, and the installed
    version (the one this file was run with) lies in the stated range."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    listed = project["dependencies"] + [r for extra in project["optional-dependencies"].values()
                                        for r in extra]  # fmt: skip
    requirements = [Requirement(r) for r in listed if Requirement(r).name == name]
    assert requirements, f"{name} is not a dependency"
    version = importlib.metadata.version(name)
    for requirement in requirements:
        assert any(spec.operator in ("<", "<=", "~=", "==") for spec in requirement.specifier)
        assert requirement.specifier.contains(version), f"{name} {version} not in {requirement}"


V5_REMOVAL = "\n    ``add_instantiator`` was deprecated in v4.49.0 and will be removed in v5.0.0.\n"


def _warn(message: str, category: type[Warning], module: str) -> list[str]:
    """Warn as a library attributing the warning to ``module`` does, under the suite's
    filters (pyproject.toml); the messages that were shown."""
    with warnings.catch_warnings(record=True) as caught:  # keeps the filters, records
        warnings.warn_explicit(message, category, "x.py", 1, module=module, registry={})
    return [str(w.message) for w in caught]


@pytest.mark.parametrize(
    ("category", "module"),
    [
        (DeprecationWarning, "treg_lightning.module.preference"),
        (FutureWarning, "treg_lightning.models.loading"),
        (PendingDeprecationWarning, "treg_lightning.cli.main"),
        (DeprecationWarning, "test_private_hooks"),
    ],
)
def test_a_deprecation_from_our_code_fails(category, module):
    with pytest.raises(category, match="renamed"):
        _warn("`old` is renamed", category, module)
    with pytest.raises(DeprecationWarning):  # not even a message ignored for Lightning's calls
        _warn(V5_REMOVAL, DeprecationWarning, module)


@pytest.mark.parametrize("module", ["lightning.pytorch.cli", "jsonargparse._core", "peft.utils"])
def test_a_deprecation_inside_a_dependency_shows(module):
    assert _warn("`old` is renamed", DeprecationWarning, module) == ["`old` is renamed"]
    assert _warn("`old` is renamed", FutureWarning, module) == ["`old` is renamed"]


def test_known_third_party_noise_is_ignored_by_message():
    assert _warn(V5_REMOVAL, DeprecationWarning, "lightning.pytorch.cli") == []
    treespec = "`isinstance(treespec, LeafSpec)` is deprecated, use ..."
    assert _warn(treespec, FutureWarning, "copyreg") == []
