"""``treg pairs``: on-policy preference pairs, sampled from the policy, scored, picked.

For every prompt of a prompt set (:func:`treg_lightning.answers.prompt_sets.load_prompt_set`: a
prompts file or the prompts of the data's split, each prompt once) the policy writes ``k``
answers, one per seed (``--pairs.seeds``, default 13, 21, 42, 79, 100, SimPO's), a
:class:`~treg_lightning.answers.scorers.Scorer` scores them and a selection rule
(:class:`~treg_lightning.answers.selection.BestWorst`) picks chosen and rejected or drops the
prompt. Two stages, each a resumable pass sharded over ranks (:mod:`treg_lightning.passes`:
shard ``s`` of ``--generation.shard_size`` prompts on rank ``s % world_size``), in
``<output>.parts/<fingerprint of the samples>/``:

- ``samples-seed<seed>/shard-<s>.jsonl``: the answers of one seed
  (:mod:`~treg_lightning.answers.pair_sampling`);
- ``scores-<fingerprint of the scorer>/shard-<s>.jsonl``: the scores of every sample of the
  shard's prompts (:mod:`~treg_lightning.answers.pair_scoring`).

Shards are written whole: after a kill, the rerun of the same command skips the finished shards
and writes the same files as an uninterrupted run. Another scorer reuses the samples; other
sampling settings get another folder. Rank 0 then writes the pairs file and its two sidecars
(:mod:`~treg_lightning.answers.pair_outputs`), never over another run's files unless
``--output.overwrite``. A rank that raises stops every rank with its error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from treg_lightning.answers.generation import Decoding, SamplingSettings
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
from treg_lightning.answers.settings import GenerationSettings
from treg_lightning.errors import ConfigError
from treg_lightning.outputs import Output
from treg_lightning.passes import Parts, parts_folder, write_json

DEFAULT_SEEDS = (13, 21, 42, 79, 100)


def resolve_seeds(k: int | None, seeds: list[int] | None) -> list[int]:
    """The seeds of the ``k`` samples: ``seeds`` as given, else the first ``k`` of
    :data:`DEFAULT_SEEDS` (``k`` > 5: continued 101, 102, ...); k = 5 by default."""
    if k is not None and k < 2:
        # Checked before the seeds are cut: a negative k would slice from the end ([:-1]).
        raise ConfigError(
            f"--pairs.k {k}: pairs needs k >= 2 samples per prompt, since chosen and rejected are "
            "two different samples of one prompt (with fewer, no pair can be formed). Set "
            "--pairs.k 5, SimPO's setting (or list --pairs.seeds)."
        )
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if k is not None and k != len(seeds):
            raise ConfigError(
                f"--pairs.k ({k}) and the number of --pairs.seeds ({len(seeds)}) differ; give one."
            )
    else:
        k = 5 if k is None else k
        seeds = list(DEFAULT_SEEDS[:k]) + [101 + i for i in range(max(0, k - len(DEFAULT_SEEDS)))]
    if len(seeds) < 2:
        raise ConfigError(
            f"pairs needs k >= 2 samples per prompt (got {len(seeds)}): chosen and rejected are "
            "two different samples. Set --pairs.k 5 (or list --pairs.seeds)."
        )
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--pairs.seeds {seeds} repeat a seed: each sample needs its own seed.")
    return seeds


@dataclass(frozen=True)
class PairsSettings:
    """The own settings of ``treg pairs`` (``--pairs.*``): how many samples per prompt, under
    which seeds, and whether to stop after sampling."""

    k: int | None = None
    """Samples per prompt (>= 2); None: the number of ``seeds``, or 5."""

    seeds: list[int] | None = None
    """One sampling seed per sample; None: 13, 21, 42, 79, 100 (SimPO's; the first ``k``, then
    101, 102, ...)."""

    sample_only: bool = False
    """Stop after the sampling stage (run again without it to score in a fresh process, e.g.
    once vLLM has freed the GPU)."""

    def __post_init__(self) -> None:
        self.sample_seeds()  # refuses k < 2, k differing from the seeds, a repeated seed

    def sample_seeds(self) -> list[int]:
        """The seed of each sample (:func:`resolve_seeds`)."""
        return resolve_seeds(self.k, self.seeds)


@dataclass
class PairsJob:
    """One ``treg pairs`` call: the policy and prompts, the verb's settings groups, the scorer
    and the selection rule. ``seeds``: the seed of each sample."""

    answers: AnswerJob
    settings: PairsSettings
    sampling: Decoding
    generation: GenerationSettings
    output: Output
    scorer: Scorer | None
    selection: BestWorst
    seeds: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.seeds = self.settings.sample_seeds()
        if self.sampling.temperature <= 0:
            raise ConfigError(
                f"pairs samples with --sampling.temperature > 0 (got "
                f"{self.sampling.temperature}): greedy decoding gives every seed the same "
                "answer, and every prompt would be dropped."
            )

    def predict_settings(self, seed: int) -> PredictSettings:
        """The generation pass of one seed (its shards are kept, so ``overwrite``)."""
        sampling = SamplingSettings(**asdict(self.sampling), seed=seed)
        return PredictSettings(Output(self.output.path, True), self.generation, sampling)


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
    paths = check_outputs(job.output.path, job.output.overwrite)
    return job.answers.launch(trainer, _pairs, job, paths)


def _pairs(trainer, job: PairsJob, paths: OutputPaths) -> Path | None:
    from lightning.pytorch.utilities import rank_zero_info

    answers, shard_size = job.answers, job.generation.shard_size
    ranks = answers.start(trainer, "pairs")
    with ranks.step("pairs-start"):
        prompts = _prompts(answers)
        job.scorer.check([p["messages"] for p in prompts])  # before any weights load
        tokenizer = answers.datamodule.get_tokenizer()
        policy, device = answers.policy(), trainer.strategy.root_device
        record = samples_fingerprint(prompts, policy, job, answers.backend, device)
        scoring = {"samples": record["digest"], "scorer": job.scorer.fingerprint()}
        digest = record_digest({**scoring, "selection": job.selection.fingerprint()})
        work_dir = parts_folder(paths.pairs, record["digest"])
        score_parts = Parts(work_dir / f"scores-{record_digest(scoring)[:16]}")
        pending = unsampled(prompts, job, work_dir)
        if ranks.rank == 0:
            check_sidecars(paths, digest, job.output.overwrite)
            work_dir.mkdir(parents=True, exist_ok=True)
            write_json(work_dir / "settings.json", record)
    if pending:  # e.g. vLLM's export of a checkpoint: written once, read by every rank
        ranks.on_rank_zero("pairs-policy", lambda: answers.backend.prepare(policy, work_dir))
    with ranks.step("pairs-samples"):
        sample_seeds(prompts, answers, policy, tokenizer, job, work_dir, device, ranks, pending)
    if job.settings.sample_only:
        rank_zero_info(f"pairs: samples of {len(prompts)} prompts kept in {work_dir}")
        return None
    with ranks.step("pairs-scores"):
        score_shards(prompts, job.seeds, job.scorer, work_dir, score_parts, shard_size, device,
                     ranks)  # fmt: skip

    def write() -> Path:
        pairs, samples, counts = build_outputs(
            prompts, job.seeds, work_dir, score_parts, shard_size, job.selection, digest
        )
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
            "the prompt set holds no prompt (check --prompts.file, --prompts.split and "
            "--prompts.limit): there is nothing to sample."
        )
    if len(prompts) < len(loaded):
        rank_zero_info(f"pairs: {len(loaded) - len(prompts)} repeated prompts kept once")
    return prompts
