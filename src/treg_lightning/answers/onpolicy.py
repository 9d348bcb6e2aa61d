"""``treg pairs``: on-policy preference pairs, sampled from the policy, scored, picked.

For every prompt of a prompt set (:func:`treg_lightning.answers.prompt_sets.load_prompt_set`: a
prompts file or the prompts of the data's split, each prompt once) the policy writes ``k``
answers, one per seed (default 13, 21, 42, 79, 100, SimPO's), a
:class:`~treg_lightning.answers.scorers.Scorer` scores them and a selection rule
(:class:`~treg_lightning.answers.selection.BestWorst`) picks chosen and rejected or drops the
prompt. Two stages, each resumable and sharded over ranks (shard ``s``
of ``shard_size`` prompts on rank ``s % world_size``), in
``<output>.parts/<fingerprint of the samples>/``:

- ``samples-seed<seed>/shard-<s>.jsonl``: the answers of one seed, written by ``treg predict``'s
  shard machinery (:func:`treg_lightning.answers.predictions.generate_shards`), so a seed's
  answers are the answers ``treg predict --seed <seed>`` gives;
- ``scores-<fingerprint of the scorer>/shard-<s>.jsonl``: the scores of every sample of the
  shard's prompts; identical answers to a prompt are scored once, so they tie exactly.

Shards are written whole (temp file + ``os.replace``): after a kill, the rerun of the same
command skips the finished shards and writes the same files as an uninterrupted run. Another
scorer reuses the samples; other sampling settings get another folder. Rank 0 then writes:

- ``output``: the pairs, ``{"prompt": [messages as sampled], "chosen": [{"role": "assistant",
  ...}], "rejected": [...], ...}``, the conversational layout ``PreferenceDataModule`` reads;
- ``<output stem>.samples.jsonl``: every sample with its seed, score, finish reason, role
  (chosen / rejected / null), the prompt's drop reason and the settings' fingerprint;
- ``<output stem>.summary.json``: the settings' fingerprint record, the prompts kept and dropped
  (per reason) and the mean chosen - rejected score margin.

No file is written over unless ``overwrite`` (a sidecar left by an interrupted write of the same
run is the exception: it is the same file).
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule

from treg_lightning.answers.generation import GenerationBackend, SamplingSettings
from treg_lightning.answers.predictions import (
    PolicySource,
    PredictSettings,
    default_generator,
    fingerprint,
    generate_shards,
    on_every_process,
    parts_folder,
    read_jsonl,
    shard_path,
    shard_slices,
    write_jsonl_atomic,
)
from treg_lightning.answers.scorers import Scorer
from treg_lightning.answers.selection import DROP_REASONS, BestWorst, Choice, Sample
from treg_lightning.errors import ConfigError, MissingFileError

FORMAT = "treg-lightning-pairs"
FORMAT_VERSION = 1
DEFAULT_SEEDS = (13, 21, 42, 79, 100)


def resolve_seeds(k: int | None, seeds: list[int] | None) -> list[int]:
    """The seeds of the ``k`` samples: ``seeds`` as given, else the first ``k`` of
    :data:`DEFAULT_SEEDS` (``k`` > 5: continued 101, 102, ...); k = 5 by default."""
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
    """One ``treg pairs`` call."""

    module: Any
    datamodule: Any
    ckpt_path: str | None
    prompts_file: str | None
    split: str
    limit: int | None
    settings: PairsSettings
    backend: GenerationBackend
    scorer: Scorer | None
    selection: BestWorst


@dataclass(frozen=True)
class OutputPaths:
    pairs: Path
    samples: Path
    summary: Path

    @classmethod
    def of(cls, output: str | Path) -> OutputPaths:
        path = Path(output).expanduser()
        stem = path.name[: -len(path.suffix)] if path.suffix else path.name
        return cls(path, path.with_name(f"{stem}.samples.jsonl"),
                   path.with_name(f"{stem}.summary.json"))  # fmt: skip


def check_outputs(output: str | Path, overwrite: bool) -> OutputPaths:
    """Refuse an existing pairs file unless ``overwrite``; check the folder is writable."""
    from treg_lightning.outputs import OutputFolderError, check_writable

    paths = OutputPaths.of(output)
    if paths.pairs.is_dir():
        raise OutputFolderError(errno.EISDIR, f"--output {paths.pairs} is a folder; give a .jsonl.")
    if paths.pairs.exists() and not overwrite:
        raise OutputFolderError(
            errno.EEXIST,
            f"{paths.pairs} exists: pairs never writes over a pairs file. Choose another "
            "--output, or pass --overwrite true to replace it (and its .samples.jsonl and "
            ".summary.json).",
        )
    check_writable([("--output", paths.pairs.parent)])
    return paths


def check_sidecars(paths: OutputPaths, digest: str, overwrite: bool) -> None:
    """Refuse sidecar files of another run (a sidecar of this very run, left by a write that was
    interrupted before the pairs file, is the same file and is written again)."""
    from treg_lightning.outputs import OutputFolderError

    if overwrite:
        return
    for path in (paths.samples, paths.summary):
        if path.exists() and _digest_of(path) != digest:
            raise OutputFolderError(
                errno.EEXIST,
                f"{path} exists and belongs to another run: pairs never writes over it. Choose "
                "another --output, move the file, or pass --overwrite true.",
            )


def _digest_of(path: Path) -> str | None:
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8")).get("digest")
        with path.open(encoding="utf-8") as f:
            return json.loads(f.readline()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def distinct_prompts(prompts: list[dict]) -> list[dict]:
    """Each prompt (its messages) once, in first-seen order, renumbered."""
    seen, out = set(), []
    for prompt in prompts:
        key = json.dumps(prompt["messages"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append({**prompt, "index": len(out)})
    return out


def _digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def samples_fingerprint(prompts, policy, settings: PairsSettings, backend, device) -> dict:
    """Everything that changes the samples (predict's fingerprint, with all the seeds)."""
    record = fingerprint(prompts, policy, settings.predict_settings(0), backend, device)
    record.pop("digest")
    record["sampling"].pop("seed")
    record.update(format=FORMAT, version=FORMAT_VERSION, seeds=settings.seeds)
    return {"digest": _digest(record), **record}


class _SetupOnce(GenerationBackend):
    """A backend whose policy loads once for all the seeds."""

    def __init__(self, inner: GenerationBackend) -> None:
        self.inner = inner
        self.ready = False

    def setup(self, policy, tokenizer, device, work_dir) -> None:
        if not self.ready:
            self.inner.setup(policy, tokenizer, device, work_dir)
            self.ready = True

    def generate(self, prompt_ids, sampling, key):
        return self.inner.generate(prompt_ids, sampling, key)

    def fingerprint(self) -> dict[str, Any]:
        return self.inner.fingerprint()

    def release(self) -> None:
        """Free the policy before the scorer loads (the device is needed for it)."""
        for name in ("model", "engine"):
            if getattr(self.inner, name, None) is not None:
                setattr(self.inner, name, None)
        self.ready = False
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def seed_folder(work_dir: Path, seed: int) -> Path:
    return work_dir / f"samples-seed{seed}"


def read_shard(path: Path, expected: list[int]) -> list[dict]:
    if not path.is_file():
        raise RuntimeError(
            f"shard {path} is missing after every rank finished: a rank failed. Rerun the same "
            "command: finished shards are kept and only the missing ones are made."
        )
    rows = read_jsonl(path)
    if [row["index"] for row in rows] != expected:
        raise RuntimeError(f"shard {path} holds other prompts than expected; delete it.")
    return rows


def score_shards(prompts, seeds, scorer: Scorer, work_dir: Path, score_dir: Path, shard_size: int,
                 device: torch.device, rank: int = 0, world_size: int = 1) -> int:  # fmt: skip
    """Score this rank's unfinished shards (each distinct non-empty answer of a prompt once);
    returns the number of prompts scored."""
    slices = shard_slices(len(prompts), shard_size)
    todo = [k for k in range(len(slices))
            if k % world_size == rank and not shard_path(score_dir, k).is_file()]  # fmt: skip
    if todo:
        scorer.setup(device)
    done = 0
    for k in todo:
        part = prompts[slices[k]]
        expected = [p["index"] for p in part]
        shards = [read_shard(shard_path(seed_folder(work_dir, s), k), expected) for s in seeds]
        items, at = [], {}
        for i, prompt in enumerate(part):
            for shard in shards:
                text = shard[i]["output"]
                if text.strip() and (i, text) not in at:
                    at[(i, text)] = len(items)
                    items.append((prompt["messages"], text))
        values = scorer.score(items) if items else []
        rows = []
        for i, prompt in enumerate(part):
            scores = []
            for shard in shards:
                position = at.get((i, shard[i]["output"]))
                value = None if position is None else float(values[position])
                scores.append(value if value is not None and math.isfinite(value) else None)
            rows.append({"index": prompt["index"], "scores": scores})
        write_jsonl_atomic(shard_path(score_dir, k), rows)
        done += len(part)
    return done


def build_outputs(prompts, seeds, work_dir: Path, score_dir: Path, shard_size: int,
                  selection: BestWorst, digest: str) -> tuple[list, list, dict]:  # fmt: skip
    """Pairs rows, sample rows and the counts, in prompt order, from the finished shards."""
    pairs, samples = [], []
    dropped = dict.fromkeys(DROP_REASONS, 0)
    margins = []
    for k, part in enumerate(shard_slices(len(prompts), shard_size)):
        expected = [p["index"] for p in prompts[part]]
        shards = [read_shard(shard_path(seed_folder(work_dir, s), k), expected) for s in seeds]
        scores = read_shard(shard_path(score_dir, k), expected)
        for i, prompt in enumerate(prompts[part]):
            rows = [shard[i] for shard in shards]
            values = scores[i]["scores"]
            choice: Choice = selection.select(
                [Sample(j, row["output"], values[j]) for j, row in enumerate(rows)]
            )
            if choice.kept:
                best, worst = rows[choice.chosen], rows[choice.rejected]
                margins.append(values[choice.chosen] - values[choice.rejected])
                pairs.append({
                    **prompt.get("extra", {}),  # first: a prompt file's fields never replace ours
                    "prompt": prompt["messages"],
                    "chosen": [{"role": "assistant", "content": best["output"]}],
                    "rejected": [{"role": "assistant", "content": worst["output"]}],
                    "prompt_index": prompt["index"],
                    "chosen_score": values[choice.chosen],
                    "rejected_score": values[choice.rejected],
                    "chosen_seed": seeds[choice.chosen],
                    "rejected_seed": seeds[choice.rejected],
                })  # fmt: skip
            else:
                dropped[choice.dropped] += 1
            for j, row in enumerate(rows):
                role = {choice.chosen: "chosen", choice.rejected: "rejected"}.get(j)
                samples.append({
                    "fingerprint": digest,
                    "prompt_index": prompt["index"],
                    "instruction": prompt["instruction"],
                    "position": j,
                    "seed": seeds[j],
                    "output": row["output"],
                    "output_tokens": row["output_tokens"],
                    "finish_reason": row["finish_reason"],
                    "score": values[j],
                    "role": role if choice.kept else None,
                    "dropped": choice.dropped,
                })  # fmt: skip
    counts = {
        "prompts": len(prompts),
        "kept": len(pairs),
        "dropped": dropped,
        "mean_margin": sum(margins) / len(margins) if margins else None,
        "samples": len(samples),
        "hit_max_new_tokens": sum(s["finish_reason"] == "length" for s in samples),
    }
    return pairs, samples, counts


def run_pairs(trainer, job: PairsJob) -> Path | None:
    """``treg pairs``: check the settings, launch the strategy's processes, run the stages."""
    if job.module is None or job.datamodule is None:
        raise ConfigError("pairs needs the model and data sections (--config ...).")
    if job.scorer is None:
        raise ConfigError(
            "pairs needs a scorer: --scorer treg_lightning.answers.scorers.ImplicitRewardScorer "
            "(with policy and reference) or "
            "treg_lightning.answers.scorers.SequenceClassifierScorer (with "
            "name_or_path)."
        )
    if job.ckpt_path is not None and not Path(job.ckpt_path).exists():
        raise MissingFileError(
            f"--ckpt_path {job.ckpt_path} does not exist: give a .ckpt file or a sharded "
            "checkpoint folder, or drop --ckpt_path to sample from model.model as it is."
        )
    paths = check_outputs(job.settings.output, job.settings.overwrite)
    return on_every_process(trainer, job, _pairs, paths)


def _pairs(trainer, job: PairsJob, paths: OutputPaths) -> Path | None:
    from lightning.pytorch.utilities import rank_zero_info

    from treg_lightning.answers.prompt_sets import load_prompt_set

    strategy, settings = trainer.strategy, job.settings
    strategy.setup_environment()
    if trainer.local_rank == 0:
        job.datamodule.prepare_data()
    strategy.barrier("pairs-prepare")
    loaded = load_prompt_set(job.datamodule, job.prompts_file, job.split, job.limit)
    prompts = distinct_prompts(loaded)
    if not prompts:
        raise ConfigError(
            "the prompt set holds no prompt (check --prompts, --split and --limit): there is "
            "nothing to sample."
        )
    if len(prompts) < len(loaded):
        rank_zero_info(f"pairs: {len(loaded) - len(prompts)} repeated prompts kept once")
    job.scorer.check([p["messages"] for p in prompts])  # before any weights load
    tokenizer = job.datamodule.get_tokenizer()
    policy = PolicySource(job.module, job.ckpt_path)
    device = strategy.root_device
    record = samples_fingerprint(prompts, policy, settings, job.backend, device)
    scoring = {"samples": record["digest"], "scorer": job.scorer.fingerprint()}
    score_digest = _digest(scoring)
    digest = _digest({**scoring, "selection": job.selection.fingerprint()})
    work_dir = parts_folder(paths.pairs, record["digest"])
    score_dir = work_dir / f"scores-{score_digest[:16]}"
    if trainer.global_rank == 0:
        check_sidecars(paths, digest, settings.overwrite)
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "settings.json").write_text(json.dumps(record, indent=1, default=str))
    strategy.barrier("pairs-start")
    generator = settings.generator or default_generator(job.module, job.ckpt_path)
    backend = _SetupOnce(job.backend)
    for seed in settings.seeds:
        folder = seed_folder(work_dir, seed)
        folder.mkdir(parents=True, exist_ok=True)
        generate_shards(
            prompts, backend, policy, tokenizer, settings.predict_settings(seed), folder,
            generator, device, trainer.global_rank, trainer.world_size,
        )  # fmt: skip
    backend.release()
    strategy.barrier("pairs-samples")
    if settings.sample_only:
        rank_zero_info(f"pairs: samples of {len(prompts)} prompts kept in {work_dir}")
        return None
    if trainer.global_rank == 0:
        score_dir.mkdir(parents=True, exist_ok=True)
    strategy.barrier("pairs-score-start")
    score_shards(prompts, settings.seeds, job.scorer, work_dir, score_dir, settings.shard_size,
                 device, trainer.global_rank, trainer.world_size)  # fmt: skip
    strategy.barrier("pairs-scores")
    if trainer.global_rank != 0:
        return None
    pairs, samples, counts = build_outputs(
        prompts, settings.seeds, work_dir, score_dir, settings.shard_size, job.selection, digest
    )
    summary = {"digest": digest, **counts, "settings": {**record, "scoring": scoring,
               "selection": job.selection.fingerprint()}}  # fmt: skip
    write_jsonl_atomic(paths.samples, samples)
    write_json_atomic(paths.summary, summary)
    write_jsonl_atomic(paths.pairs, pairs)  # last: its presence means the run is complete
    shutil.rmtree(work_dir, ignore_errors=True)
    try:
        work_dir.parent.rmdir()
    except OSError:
        pass
    reasons = ", ".join(f"{n} {r}" for r, n in counts["dropped"].items() if n) or "none"
    print(f"{counts['kept']} pairs of {counts['prompts']} prompts written to "
          f"{paths.pairs.resolve()} (dropped: {reasons})", flush=True)  # fmt: skip
    return paths.pairs


def write_json_atomic(path: Path, value: dict) -> None:
    """``value`` as indented JSON, written to a temp file and moved into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


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
    job = PairsJob(
        model, datamodule, ckpt_path, prompts, split, limit, settings,
        backend if backend is not None else TransformersBackend(), scorer,
        selection if selection is not None else BestWorst(),
    )  # fmt: skip
    return run_pairs(self, job)
