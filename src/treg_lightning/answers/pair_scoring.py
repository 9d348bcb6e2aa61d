"""The scoring stage of ``treg pairs``: every sample of a shard's prompts scored, written as one
part ``scores-<fingerprint of the scorer>/shard-<k>.jsonl`` of rows ``{"index", "scores"}`` (one
score per seed, None for an empty answer or a score that is not finite). Identical answers to a
prompt are scored once, so they tie exactly."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from treg_lightning.answers.pair_sampling import seed_parts
from treg_lightning.answers.predictions import read_shard, write_rows
from treg_lightning.answers.scorers import Scorer
from treg_lightning.passes import Parts, Ranks, ShardPlan


def score_shards(prompts, seeds, scorer: Scorer, work_dir: Path, parts: Parts, shard_size: int,
                 device: torch.device, ranks: Ranks) -> int:  # fmt: skip
    """Score this rank's unfinished shards (the samples in ``work_dir``); returns the number of
    prompts scored."""
    plan = ShardPlan(len(prompts), shard_size)
    parts.folder.mkdir(parents=True, exist_ok=True)
    todo = parts.todo(plan, ranks)
    if todo:
        scorer.setup(device)
    for k in todo:
        part = prompts[plan.slice(k)]
        expected = [p["index"] for p in part]
        shards = [read_shard(seed_parts(work_dir, s), k, expected) for s in seeds]
        write_rows(parts.path(k), _scores(scorer, part, shards))
    return sum(plan.size(k) for k in todo)


def _scores(scorer: Scorer, part: list[dict], shards: list[list[dict]]) -> list[dict]:
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
    return rows
