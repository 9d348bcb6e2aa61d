"""The ``treg`` command: ``LightningCLI`` over :class:`PreferenceModule` and
:class:`PreferenceDataModule`.

Subcommands: Lightning's ``fit``, ``validate`` and ``test``, plus ``annotate``, ``export``,
``predict``, ``evaluate``, ``audit``, ``pairs`` and ``plan``, each a method of
:class:`~treg_lightning.training.trainer.TRegTrainer` (LightningCLI builds their parsers from the
signatures: a verb's flags are the fields of its settings dataclasses, ``--GROUP.FIELD``).
``plan`` builds no trainer, model or data: it runs on the parsed config alone. This module holds
the parsing: short usage and "did you mean" on errors, start-up checks before any weights load,
``--ckpt_path`` checks (and hyperparameters of older checkpoints upgraded,
:func:`treg_lightning.models.checkpoints.upgrade_hparams`), exit statuses.

Usage::

    treg fit --config configs/demo.yaml
    treg fit --config configs/llama3_simpo_treg.yaml --trainer.devices 8
    treg export --config configs/demo.yaml --ckpt_path path/to.ckpt --output.path policy/
    treg plan --config configs/llama3_dpo_treg.yaml --plan.devices 4 --plan.gpu_memory 80GB
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from treg_lightning.cli import ckpt_conflicts, startup
from treg_lightning.cli.exits import (
    RunInterrupted,
    debug_requested,
    exit_statuses,
    interrupted_message,
)
from treg_lightning.cli.noise import known_noise_hidden
from treg_lightning.cli.parser import TRegArgumentParser, add_treg_arguments
from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.models.adapters import check_lora_targets, refuse_adalora
from treg_lightning.models.checkpoints import check_checkpoint_fits, is_file_path, read_hparams
from treg_lightning.module import PreferenceModule
from treg_lightning.outputs import check_not_overwriting, check_writable
from treg_lightning.plan.report import PlanSettings, log_fit_plan
from treg_lightning.training.callbacks import ExportOnFitEnd
from treg_lightning.training.trainer import TRegTrainer


class TRegCLI(LightningCLI):
    """``LightningCLI`` for preference optimization with T-REG.

    Links ``model.model`` to ``data.tokenizer`` (the policy's tokenizer tokenizes the data, and
    the evaluator defaults to it), adds the verbs of
    :class:`~treg_lightning.training.trainer.TRegTrainer` as subcommands (``plan`` instantiates
    nothing) and reads the run's settings from sharded checkpoint folders too.
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
            "predict": {"model", "dataloaders", "datamodule", "return_predictions", "weights_only"},
            "evaluate": {"model", "datamodule"},
            "audit": {"model", "datamodule"},
            "pairs": {"model", "datamodule"},
            "plan": {"config"},  # the parsed config itself, handed over by _run_subcommand
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_treg_arguments(parser)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        self._given_args = sys.argv[1:] if args is None else args  # for --ckpt_path conflicts
        super().parse_arguments(parser, args)
        if self.config.get("subcommand") == "plan":
            self.config["plan"]["seed_everything"] = False  # nothing runs: no seed to set or log

    def _instantiate_trainer(self, config, callbacks):
        trainer = super()._instantiate_trainer(config, [c for c in callbacks if c is not None])
        startup.fill_data_parallel_size(trainer)
        return trainer

    def instantiate_classes(self) -> None:
        """As Lightning's, except that an AdaLoRA ``peft`` setting is refused first (`error:`
        before peft's constructor fails on ``total_step``), and ``plan`` builds no trainer (the
        configured accelerator may not exist on this machine), model or data."""
        refuse_adalora(self.config)
        if self.subcommand != "plan":
            super().instantiate_classes()

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand == "plan":  # on the parsed config alone: nothing was instantiated
            config = self.config[subcommand]
            settings = PlanSettings(**config["plan"].as_dict())
            self.trainer_class.plan(config.as_dict(), plan=settings)
            return
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
        source (:func:`~treg_lightning.module.checks.check_pair_inputs`), before any model
        loads."""
        if isinstance(self.model, PreferenceModule):
            self.model.check_inputs(self.datamodule)
            self.model.check_strategy(self.trainer)
            check_lora_targets(self.model)  # on the meta device, before any weights load

    def before_export(self) -> None:
        output = self.config_init[self.subcommand]["output"]
        self._check_ckpt_fits()
        check_not_overwriting(output.path, "--output.path", output.overwrite, "--output.overwrite")
        check_writable([("--output.path", output.path)])

    def _check_ckpt_fits(self) -> None:
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if is_file_path(ckpt_path) and hasattr(self.model, "model_name"):
            check_checkpoint_fits(ckpt_path, self.model)

    def output_folders(self) -> list[tuple[str, object]]:
        """``(setting, folder)`` of every folder the run will write, for the start-up check."""
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
        if not is_file_path(ckpt_path):
            return  # "last", "registry:...": Lightning resolves them, nothing to fill in
        source = Path(ckpt_path)
        hparams = read_hparams(source)  # checks the file first; mmap: the weights are not read
        if not hparams:
            return
        given, args = {}, getattr(self, "_given_args", None)
        if isinstance(args, (list, tuple)):  # the flags and --config files, without defaults
            given = ckpt_conflicts.given_model_settings(self.parser, args, subcommand)
            hparams = ckpt_conflicts.keep_given_locations(hparams, given, str(source))
        if "_class_path" in hparams:  # a module saved outside the CLI
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing the hyperparameters of {source} failed!\n")
            raise
        ckpt_conflicts.check_no_conflicts(given, self.config[subcommand]["model"], ckpt_path)


def cli_main(args: ArgsType = None) -> None:
    """Entry point of the ``treg`` command; ``args`` replaces ``sys.argv[1:]`` (for tests).

    Returns None, so the console script exits with status 0. A user error prints one paragraph
    and exits with status 2, Ctrl-C says what was kept and exits with 130 (see
    :mod:`treg_lightning.cli.exits`); known third-party noise is hidden
    (:mod:`treg_lightning.cli.noise`).
    Use ``TRegCLI(args=...)`` to keep the trainer, model and datamodule at hand (it raises).
    """
    # Parse errors are the parser's own messages and exit as they are (JSONARGPARSE_DEBUG=true
    # shows the parser's internals).
    with exit_statuses(debug_requested(args)), known_noise_hidden():
        TRegCLI(args=args)


if __name__ == "__main__":
    cli_main()
