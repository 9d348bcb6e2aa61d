"""The ``treg`` command: ``LightningCLI`` over :class:`PreferenceModule` and
:class:`PreferenceDataModule`.

Subcommands: Lightning's ``fit``, ``validate`` and ``test``, plus ``annotate``, ``export``,
``plan``, ``predict``, ``evaluate`` and ``audit``, each a method of
:class:`~treg_lightning.trainer.TRegTrainer` (LightningCLI builds their parsers from the
signatures). ``plan`` runs here without building the trainer, the model or the data. This module
holds the parsing: short usage and "did you mean" on errors, start-up checks before any weights
load, ``--ckpt_path`` checks (and hyperparameters of older checkpoints upgraded,
:func:`treg_lightning.hparams.upgrade_hparams`), exit statuses.

Usage::

    treg fit --config configs/demo.yaml
    treg fit --config configs/llama3_simpo_treg.yaml --trainer.devices 8
    treg export --config configs/demo.yaml --ckpt_path path/to.ckpt --output_dir policy/
    treg plan --config configs/llama3_dpo_treg.yaml --devices 4 --gpu-memory 80GB
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from treg_lightning import startup
from treg_lightning.checkpoints import check_checkpoint_file, check_checkpoint_fits, is_file_path
from treg_lightning.cli_help import (
    did_you_mean,
    option_keys,
    short_usage,
    show_linked_target,
    without_union_dump,
)
from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.exits import (
    DEBUG_FLAG,
    RunInterrupted,
    debug_requested,
    exit_statuses,
    interrupted_message,
)
from treg_lightning.guards import NonFiniteGuard
from treg_lightning.hparams import upgrade_hparams
from treg_lightning.module import PreferenceModule
from treg_lightning.noise import known_noise_hidden
from treg_lightning.outputs import check_not_overwriting, check_writable
from treg_lightning.trainer import TRegTrainer


class TRegArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose errors are short (the error and the ``--help`` tip, not
    the usage of every option) and suggest the close key for a misspelled one (a typo in a YAML
    key or flag, ``max_lenght``)."""

    def error(self, message: str, *args, **kwargs):
        message = did_you_mean(without_union_dump(str(message)), option_keys(self._all_usages()))
        return super().error(message, *args, **kwargs)

    def print_usage(self, file=None) -> None:
        usage = short_usage(self.format_usage())
        if usage:
            self._print_message(usage, file)

    def _all_usages(self) -> str:
        texts = [self.format_usage()]
        action = getattr(self, "_subcommands_action", None)
        for parser in getattr(action, "_name_parser_map", {}).values():
            texts.append(parser.format_usage())
        return "\n".join(texts)


class TRegCLI(LightningCLI):
    """``LightningCLI`` for preference optimization with T-REG.

    Links ``model.model`` to ``data.tokenizer`` (the policy's tokenizer tokenizes the data, and
    the evaluator defaults to it), adds the ``annotate`` and ``export`` subcommands and reads the
    run's settings from sharded checkpoint folders too.
    """

    def __init__(
        self,
        model_class=PreferenceModule,
        datamodule_class=PreferenceDataModule,
        trainer_class=TRegTrainer,
        **kwargs,
    ) -> None:
        kwargs.setdefault("parser_class", TRegArgumentParser)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # The optimizer and scheduler are the model's own arguments (model.optimizer, ...).
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault(
            "trainer_defaults",
            # PreferenceDataModule's LengthGroupedSampler already splits batches across
            # data-parallel ranks; Lightning must not wrap it in another sampler.
            {"use_distributed_sampler": False},
        )
        super().__init__(model_class, datamodule_class, trainer_class=trainer_class, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            **LightningCLI.subcommands(),
            "annotate": {"model", "datamodule"},
            "export": {"model", "datamodule"},
            "plan": {"model", "datamodule"},
            "predict": {"model", "datamodule"},
            "evaluate": {"model", "datamodule"},
            "audit": {"model", "datamodule"},
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        show_linked_target(parser, "model.model", "data.tokenizer")
        parser.add_argument(
            "--guard",
            type=NonFiniteGuard | None,
            default=lazy_instance(NonFiniteGuard),
            help="Stop (or skip the step) on a non-finite loss or gradient, naming the step and "
            "dataset rows, before the optimizer writes NaN into the weights; null disables it. "
            "E.g. --guard.action=skip --guard.max_skips=5.",
        )
        parser.callback_keys.append("guard")  # the instance joins the trainer's callbacks
        parser.add_argument(
            DEBUG_FLAG,
            action="store_true",
            help="Show the traceback of user errors and interrupts too (or set TREG_DEBUG=1).",
        )

    # ---- plan: parse the config, build nothing ------------------------------------------------

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        # --gpu-memory as well as --gpu_memory (jsonargparse only knows the latter).
        if args is None and sys.argv[1:2] == ["plan"]:
            sys.argv[1:] = [_plan_option(arg) for arg in sys.argv[1:]]
        elif isinstance(args, (list, tuple)) and args[:1] == ["plan"]:
            args = [_plan_option(arg) for arg in args]
        super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        if self.subcommand == "plan":  # the trainer would need the configured accelerator
            self.config_init = self.config
            self.model = self.datamodule = self.trainer = None
            return
        super().instantiate_classes()

    def _run_plan(self) -> None:
        from treg_lightning.plan.report import run_plan

        config = self.config["plan"].as_dict()
        run_plan(
            config,
            devices=config.get("devices"),
            num_nodes=config.get("num_nodes"),
            gpu_memory=config.get("gpu_memory"),
            reserve=config.get("reserve") or "1GiB",
        )

    def _instantiate_trainer(self, config, callbacks):
        trainer = super()._instantiate_trainer(config, [c for c in callbacks if c is not None])
        startup.fill_data_parallel_size(trainer)
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand == "plan":
            return self._run_plan()
        try:
            super()._run_subcommand(subcommand)
        except (KeyboardInterrupt, SystemExit) as stop:
            # Lightning turns Ctrl-C inside fit/validate into sys.exit(1) after its shutdown.
            if isinstance(stop, SystemExit) and not getattr(self.trainer, "interrupted", False):
                raise
            message = interrupted_message(subcommand, self.trainer, self.datamodule)
            raise RunInterrupted(message) from None

    # --- start-up checks: every launched process runs them before any model or data loads ---

    def before_fit(self) -> None:
        self.check_inputs()
        self._check_ckpt_fits()
        startup.check_run_outputs(self.trainer)
        from treg_lightning.plan.report import log_fit_plan

        log_fit_plan(self.config[self.subcommand].as_dict(), self.trainer)
        check_writable(self.output_folders())
        startup.skip_validation_without_data(self.trainer, self.datamodule)

    def before_validate(self) -> None:
        startup.require_data(self.datamodule, "val", "treg validate")
        self.check_inputs()
        self._check_ckpt_fits()

    def before_test(self) -> None:
        startup.require_data(self.datamodule, "test", "treg test")
        self.check_inputs()
        self._check_ckpt_fits()

    def before_annotate(self) -> None:
        check_writable(self.output_folders())

    def check_inputs(self) -> None:
        """The start-up check of what the loss and regularizer need against the data's reward
        source (:func:`treg_lightning.checks.check_pair_inputs`), before any model loads."""
        if isinstance(self.model, PreferenceModule):
            self.model.check_inputs(self.datamodule)
            self.model.check_device(self.trainer.strategy.root_device.type)

    def before_export(self) -> None:
        config = self.config_init[self.subcommand]
        output_dir = config.get("output_dir")
        self._check_ckpt_fits()
        check_not_overwriting(output_dir, "--output_dir", config.get("overwrite"), "--overwrite")
        check_writable([("--output_dir", output_dir)])

    def _check_ckpt_fits(self) -> None:
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if is_file_path(ckpt_path) and hasattr(self.model, "model_name"):
            check_checkpoint_fits(ckpt_path, self.model)

    def output_folders(self) -> list[tuple[str, object]]:
        """``(setting, folder)`` of every folder the run will write, for the start-up check."""
        from treg_lightning.callbacks import ExportOnFitEnd

        trainer = self.trainer
        folders = [("trainer.default_root_dir", trainer.default_root_dir)]
        for logger in trainer.loggers:
            folders.append(("trainer.logger save_dir", getattr(logger, "save_dir", None)))
        for callback in trainer.callbacks:
            if getattr(callback, "dirpath", None) is not None:
                folders.append(("ModelCheckpoint dirpath", callback.dirpath))
            if isinstance(callback, ExportOnFitEnd):
                # Paths in the run's own folder are covered by the logger's save_dir: creating
                # them now would make the logger find its new version folder "not empty".
                settings = {
                    "export_dir": callback.export_dir,
                    "heatmap_path": callback.heatmap_path,
                }
                paths = callback.paths(trainer.log_dir)
                for name, path in paths.items():
                    if path is not None and "{log_dir}" not in settings[name]:
                        folder = path if name == "export_dir" else path.parent
                        folders.append((f"ExportOnFitEnd {name}", folder))
        data = self.datamodule
        rewards = data.rewards if isinstance(data, PreferenceDataModule) else None
        if rewards is not None and rewards.cache_folder is not None:
            folders.append(("data.rewards.cache_dir", rewards.cache_folder))
        return folders

    def _parse_ckpt_path(self) -> None:
        """As Lightning's, for ``.ckpt`` files and sharded checkpoint folders (their
        ``meta.pt``) alike: the checkpoint's module hyperparameters, upgraded to today's names
        (:func:`upgrade_hparams`), fill the ``model`` section. A file that cannot be a checkpoint
        (empty, truncated, text, foreign) is refused first, naming the file."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return
        source = Path(ckpt_path)
        if is_file_path(ckpt_path):
            check_checkpoint_file(ckpt_path)
        if source.is_dir():
            source = source / "meta.pt"
        if not source.is_file():
            return  # "last", a folder without hyperparameters: nothing to fill in
        # mmap: only the hyperparameters are read, not the weights and optimizer states
        saved = torch.load(source, weights_only=True, map_location="cpu", mmap=True)
        saved = saved.get("hyper_parameters")
        hparams = upgrade_hparams(dict(saved or {}), source=str(source))
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:  # a module saved outside the CLI
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing the hyperparameters of {source} failed!\n")
            raise


def _plan_option(arg: str) -> str:
    """``--gpu-memory=80GB`` -> ``--gpu_memory=80GB`` (top-level options of ``plan`` only)."""
    key, sep, value = arg.partition("=")
    if key.startswith("--") and "." not in key:
        key = "--" + key[2:].replace("-", "_")
    return key + sep + value


def cli_main(args: ArgsType = None) -> None:
    """Entry point of the ``treg`` command; ``args`` replaces ``sys.argv[1:]`` (for tests).

    Returns None, so the console script exits with status 0. A user error prints one paragraph
    and exits with status 2, Ctrl-C says what was kept and exits with 130 (see
    :mod:`treg_lightning.exits`); known third-party noise is hidden (:mod:`treg_lightning.noise`).
    Use ``TRegCLI(args=...)`` to keep the trainer, model and datamodule at hand (it raises).
    """
    # Parse errors are the parser's own messages and exit as they are (JSONARGPARSE_DEBUG=true
    # shows the parser's internals).
    with exit_statuses(debug_requested(args)), known_noise_hidden():
        TRegCLI(args=args)


if __name__ == "__main__":
    cli_main()
