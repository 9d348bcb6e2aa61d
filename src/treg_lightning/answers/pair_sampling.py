"""The sampling stage of ``treg pairs``: ``k`` answers to every distinct prompt, one
``treg predict`` pass per seed (:func:`~treg_lightning.answers.predictions.generate_shards`), so a
seed's answers are the answers ``treg predict --sampling.seed <seed>`` gives. The shards of seed
``s`` lie in ``<parts folder>/samples-seed<s>/``; the parts folder is named by
:func:`samples_fingerprint`.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import torch

from treg_lightning.answers.generation import GenerationBackend
from treg_lightning.answers.predictions import (
    AnswerJob,
    PolicySource,
    fingerprint,
    generate_shards,
    record_digest,
    unfinished,
)
from treg_lightning.passes import Parts, Ranks, ShardPlan

FORMAT = "treg-lightning-pairs"
FORMAT_VERSION = 1


def distinct_prompts(prompts: list[dict]) -> list[dict]:
    """Each prompt (its messages) once, in first-seen order, renumbered."""
    seen, out = set(), []
    for prompt in prompts:
        key = json.dumps(prompt["messages"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append({**prompt, "index": len(out)})
    return out


def samples_fingerprint(prompts, policy, settings, backend, device) -> dict:
    """Everything that changes the samples (predict's fingerprint, with all the seeds of the
    :class:`~treg_lightning.answers.onpolicy.PairsJob` ``settings``)."""
    record = fingerprint(prompts, policy, settings.predict_settings(0), backend, device)
    record.pop("digest")
    record["sampling"].pop("seed")
    record.update(format=FORMAT, version=FORMAT_VERSION, seeds=settings.seeds)
    return {"digest": record_digest(record), **record}


def seed_parts(work_dir: Path, seed: int) -> Parts:
    """The shards of the answers of ``seed``."""
    return Parts(work_dir / f"samples-seed{seed}")


def unsampled(prompts, job, work_dir: Path) -> bool:
    """Whether any shard of any seed of the :class:`~treg_lightning.answers.onpolicy.PairsJob`
    ``job`` is still to be sampled (read by every rank in the same step, before any rank samples:
    see :func:`~treg_lightning.answers.predictions.unfinished`)."""
    plan = ShardPlan(len(prompts), job.generation.shard_size)
    return any(unfinished(seed_parts(work_dir, seed), plan) for seed in job.seeds)


def sample_seeds(prompts, answers: AnswerJob, policy: PolicySource, tokenizer, settings,
                 work_dir: Path, device: torch.device, ranks: Ranks,
                 pending: bool = False) -> None:  # fmt: skip
    """This rank's unfinished shards of every seed of the
    :class:`~treg_lightning.answers.onpolicy.PairsJob` ``settings``; the policy loads once for
    all the seeds (in ``work_dir``) and is freed at the end (the scorer needs the device).
    ``pending``: some rank has shards left (:func:`unsampled`)."""
    backend = _SetupOnce(answers.backend)
    generator = answers.generator(settings.generation.generator)
    for seed in settings.seeds:
        parts = seed_parts(work_dir, seed)
        parts.folder.mkdir(parents=True, exist_ok=True)
        generate_shards(prompts, backend, policy, tokenizer, settings.predict_settings(seed),
                        parts, generator, device, ranks, work_dir=work_dir,
                        pending=pending)  # fmt: skip
    backend.release()


class _SetupOnce(GenerationBackend):
    """A backend whose policy loads once for all the seeds."""

    def __init__(self, inner: GenerationBackend) -> None:
        self.inner = inner
        self.ready = False
        self.setup_on_every_rank = inner.setup_on_every_rank

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
