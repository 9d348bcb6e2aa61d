"""The ``treg`` trainer: Lightning's ``Trainer`` plus the verbs the CLI adds.

Every verb of ``treg`` beyond Lightning's ``fit``, ``validate`` and ``test`` is made the same
way: a method here (``plan``: a classmethod, no trainer is built) whose parameters are what it
runs on (``model``, ``datamodule``, ``--ckpt_path``), its components, given by class path
(``--backend``, ``--scorer``, ``--selection``, ``--second``), and its settings groups: frozen
dataclasses, each declared once and taken by every verb that has its knobs. ``LightningCLI``
builds each verb's parser from the signature: a group's fields are the verb's flags,
``--GROUP.FIELD`` (``--sampling.temperature``, ``--output.path``), and the docstring under each
field is the flag's ``--help`` text. Shared groups: :class:`~treg_lightning.outputs.Output`
(``--output.*``), :class:`~treg_lightning.answers.settings.PromptSet` (``--prompts.*``),
:class:`~treg_lightning.answers.settings.GenerationSettings` (``--generation.*``) and the
decoding knobs (``--sampling.*``); a verb's own knobs are the group named after it
(``--audit.*``, ``--pairs.*``, ``--evaluate.*``, ``--export.*``, ``--plan.*``).

- ``annotate``: build the token-reward cache of the ``data`` section on its own, on every device
  of the configured strategy (each process annotates its shard; rank 0 merges);
- ``export``: write the policy of a checkpoint as a Hugging Face folder;
- ``predict``: answers of the policy (:mod:`treg_lightning.answers.predictions`) for a
  :class:`PreferenceDataModule`; Lightning's prediction loop, as always, when given dataloaders
  or another datamodule (the signature is Lightning's, extended by keyword-only settings);
- ``evaluate``: one table row per run (:mod:`treg_lightning.answers.evaluation`);
- ``audit``: whether the token rewards of the data point at the right tokens
  (:mod:`treg_lightning.rewards.audit`);
- ``pairs``: on-policy preference pairs (:mod:`treg_lightning.answers.onpolicy`);
- ``plan``: the memory per device of a run, from its config (:mod:`treg_lightning.plan`).
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from treg_lightning.answers.evaluation import EvalRun, EvaluateSettings
from treg_lightning.answers.generation import (
    Decoding,
    GenerationBackend,
    SamplingSettings,
    TransformersBackend,
)
from treg_lightning.answers.onpolicy import PairsJob, PairsSettings, run_pairs
from treg_lightning.answers.predictions import AnswerJob, PredictJob, PredictSettings, run_predict
from treg_lightning.answers.scorers import Scorer
from treg_lightning.answers.selection import BestWorst
from treg_lightning.answers.settings import GenerationSettings, PromptSet
from treg_lightning.data.datamodule import SPLITS, PreferenceDataModule
from treg_lightning.errors import ConfigError
from treg_lightning.models.export import ExportSettings
from treg_lightning.outputs import Output, check_writable, disk_full_hint
from treg_lightning.passes import distributed
from treg_lightning.plan.report import Plan, PlanSettings
from treg_lightning.rewards.audit import AuditSettings
from treg_lightning.rewards.source import TokenRewardSource


class TRegTrainer(Trainer):
    """Lightning's ``Trainer`` plus the verbs of ``treg``.

    The verbs: ``annotate``, ``export``, ``predict`` (Lightning's own when given dataloaders),
    ``evaluate``, ``audit``, ``pairs`` and the classmethod ``plan``; each takes its settings as
    the dataclass groups described in :mod:`treg_lightning.training.trainer`.
    """

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
        *,
        output: Output = Output("export"),
        export: ExportSettings = ExportSettings(),
    ) -> Path:
        """Write the policy of a checkpoint as a Hugging Face folder (safetensors + tokenizer).

        A LoRA run (``model.peft``) is written with its adapters merged into the base weights of
        ``model.model`` (a plain folder, no peft needed to load it), or the adapter alone. The
        model card (``README.md``) names the data and the metrics of the checkpoint's own run
        and step, read from the checkpoint and the ``metrics.csv`` beside it.

        ``from_pretrained(output.path)`` loads the folder. One that already holds files is
        refused unless ``output.overwrite``: the new export is then written into an empty
        temporary sibling folder and swapped in at the end, so the folder holds no file of the
        earlier one (merged or adapter-only: two models never mix) and a failed export leaves
        the earlier one intact. Files of yours that no export writes (notes, results) are kept
        and named; a ``README.md`` that is not a treg-lightning model card is refused, before
        anything loads.

        Args:
            ckpt_path: a ``.ckpt`` file or a sharded checkpoint folder (FSDP2 / FSDP).
            output: the folder written.
            export: what is written.
        """
        from treg_lightning.models.export import export_checkpoint
        from treg_lightning.models.save import staged_folder
        from treg_lightning.training.model_card import write_card

        if ckpt_path is None:
            raise ConfigError("export needs --ckpt_path (a .ckpt file or a checkpoint folder).")
        folder = Path(output.path).expanduser()
        adapter_only = export.adapter_only
        kept: list[str] = []

        def write() -> None:
            # Checks the folder first, before anything loads; written beside it and swapped in
            # at the end: a failed export (or --output.overwrite) leaves an earlier one intact.
            with staged_folder(folder, kept) as staging:
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
        prompts: PromptSet = PromptSet(),
        sampling: SamplingSettings = SamplingSettings(),
        generation: GenerationSettings = GenerationSettings(),
        output: Output = Output("predictions.jsonl"),
        backend: GenerationBackend | None = None,
    ):
        """Generate the policy's answers for a prompt set, as AlpacaEval-format JSONL.

        With ``dataloaders``, or a datamodule that is not a :class:`PreferenceDataModule`, this is
        Lightning's ``Trainer.predict`` (the prediction loop over ``predict_step``). An existing
        answers file is never replaced unless ``output.overwrite``; unfinished work lies in
        ``<output.path>.parts/`` and is resumed by the same command.

        Args:
            dataloaders (Any): Lightning's prediction loop over these instead (not a ``treg`` flag).
            return_predictions: passed to Lightning's prediction loop.
            weights_only: passed to Lightning's prediction loop.
            ckpt_path: weights to generate with: a ``.ckpt`` file or a sharded checkpoint
                folder; None: model.model as it is (e.g. an exported policy folder).
            prompts: the prompts answered.
            sampling: how answers are decoded.
            generation: how answers are batched, sharded and labelled.
            output: the answers file (JSONL).
            backend: the generation engine; None: TransformersBackend (``generate``), or
                ``treg_lightning.answers.generation.VLLMBackend`` (vLLM installed, GPU).
        """
        if dataloaders is not None or not isinstance(datamodule, PreferenceDataModule):
            return super().predict(
                model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only
            )
        backend = backend if backend is not None else TransformersBackend()
        answers = AnswerJob(model, datamodule, ckpt_path, prompts.file, prompts.split,
                            prompts.limit, backend)  # fmt: skip
        return run_predict(self, PredictJob(answers, PredictSettings(output, generation, sampling)))

    # ---- evaluate: one table row per run (logic in treg_lightning.answers.evaluation) ---------

    def evaluate(
        self,
        model: LightningModule | None = None,
        datamodule: LightningDataModule | None = None,
        *,
        runs: list[EvalRun] | None = None,
        evaluate: EvaluateSettings = EvaluateSettings(),
        output: Output = Output("evaluation"),
    ) -> list[dict]:
        """Compare runs on held-out pairs and on their answers; write a Markdown + JSON table.

        Writes ``evaluation.md``, ``evaluation.json`` and the PNG plots into ``output.path``;
        an earlier report there is replaced only with ``output.overwrite``.

        Args:
            runs: the runs, each ``{name, predictions, ckpt_path | policy, log_dir}``: held-out
                pair metrics need ``ckpt_path`` or ``policy``, answer metrics ``predictions``
                (a ``treg predict`` file), training curves ``log_dir``.
            evaluate: what the answers are compared with and scored by.
            output: the report folder.
        """
        from treg_lightning.answers.evaluate_checks import check_evaluate_inputs
        from treg_lightning.answers.evaluation import (
            check_report_folder,
            evaluate_runs,
            markdown_table,
            write_report,
        )

        runs = runs or []
        check_report_folder(output.path, output.overwrite, runs)
        check_evaluate_inputs(runs, evaluate.reference, evaluate.reward_model)
        results = evaluate_runs(self, model, datamodule, runs, evaluate)
        paths = write_report(results, runs, output.path, output.overwrite)
        print(markdown_table(results), flush=True)
        print("\n".join(f"{kind}: {path.resolve()}" for kind, path in paths.items()), flush=True)
        return results

    # ---- audit: do the token rewards point at the right tokens (treg_lightning.rewards.audit) --

    def audit(
        self,
        model: LightningModule | None = None,
        datamodule: LightningDataModule | None = None,
        *,
        audit: AuditSettings = AuditSettings(),
        output: Output = Output("audit"),
        second: TokenRewardSource | None = None,
    ) -> dict:
        """Audit the token rewards of data.rewards on one split (the cache is built or reused):
        with ground-truth spans in the data (``chosen_spans`` / ``rejected_spans``) how well
        ``r_hat`` finds the marked tokens of each response (AUROC, precision@k), always the
        pair-label agreement, the histogram, the share of near-zero rewards and a heat map of the
        pairs disagreeing most with the labels. Every setting, the split, the output folder and
        the second source's models are checked before the annotate pass.

        Args:
            audit: the split and how its token rewards are measured.
            output: the report folder (audit.md, audit.json and the PNGs); an earlier report
                there is replaced only with ``output.overwrite``.
            second: a second token-reward source (another template, another model) for the rank
                correlation of the two per token; None: none.
        """
        from treg_lightning.data.splits import require_split
        from treg_lightning.rewards.audit import audit_split, check_report_folder, write_report

        split = audit.data_split
        if split not in SPLITS:
            raise ConfigError(f"--audit.data_split {split!r}: audit one of {', '.join(SPLITS)}.")
        if isinstance(datamodule, PreferenceDataModule):
            require_split(datamodule.split_plan(), split, f"treg audit --audit.data_split {split}")
        check_report_folder(output.path, output.overwrite)  # a file, or a report kept: refused
        check_writable([("--output.path", output.path)])
        if second is not None and isinstance(datamodule, PreferenceDataModule):
            second.check_models(datamodule.annotation_context(), setting="--second")
        self.annotate(model, datamodule)  # the checks, the processes, the cache
        result, rows = audit_split(datamodule, split, second, **audit.figures())
        if self.global_rank == 0:
            paths = write_report(result, output.path, rows, datamodule.tokenizer, output.overwrite)
            print("\n".join(f"{kind}: {path.resolve()}" for kind, path in paths.items()))
        return result

    # ---- pairs: on-policy preference pairs (logic in treg_lightning.answers.onpolicy) ----------

    def pairs(
        self,
        model: LightningModule | None = None,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        *,
        prompts: PromptSet = PromptSet(split="train"),
        sampling: Decoding = Decoding(temperature=0.8, top_p=0.95),
        generation: GenerationSettings = GenerationSettings(),
        output: Output = Output("pairs.jsonl"),
        pairs: PairsSettings = PairsSettings(),
        scorer: Scorer | None = None,
        selection: BestWorst | None = None,
        backend: GenerationBackend | None = None,
    ) -> Path | None:
        """Build on-policy preference pairs: k answers per prompt from the policy, scored, the best
        as chosen and the worst as rejected (a conversational pairs file for treg fit).

        Writes ``output.path`` (JSONL) with ``<stem>.samples.jsonl`` (every sample) and
        ``<stem>.summary.json`` beside it, never over earlier ones unless ``output.overwrite``.
        Unfinished work lies in ``<output.path>.parts/`` and is resumed by the same command.

        Args:
            ckpt_path: weights to sample with: a ``.ckpt`` file or a sharded checkpoint folder;
                None: model.model as it is (e.g. an exported policy folder).
            prompts: the prompts answered, each once.
            sampling: how the samples are decoded (temperature > 0; each sample has its own
                seed, ``pairs.seeds``).
            generation: how the samples are batched, sharded and labelled.
            output: the pairs file.
            pairs: how many samples per prompt, under which seeds.
            scorer: scores (prompt, answer):
                ``treg_lightning.answers.scorers.ImplicitRewardScorer`` (policy, reference, beta,
                length_normalized) or ``treg_lightning.answers.scorers.SequenceClassifierScorer``
                (name_or_path, output_field, trust_remote_code).
            selection: picks chosen / rejected; None:
                ``treg_lightning.answers.selection.BestWorst()`` (best and worst, no margin).
            backend: the generation engine; None: TransformersBackend, or
                ``treg_lightning.answers.generation.VLLMBackend`` (vLLM installed, GPU).
        """
        backend = backend if backend is not None else TransformersBackend()
        answers = AnswerJob(model, datamodule, ckpt_path, prompts.file, prompts.split,
                            prompts.limit, backend)  # fmt: skip
        selection = selection if selection is not None else BestWorst()
        job = PairsJob(answers, pairs, sampling, generation, output, scorer, selection)
        return run_pairs(self, job)

    # ---- plan: the memory per device of a run (logic in treg_lightning.plan) --------------------

    @classmethod
    def plan(cls, config: dict, *, plan: PlanSettings = PlanSettings()) -> Plan:
        """Print the per-device memory of a run, from the model's config.json (no weights load).

        A classmethod: a run is planned from its parsed config alone, building no trainer (its
        accelerator may not exist on this machine), model or data (:mod:`treg_lightning.plan`).

        Args:
            config: the run's parsed config, its ``trainer``, ``model`` and ``data`` sections as
                dicts (``treg plan`` passes its own; not a flag).
            plan: the machines the run is planned for.
        """
        from treg_lightning.plan.report import run_plan

        return run_plan(config, plan)
