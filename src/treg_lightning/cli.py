"""The ``treg`` command: ``LightningCLI`` over :class:`PreferenceModule` and
:class:`PreferenceDataModule`.

Subcommands: ``fit``, ``validate``, ``test``, ``predict`` (Lightning's) plus

- ``annotate``: build the token-reward cache of the ``data`` section on its own, on every device
  of the configured strategy (each process annotates its shard; rank 0 merges);
- ``export``: write the policy of ``--ckpt_path`` (a ``.ckpt`` file or a sharded checkpoint
  folder) as a Hugging Face folder (``--output_dir``) with safetensors weights and tokenizer;
- ``plan``: print the per-device memory of the config, part by part, from the model's
  config.json alone (``--devices``, ``--num-nodes``, ``--gpu-memory 80GB``); nothing is built,
  so a GPU config plans on a CPU machine (:mod:`treg_lightning.plan`).

Both are methods of :class:`TRegTrainer`, so LightningCLI builds their parsers and runs them
exactly like the built-in ones (``treg annotate --config configs/demo.yaml``).

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
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

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
from treg_lightning.errors import ConfigError
from treg_lightning.evaluation import EvalRun
from treg_lightning.exits import (
    DEBUG_FLAG,
    RunInterrupted,
    debug_requested,
    exit_statuses,
    interrupted_message,
)
from treg_lightning.generation import GenerationBackend
from treg_lightning.guards import NonFiniteGuard
from treg_lightning.module import PreferenceModule
from treg_lightning.noise import known_noise_hidden
from treg_lightning.outputs import check_not_overwriting, check_writable, disk_full_hint


class TRegTrainer(Trainer):
    """Lightning's ``Trainer`` plus the ``annotate`` and ``export`` entry points."""

    def save_checkpoint(self, filepath, weights_only: bool = False, storage_options=None) -> None:
        # A full disk mid-run must say which file and what to do, not a bare errno 28.
        advice = (
            "free space or point the checkpoint folder (ModelCheckpoint dirpath / "
            "trainer.default_root_dir) elsewhere; earlier checkpoints are kept"
        )
        with disk_full_hint(filepath, advice):
            super().save_checkpoint(filepath, weights_only, storage_options)

    def annotate(
        self,
        model: LightningModule | None = None,
        datamodule: LightningDataModule | None = None,
    ) -> None:
        """Build the token-reward cache of the data, on every device of the strategy."""
        if not isinstance(datamodule, PreferenceDataModule):
            raise ConfigError(
                "annotate needs a PreferenceDataModule (the `data` section) with a reward "
                "source (data.rewards)."
            )
        if datamodule.rewards is None:
            raise ConfigError(
                "treg annotate builds the token-reward cache, but data.rewards is null (no token "
                "rewards): set data.rewards to a source (e.g. treg_lightning.rewards."
                "ContrastiveRewards), or skip annotate and run treg fit directly."
            )
        # The strategy needs a module to set up processes (ModelParallelStrategy gives it the
        # device mesh); PreferenceModule builds no weights until configure_model().
        self.strategy.connect(model if model is not None else LightningModule())
        datamodule.trainer = self
        launcher = self.strategy.launcher
        if launcher is not None:
            launcher.launch(self._annotate, datamodule, trainer=self)
        else:
            self._annotate(datamodule)

    def _annotate(self, datamodule: LightningDataModule) -> None:
        self.strategy.setup_environment()  # process group, device
        if self.local_rank == 0:
            datamodule.prepare_data()
        self.strategy.barrier("annotate-prepare")
        caches = datamodule.annotate()
        for split, dataset in caches.items():
            files = getattr(dataset, "cache_files", None) or [{}]
            where = Path(files[0].get("filename", "?")).parent
            rank_zero_info(f"token-reward cache, {split}: {len(dataset)} pairs in {where}")

    def export(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        output_dir: str = "export",
        overwrite: bool = False,
        adapter_only: bool = False,
    ) -> Path:
        """Write the policy of a checkpoint as a Hugging Face folder (safetensors + tokenizer).

        A LoRA run (``model.peft``) is written with its adapters merged into the base weights of
        ``model.model`` (a plain folder, no peft needed to load it), or the adapter alone.

        Args:
            ckpt_path: a ``.ckpt`` file or a sharded checkpoint folder (FSDP2 / FSDP).
            output_dir: the folder written; ``from_pretrained(output_dir)`` loads it. A folder
                that already holds files is refused unless ``overwrite`` is set.
            overwrite: write into a non-empty ``output_dir``, replacing its files (weight
                files of an earlier export are removed first, so two models never mix).
            adapter_only: write the LoRA adapter alone (``adapter_config.json`` + safetensors;
                ``PeftModel.from_pretrained(base, output_dir)`` loads it).
        """
        from treg_lightning.export import export_checkpoint, remove_stale_weights

        if ckpt_path is None:
            raise ConfigError("export needs --ckpt_path (a .ckpt file or a checkpoint folder).")
        if overwrite:
            remove_stale_weights(output_dir)
        folder = export_checkpoint(model, ckpt_path, output_dir, adapter_only)
        what = "LoRA adapter" if adapter_only else "policy"
        print(f"{what} written to {folder.resolve()}", flush=True)
        return folder

    # ---- plan --------------------------------------------------------------------------------

    def plan(
        self,
        model: LightningModule | None = None,
        datamodule: LightningDataModule | None = None,
        devices: int | None = None,
        num_nodes: int | None = None,
        gpu_memory: str | None = None,
        reserve: str = "1GiB",
    ) -> None:
        """Print the per-device memory of the run, from the model's config.json (no weights).

        ``treg plan`` reads the parsed config without building the trainer, the model or the
        data (TRegCLI), so this method only declares its arguments; in Python use
        ``treg_lightning.plan.plan_from_config(config)``.

        Args:
            devices: devices per node (default: trainer.devices).
            num_nodes: nodes (default: trainer.num_nodes).
            gpu_memory: memory of one device, e.g. 80GB (10^9 bytes) or 79.6GiB (2^30);
                default 80GB, or this machine's RAM when trainer.accelerator is cpu.
            reserve: memory kept aside per device (CUDA context, NCCL and cuBLAS workspaces).
        """
        raise RuntimeError(
            "Trainer.plan only declares the arguments of `treg plan`; call "
            "treg_lightning.plan.plan_from_config(config) instead."
        )

    # ---- predict: answers of the policy (logic in treg_lightning.predictions) ---------------

    def predict(
        self,
        model: LightningModule | None = None,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        prompts: str | None = None,
        split: str = "val",
        limit: int | None = None,
        output: str = "predictions.jsonl",
        overwrite: bool = False,
        generator: str | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        batch_size: int = 8,
        shard_size: int = 64,
        backend: GenerationBackend | None = None,
        progress: bool = True,
    ) -> Path | None:
        """Generate the policy's answers for a prompt set, as AlpacaEval-format JSONL.

        Args:
            ckpt_path: weights to generate with: a ``.ckpt`` file or a sharded checkpoint
                folder; None: model.model as it is (e.g. an exported policy folder).
            prompts: a prompts file (.jsonl/.json: strings, message lists or objects with a
                prompt/messages/instruction field); None: the data's prompts of ``split``.
            split: the data split whose prompts are answered ("val" or "train").
            limit: answer only the first ``limit`` prompts.
            output: the answers file (JSONL); an existing file is never replaced unless
                ``overwrite``. Unfinished work lies in ``<output>.parts/`` and is resumed.
            overwrite: replace an existing ``output``.
            generator: the ``generator`` field of every row; None: the model / checkpoint name.
            max_new_tokens: the most tokens an answer may have.
            temperature: 0 decodes greedily (deterministic); > 0 samples.
            top_p: nucleus sampling mass when sampling.
            seed: seeds the sampling of each batch.
            batch_size: prompts per generate call (left-padded).
            shard_size: prompts per resumable shard file; shard k goes to rank k % world_size.
            backend: the generation engine; None: TransformersBackend (``generate``), or
                ``treg_lightning.generation.VLLMBackend`` (vLLM installed, GPU).
            progress: show a progress bar (rank 0).
        """
        from treg_lightning.generation import SamplingSettings, TransformersBackend
        from treg_lightning.predictions import PredictJob, PredictSettings, run_predict

        sampling = SamplingSettings(max_new_tokens, temperature, top_p, seed)
        settings = PredictSettings(
            output, overwrite, generator, sampling, batch_size, shard_size, progress
        )
        backend = backend if backend is not None else TransformersBackend()
        job = PredictJob(model, datamodule, ckpt_path, prompts, split, limit, settings, backend)
        return run_predict(self, job)

    # ---- evaluate: one table row per run (logic in treg_lightning.evaluation) --------------

    def evaluate(
        self,
        model: LightningModule | None = None,
        datamodule: LightningDataModule | None = None,
        runs: list[EvalRun] | None = None,
        reference: str | None = None,
        reward_model: str | None = None,
        reward_batch_size: int = 8,
        reward_dtype: str = "float32",
        max_new_tokens: int | None = None,
        output_dir: str = "evaluation",
        overwrite: bool = False,
    ) -> list[dict]:
        """Compare runs on held-out pairs and on their answers; write a Markdown + JSON table.

        Args:
            runs: the runs, each ``{name, predictions, ckpt_path | policy, log_dir}``: held-out
                pair metrics need ``ckpt_path`` or ``policy``, answer metrics ``predictions``
                (a ``treg predict`` file), training curves ``log_dir``.
            reference: the reference policy's answers (``treg predict`` of the starting model)
                for the win rates.
            reward_model: a sequence-classification reward model (hub id or folder) scoring
                (prompt, answer) with its chat template; None: no reward columns.
            reward_batch_size: conversations per reward-model forward.
            reward_dtype: dtype of the reward model.
            max_new_tokens: the predict setting, for answers files without finish_reason.
            output_dir: folder of evaluation.md, evaluation.json and the PNG plots.
            overwrite: replace an earlier report in ``output_dir``.
        """
        from treg_lightning.evaluation import (
            EvaluateSettings,
            check_report_folder,
            evaluate_runs,
            markdown_table,
            write_report,
        )

        settings = EvaluateSettings(
            reference, reward_model, reward_batch_size, reward_dtype, max_new_tokens,
            output_dir, overwrite,
        )  # fmt: skip
        check_report_folder(output_dir, overwrite)
        results = evaluate_runs(self, model, datamodule, runs or [], settings)
        paths = write_report(results, runs or [], output_dir, overwrite)
        print(markdown_table(results), flush=True)
        print("\n".join(f"{kind}: {path.resolve()}" for kind, path in paths.items()), flush=True)
        return results


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
        """As Lightning's, plus the ``meta.pt`` of sharded checkpoint folders; a checkpoint that
        cannot be one (empty, truncated, text, foreign) is refused first, naming the file."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if is_file_path(ckpt_path):
            check_checkpoint_file(ckpt_path)
        super()._parse_ckpt_path()
        meta = Path(ckpt_path) / "meta.pt" if ckpt_path else None
        if meta is None or not meta.is_file():
            return
        hparams = torch.load(meta, weights_only=True, map_location="cpu").get("hyper_parameters")
        hparams = dict(hparams or {})
        hparams.pop("_instantiator", None)
        hparams.pop("_class_path", None)
        if hparams:
            try:
                self.config = self.parser.parse_object(
                    {subcommand: {"model": hparams}}, self.config
                )
            except SystemExit:
                sys.stderr.write(f"Parsing the hyperparameters of {meta} failed!\n")
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
