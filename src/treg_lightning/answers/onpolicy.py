"""``treg pairs``: on-policy preference pairs, sampled from the policy, scored, picked.

For every prompt of a prompt set (:func:`treg_lightning.answers.prompt_sets.load_prompt_set`: a
prompts file or the prompts of the data's split, each prompt once) the policy writes ``k``
answers, one per seed (default 13, 21, 42, 79, 100, SimPO's), a
:class:`~treg_lightning.answers.scorers.Scorer` scores them and a selection rule
(:class:`~treg_lightning.answers.selection.BestWorst`) picks chosen and rejected or drops the
prompt. Two stages, each a resumable pass sharded over ranks (:mod:`treg_lightning.passes`:
shard ``s`` of ``shard_size`` prompts on rank ``s % world_size``), in
``<output>.parts/<fingerprint of the samples>/``:

- ``samples-seed<seed>/shard-<s>.jsonl``: the answers of one seed
  (:mod:`~treg_lightning.answers.pair_sampling`);
- ``scores-<fingerprint of the scorer>/shard-<s>.jsonl``: the scores of every sample of the
  shard's prompts (:mod:`~treg_lightning.answers.pair_scoring`).

Shards are written whole: after a kill, the rerun of the same command skips the finished shards
and writes the same files as an uninterrupted run. Another scorer reuses the samples; other
sampling settings get another folder. Rank 0 then writes the pairs file and its two sidecars
(:mod:`~treg_lightning.answers.pair_outputs`), never over another run's files unless
``overwrite``. A rank that raises stops every rank with its error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule

from treg_lightning.answers.generation import GenerationBackend, SamplingSettings
from treg_lightning.answers.pair_outputs import (
    OutputPaths,
    build_outputs,
    check_outputs,
    check_sidecars,
    write_outputs,
)
from treg_lightning.answers.pair_sampling import (
    distinct_prompts,
    sample_seeds,
    samples_fingerprint,
    unsampled,
)
from treg_lightning.answers.pair_scoring import score_shards
from treg_lightning.answers.predictions import AnswerJob, PredictSettings, record_digest
from treg_lightning.answers.scorers import Scorer
from treg_lightning.answers.selection import BestWorst
from treg_lightning.errors import ConfigError
from treg_lightning.passes import Parts, parts_folder, write_json

DEFAULT_SEEDS = (13, 21, 42, 79, 100)


def resolve_seeds(k: int | None, seeds: list[int] | None) -> list[int]:
    """The seeds of the ``k`` samples: ``seeds`` as given, else the first ``k`` of
    :data:`DEFAULT_SEEDS` (``k`` > 5: continued 101, 102, ...); k = 5 by default."""
    if k is not None and k < 2:
        # Checked before the seeds are cut: a negative k would slice from the end ([:-1]).
        raise ConfigError(
            f"--k {k}: pairs needs k >= 2 samples per prompt, since chosen and rejected are two "
            "different samples of one prompt (with fewer, no pair can be formed). Set --k 5, "
            "SimPO's setting (or list --seeds)."
        )
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if k is not None and k != len(seeds):
            raise ConfigError(f"k ({k}) and the number of seeds ({len(seeds)}) differ; give one.")
    else:
        k = 5 if k is None else k
        seeds = list(DEFAULT_SEEDS[:k]) + [101 + i for i in range(max(0, k - len(DEFAULT_SEEDS)))]
    if len(seeds) < 2:
        raise ConfigError(
            f"pairs needs k >= 2 samples per prompt (got {len(seeds)}): chosen and rejected are "
            "two different samples. Set --k 5 (or list --seeds)."
        )
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"the seeds {seeds} repeat a seed: each sample needs its own seed.")
    return seeds


@dataclass
class PairsSettings:
    """What ``treg pairs`` was asked for (see ``TRegTrainer.pairs`` for each field)."""

    output: str = "pairs.jsonl"
    overwrite: bool = False
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    max_new_tokens: int = 512
    temperature: float = 0.8
    top_p: float = 0.95
    batch_size: int = 8
    shard_size: int = 64
    sample_only: bool = False
    generator: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.seeds = resolve_seeds(None, self.seeds)
        if self.temperature <= 0:
            raise ConfigError(
                f"pairs samples with temperature > 0 (got {self.temperature}): greedy decoding "
                "gives every seed the same answer, and every prompt would be dropped."
            )
        self.predict_settings(self.seeds[0])  # checks max_new_tokens, top_p, sizes

    def predict_settings(self, seed: int) -> PredictSettings:
        sampling = SamplingSettings(self.max_new_tokens, self.temperature, self.top_p, seed)
        return PredictSettings(self.output, True, self.generator, sampling, self.batch_size,
                               self.shard_size, self.progress)  # fmt: skip


@dataclass
class PairsJob:
    """One ``treg pairs`` call: the policy and prompts, the settings, the scorer and the rule."""

    answers: AnswerJob
    settings: PairsSettings
    scorer: Scorer | None
    selection: BestWorst


def run_pairs(trainer, job: PairsJob) -> Path | None:
    """``treg pairs``: check the settings, launch the strategy's processes, run the stages."""
    job.answers.check("pairs", trainer.world_size)
    if job.scorer is None:
        raise ConfigError(
            "pairs needs a scorer: --scorer treg_lightning.answers.scorers.ImplicitRewardScorer "
            "(with policy and reference) or "
            "treg_lightning.answers.scorers.SequenceClassifierScorer (with "
            "name_or_path)."
        )
    paths = check_outputs(job.settings.output, job.settings.overwrite)
    return job.answers.launch(trainer, _pairs, job, paths)


def _pairs(trainer, job: PairsJob, paths: OutputPaths) -> Path | None:
    from lightning.pytorch.utilities import rank_zero_info

    answers, settings = job.answers, job.settings
    ranks = answers.start(trainer, "pairs")
    with ranks.step("pairs-start"):
        prompts = _prompts(answers)
        job.scorer.check([p["messages"] for p in prompts])  # before any weights load
        tokenizer = answers.datamodule.get_tokenizer()
        policy, device = answers.policy(), trainer.strategy.root_device
        record = samples_fingerprint(prompts, policy, settings, answers.backend, device)
        scoring = {"samples": record["digest"], "scorer": job.scorer.fingerprint()}
        digest = record_digest({**scoring, "selection": job.selection.fingerprint()})
        work_dir = parts_folder(paths.pairs, record["digest"])
        score_parts = Parts(work_dir / f"scores-{record_digest(scoring)[:16]}")
        pending = unsampled(prompts, settings, work_dir)
        if ranks.rank == 0:
            check_sidecars(paths, digest, settings.overwrite)
            work_dir.mkdir(parents=True, exist_ok=True)
            write_json(work_dir / "settings.json", record)
    if pending:  # e.g. vLLM's export of a checkpoint: written once, read by every rank
        ranks.on_rank_zero("pairs-policy", lambda: answers.backend.prepare(policy, work_dir))
    with ranks.step("pairs-samples"):
        sample_seeds(prompts, answers, policy, tokenizer, settings, work_dir, device, ranks,
                     pending)  # fmt: skip
    if settings.sample_only:
        rank_zero_info(f"pairs: samples of {len(prompts)} prompts kept in {work_dir}")
        return None
    with ranks.step("pairs-scores"):
        score_shards(prompts, settings.seeds, job.scorer, work_dir, score_parts,
                     settings.shard_size, device, ranks)  # fmt: skip

    def write() -> Path:
        pairs, samples, counts = build_outputs(
            prompts, settings.seeds, work_dir, score_parts, settings.shard_size, job.selection,
            digest,
        )  # fmt: skip
        summary = {"digest": digest, **counts, "settings": {**record, "scoring": scoring,
                   "selection": job.selection.fingerprint()}}  # fmt: skip
        write_outputs(paths, pairs, samples, summary)
        Parts(work_dir).remove()
        reasons = ", ".join(f"{n} {r}" for r, n in counts["dropped"].items() if n) or "none"
        print(f"{counts['kept']} pairs of {counts['prompts']} prompts written to "
              f"{paths.pairs.resolve()} (dropped: {reasons})", flush=True)  # fmt: skip
        return paths.pairs

    return ranks.on_rank_zero("pairs-outputs", write)


def _prompts(answers: AnswerJob) -> list[dict]:
    """The prompt set, each prompt once; refused when empty."""
    from lightning.pytorch.utilities import rank_zero_info

    from treg_lightning.answers.prompt_sets import load_prompt_set

    loaded = load_prompt_set(answers.datamodule, answers.prompts_file, answers.split,
                             answers.limit)  # fmt: skip
    prompts = distinct_prompts(loaded)
    if not prompts:
        raise ConfigError(
            "the prompt set holds no prompt (check --prompts, --split and --limit): there is "
            "nothing to sample."
        )
    if len(prompts) < len(loaded):
        rank_zero_info(f"pairs: {len(loaded) - len(prompts)} repeated prompts kept once")
    return prompts


# ---- the subcommand: TRegTrainer.pairs (LightningCLI builds its parser from this signature) --


def pairs_command(
    self,
    model: LightningModule | None = None,
    datamodule: LightningDataModule | None = None,
    ckpt_path: str | None = None,
    prompts: str | None = None,
    split: str = "train",
    limit: int | None = None,
    output: str = "pairs.jsonl",
    overwrite: bool = False,
    k: int | None = None,
    seeds: list[int] | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.8,
    top_p: float = 0.95,
    scorer: Scorer | None = None,
    selection: BestWorst | None = None,
    batch_size: int = 8,
    shard_size: int = 64,
    backend: GenerationBackend | None = None,
    sample_only: bool = False,
    generator: str | None = None,
    progress: bool = True,
) -> Path | None:
    """Build on-policy preference pairs: k answers per prompt from the policy, scored, the best
    as chosen and the worst as rejected (a conversational pairs file for treg fit).

    Args:
        ckpt_path: weights to sample with: a ``.ckpt`` file or a sharded checkpoint folder;
            None: model.model as it is (e.g. an exported policy folder).
        prompts: a prompts file (.jsonl/.json: strings, message lists or objects with a
            prompt/messages/instruction field); None: the prompts of the data's ``split``.
        split: the data split whose prompts are answered ("train" or "val").
        limit: only the first ``limit`` prompts.
        output: the pairs file (JSONL), with ``<stem>.samples.jsonl`` (every sample) and
            ``<stem>.summary.json`` beside it; never written over unless ``overwrite``.
            Unfinished work lies in ``<output>.parts/`` and is resumed by the same command.
        overwrite: replace an existing ``output`` and its sidecars.
        k: samples per prompt (>= 2); None: the number of ``seeds``, or 5.
        seeds: one sampling seed per sample; None: 13, 21, 42, 79, 100 (the first k).
        max_new_tokens: the most tokens an answer may have.
        temperature: sampling temperature (> 0).
        top_p: nucleus sampling mass.
        scorer: scores (prompt, answer): ``treg_lightning.answers.scorers.ImplicitRewardScorer``
            (policy, reference, beta, length_normalized) or
            ``treg_lightning.answers.scorers.SequenceClassifierScorer`` (name_or_path, output_field,
            trust_remote_code).
        selection: picks chosen / rejected; None: ``treg_lightning.answers.selection.BestWorst()``
            (best and worst, no margin).
        batch_size: prompts per generate call.
        shard_size: prompts per resumable shard; shard s goes to rank s % world_size.
        backend: the generation engine; None: TransformersBackend, or
            ``treg_lightning.answers.generation.VLLMBackend`` (vLLM installed, GPU).
        sample_only: stop after the sampling stage (run again without it to score in a fresh
            process, e.g. once vLLM has freed the GPU).
        generator: the generator name of the samples; None: the model / checkpoint name.
        progress: show a progress bar (rank 0).
    """
    from treg_lightning.answers.generation import TransformersBackend

    settings = PairsSettings(
        output, overwrite, resolve_seeds(k, seeds), max_new_tokens, temperature, top_p,
        batch_size, shard_size, sample_only, generator, progress,
    )  # fmt: skip
    answers = AnswerJob(model, datamodule, ckpt_path, prompts, split, limit,
                        backend if backend is not None else TransformersBackend())  # fmt: skip
    job = PairsJob(answers, settings, scorer, selection if selection is not None else BestWorst())
    return run_pairs(self, job)
