"""The ``treg`` command: ``LightningCLI`` over :class:`PreferenceModule` and
:class:`PreferenceDataModule`.

Subcommands: ``fit``, ``validate``, ``test``, ``predict`` (Lightning's) plus

- ``annotate``: build the token-reward cache of the ``data`` section on its own, on every device
  of the configured strategy (each process annotates its shard; rank 0 merges);
- ``export``: write the policy of ``--ckpt_path`` (a ``.ckpt`` file or a sharded checkpoint
  folder) as a Hugging Face folder (``--output_dir``) with safetensors weights and tokenizer.

Both are methods of :class:`TRegTrainer`, so LightningCLI builds their parsers and runs them
exactly like the built-in ones (``treg annotate --config configs/demo.yaml``).

Usage::

    treg fit --config configs/demo.yaml
    treg fit --config configs/llama3_simpo_treg.yaml --trainer.devices 8
    treg export --config configs/demo.yaml --ckpt_path path/to.ckpt --output_dir policy/
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

import torch
from jsonargparse import lazy_instance
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.evaluation import EvalRun
from treg_lightning.generation import GenerationBackend
from treg_lightning.guards import NonFiniteGuard
from treg_lightning.module import PreferenceModule
from treg_lightning.outputs import check_writable, disk_full_hint


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
        if datamodule is None or not hasattr(datamodule, "build_caches"):
            raise ValueError(
                "annotate needs a PreferenceDataModule (the `data` section) with rewards: annotate."
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
        caches = datamodule.build_caches()
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
    ) -> Path:
        """Write the policy of a checkpoint as a Hugging Face folder (safetensors + tokenizer).

        Args:
            ckpt_path: a ``.ckpt`` file or a sharded checkpoint folder (FSDP2 / FSDP).
            output_dir: the folder written; ``from_pretrained(output_dir)`` loads it.
        """
        from treg_lightning.export import export_checkpoint

        if ckpt_path is None:
            raise ValueError("export needs --ckpt_path (a .ckpt file or a checkpoint folder).")
        folder = export_checkpoint(model, ckpt_path, output_dir)
        print(f"policy written to {folder.resolve()}", flush=True)
        return folder

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
    """``LightningArgumentParser`` whose "does not accept option" errors suggest the close key
    (a typo in a YAML key, ``max_lenght``, otherwise only prints the whole usage)."""

    def error(self, message: str, *args, **kwargs):
        match = re.search(r"does not accept options? '([^']+)'", str(message))
        if match:
            keys = set(re.findall(r"--([\w.]+)", self._all_usages()))
            close = difflib.get_close_matches(match.group(1), sorted(keys), n=1, cutoff=0.75)
            if close:
                message = f"{message}. Did you mean '{close[0]}'?"
        return super().error(message, *args, **kwargs)

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
            "predict": {"model", "datamodule"},
            "evaluate": {"model", "datamodule"},
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model", "data.tokenizer")
        parser.add_argument(
            "--guard",
            type=NonFiniteGuard | None,
            default=lazy_instance(NonFiniteGuard),
            help="Stop (or skip the step) on a non-finite loss or gradient, naming the step and "
            "dataset rows, before the optimizer writes NaN into the weights; null disables it. "
            "E.g. --guard.action=skip --guard.max_skips=5.",
        )
        parser.callback_keys.append("guard")  # the instance joins the trainer's callbacks

    def _instantiate_trainer(self, config, callbacks):
        return super()._instantiate_trainer(config, [c for c in callbacks if c is not None])

    def before_fit(self) -> None:
        # Every launched process checks, before any annotation or model loading.
        check = getattr(self.model, "check_reference_available", None)
        if check is not None:
            check(self.datamodule)
        check_writable(self.output_folders())
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if (
            ckpt_path not in (None, "last", "best", "hpc", "registry")
            and not Path(ckpt_path).exists()
        ):
            # Lightning would only find out after the annotate pass and the model load.
            raise FileNotFoundError(
                f"--ckpt_path {ckpt_path} does not exist: give the .ckpt file (or sharded "
                "checkpoint folder) to resume from, e.g. <dirpath>/last.ckpt, or drop "
                "--ckpt_path to start a new run."
            )

    def before_annotate(self) -> None:
        check_writable(self.output_folders())

    def before_export(self) -> None:
        output_dir = self.config_init[self.subcommand].get("output_dir")
        check_writable([("--output_dir", output_dir)])

    def output_folders(self) -> list[tuple[str, object]]:
        """``(setting, folder)`` of every folder the run will write, for the start-up check."""
        from treg_lightning.callbacks import ExportOnFitEnd
        from treg_lightning.models import cache_root

        trainer = self.trainer
        folders = [("trainer.default_root_dir", trainer.default_root_dir)]
        for logger in trainer.loggers:
            folders.append(("trainer.logger save_dir", getattr(logger, "save_dir", None)))
        for callback in trainer.callbacks:
            if getattr(callback, "dirpath", None) is not None:
                folders.append(("ModelCheckpoint dirpath", callback.dirpath))
            if isinstance(callback, ExportOnFitEnd):
                folders.append(("ExportOnFitEnd export_dir", callback.export_dir))
                heatmap = callback.heatmap_path
                folders.append(("ExportOnFitEnd heatmap_path", heatmap and Path(heatmap).parent))
        if getattr(self.datamodule, "rewards", None) == "annotate":
            cache_dir = self.datamodule.cache_dir or cache_root() / "token_rewards"
            folders.append(("data.cache_dir", cache_dir))
        return folders

    def _parse_ckpt_path(self) -> None:
        """As Lightning's, plus the ``meta.pt`` of sharded checkpoint folders."""
        super()._parse_ckpt_path()
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
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


def cli_main(args: ArgsType = None) -> None:
    """Entry point of the ``treg`` command; ``args`` replaces ``sys.argv[1:]`` (for tests).

    Returns None, so the console script exits with status 0; use ``TRegCLI(args=...)`` to keep
    the trainer, model and datamodule at hand.
    """
    TRegCLI(args=args)


if __name__ == "__main__":
    cli_main()
