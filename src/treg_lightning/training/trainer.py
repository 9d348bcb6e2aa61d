"""The ``treg`` trainer: Lightning's ``Trainer`` plus the entry points the CLI adds.

Each subcommand of ``treg`` beyond Lightning's is a method here, so ``LightningCLI`` builds its
parser from the signature and docstring and runs it like ``fit``:

- ``annotate``: build the token-reward cache of the ``data`` section on its own, on every device
  of the configured strategy (each process annotates its shard; rank 0 merges);
- ``export``: write the policy of a checkpoint as a Hugging Face folder;
- ``predict``: answers of the policy (:mod:`treg_lightning.answers.predictions`) for a
  :class:`PreferenceDataModule`; Lightning's prediction loop, as always, when given dataloaders
  or another datamodule (the signature is Lightning's, extended by keyword-only settings);
- ``evaluate``: one table row per run (:mod:`treg_lightning.answers.evaluation`);
- ``audit``: whether the token rewards of the data point at the right tokens
  (:mod:`treg_lightning.rewards.audit`);
- ``pairs``: on-policy preference pairs (:mod:`treg_lightning.answers.onpolicy`).
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from treg_lightning.answers.evaluation import EvalRun
from treg_lightning.answers.generation import GenerationBackend
from treg_lightning.answers.onpolicy import pairs_command
from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.errors import ConfigError
from treg_lightning.outputs import check_writable, disk_full_hint
from treg_lightning.passes import distributed
from treg_lightning.rewards.source import TokenRewardSource


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
        ranks = distributed(self.global_rank, self.world_size)
        with ranks.step("annotate-prepare"):
            if self.local_rank == 0:
                datamodule.prepare_data()
        with ranks.step("annotate"):  # e.g. one rank cannot load the evaluator: all stop
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
        ``model.model`` (a plain folder, no peft needed to load it), or the adapter alone. The
        model card (``README.md``) names the data and the metrics of the checkpoint's own run
        and step, read from the checkpoint and the ``metrics.csv`` beside it.

        Args:
            ckpt_path: a ``.ckpt`` file or a sharded checkpoint folder (FSDP2 / FSDP).
            output_dir: the folder written; ``from_pretrained(output_dir)`` loads it. A folder
                that already holds files is refused unless ``overwrite`` is set.
            overwrite: replace an earlier export in ``output_dir`` as a whole: the new export is
                written into an empty temporary sibling folder and swapped in at the end, so the
                folder holds no file of the earlier one (merged or adapter-only: two models never
                mix) and a failed export leaves the earlier one intact. Files of yours that no
                export writes (notes, results) are kept and named; a ``README.md`` that is not a
                treg-lightning model card is refused, before anything loads.
            adapter_only: write the LoRA adapter alone (``adapter_config.json`` + safetensors;
                ``PeftModel.from_pretrained(base, output_dir)`` loads it).
        """
        from treg_lightning.models.export import export_checkpoint
        from treg_lightning.models.save import staged_folder
        from treg_lightning.training.model_card import write_card

        if ckpt_path is None:
            raise ConfigError("export needs --ckpt_path (a .ckpt file or a checkpoint folder).")
        folder = Path(output_dir).expanduser()
        kept: list[str] = []

        def write() -> None:
            # Checks output_dir first, before anything loads; written beside it and swapped in
            # at the end: a failed export (or --overwrite) leaves an earlier one intact.
            with staged_folder(output_dir, kept) as staging:
                export_checkpoint(model, ckpt_path, staging, adapter_only)
                write_card(staging, model, ckpt_path, adapter_only)
            what = "LoRA adapter" if adapter_only else "policy"
            print(f"{what} written to {folder.resolve()}", flush=True)
            if kept:
                print(f"kept your files that no export writes: {', '.join(kept)}", flush=True)

        # One writer: rank 0, while the other ranks of a process group wait for it (and stop
        # with its error if it fails); a process of a multi-process strategy whose group is
        # not set up (e.g. under torchrun) writes only as rank 0.
        ranks = distributed()
        if ranks.world_size > 1 or self.global_rank == 0:
            ranks.on_rank_zero("export", write)
        return folder

    # ---- predict: answers of the policy (logic in treg_lightning.answers.predictions) ----------

    def predict(
        self,
        model: LightningModule | None = None,
        dataloaders=None,
        datamodule: LightningDataModule | None = None,
        return_predictions: bool | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
        *,
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
    ):
        """Generate the policy's answers for a prompt set, as AlpacaEval-format JSONL.

        With ``dataloaders``, or a datamodule that is not a :class:`PreferenceDataModule`, this is
        Lightning's ``Trainer.predict`` (the prediction loop over ``predict_step``).

        Args:
            dataloaders (Any): Lightning's prediction loop over these instead (not a ``treg`` flag).
            return_predictions: passed to Lightning's prediction loop.
            weights_only: passed to Lightning's prediction loop.
            ckpt_path: weights to generate with: a ``.ckpt`` file or a sharded checkpoint
                folder; None: model.model as it is (e.g. an exported policy folder).
            prompts: a prompts file (.jsonl, .jsonl.gz or a .json list: strings, message lists
                or objects with a prompt/messages/instruction field; .csv / .parquet: one of
                those columns); None: the data's prompts of ``split``.
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
                ``treg_lightning.answers.generation.VLLMBackend`` (vLLM installed, GPU).
            progress: show a progress bar (rank 0).
        """
        if dataloaders is not None or not isinstance(datamodule, PreferenceDataModule):
            return super().predict(
                model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only
            )
        from treg_lightning.answers.generation import SamplingSettings, TransformersBackend
        from treg_lightning.answers.predictions import (
            AnswerJob,
            PredictJob,
            PredictSettings,
            run_predict,
        )

        sampling = SamplingSettings(max_new_tokens, temperature, top_p, seed)
        settings = PredictSettings(
            output, overwrite, generator, sampling, batch_size, shard_size, progress
        )
        backend = backend if backend is not None else TransformersBackend()
        answers = AnswerJob(model, datamodule, ckpt_path, prompts, split, limit, backend)
        return run_predict(self, PredictJob(answers, settings))

    # ---- evaluate: one table row per run (logic in treg_lightning.answers.evaluation) ---------

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
        from treg_lightning.answers.evaluate_checks import check_evaluate_inputs
        from treg_lightning.answers.evaluation import (
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
        check_report_folder(output_dir, overwrite, runs or [])
        check_evaluate_inputs(runs or [], reference, reward_model)
        results = evaluate_runs(self, model, datamodule, runs or [], settings)
        paths = write_report(results, runs or [], output_dir, overwrite)
        print(markdown_table(results), flush=True)
        print("\n".join(f"{kind}: {path.resolve()}" for kind, path in paths.items()), flush=True)
        return results

    # ---- audit: do the token rewards point at the right tokens (treg_lightning.rewards.audit) --

    def audit(
        self,
        model: LightningModule | None = None,
        datamodule: LightningDataModule | None = None,
        split: str = "train",
        second: TokenRewardSource | None = None,
        output_dir: str = "audit",
        k: int | None = None,
        near_zero_below: float = 0.01,
        bootstrap: int = 1000,
        seed: int = 0,
        heatmap_pairs: int = 4,
    ) -> dict:
        """Audit the token rewards of data.rewards on one split (the cache is built or reused):
        with ground-truth spans in the data (``chosen_spans`` / ``rejected_spans``) how well
        ``r_hat`` finds the marked tokens of each response (AUROC, precision@k), always the
        pair-label agreement, the histogram, the share of near-zero rewards and a heat map of the
        pairs disagreeing most with the labels. Every setting, the split, the output folder and
        the second source's models are checked before the annotate pass.

        Args:
            split: the split to audit ("train", "val" or "test").
            second: a second token-reward source (another template, another model) for the rank
                correlation of the two per token; None: none.
            output_dir: folder of audit.md, audit.json and the PNGs (never overwritten).
            k: tokens per response of precision@k (>= 1); None: each response's number of
                negatively marked tokens.
            near_zero_below: ``|r_hat|`` under which a reward counts as near zero (>= 0).
            bootstrap: resamples over pairs for the 95% intervals (>= 0; 0: no intervals).
            seed: seed of the resampling.
            heatmap_pairs: pairs in the heat map of the most disagreeing pairs (>= 0).
        """
        from treg_lightning.data.datamodule import SPLITS
        from treg_lightning.data.splits import require_split
        from treg_lightning.rewards.audit import (
            audit_split,
            check_report_folder,
            check_settings,
            write_report,
        )

        flags = {"k": "--k", "near_zero_below": "--near_zero_below", "bootstrap": "--bootstrap",
                 "disagreeing": "--heatmap_pairs"}  # fmt: skip
        check_settings(
            flags, k=k, near_zero_below=near_zero_below, bootstrap=bootstrap,
            disagreeing=heatmap_pairs,
        )  # fmt: skip
        if split not in SPLITS:
            raise ConfigError(f"--split {split!r}: audit one of {', '.join(SPLITS)}.")
        if isinstance(datamodule, PreferenceDataModule):
            require_split(datamodule.split_plan(), split, f"treg audit --split {split}")
        check_report_folder(output_dir)  # a file, or a folder holding a report: refused
        check_writable([("--output_dir", output_dir)])
        if second is not None and isinstance(datamodule, PreferenceDataModule):
            second.check_models(datamodule.annotation_context(), setting="--second")
        self.annotate(model, datamodule)  # the checks, the processes, the cache
        result, rows = audit_split(
            datamodule, split, second, k=k, near_zero_below=near_zero_below,
            bootstrap=bootstrap, seed=seed, disagreeing=heatmap_pairs,
        )  # fmt: skip
        if self.global_rank == 0:
            paths = write_report(result, output_dir, rows, datamodule.tokenizer)
            print("\n".join(f"{kind}: {path.resolve()}" for kind, path in paths.items()))
        return result

    # ---- pairs: on-policy preference pairs (logic and signature in pair_building) ----------

    pairs = pairs_command
