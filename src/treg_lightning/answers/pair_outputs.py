"""The files ``treg pairs`` writes, and the refusal to write over another run's.

Rank 0 writes, once every shard is sampled and scored:

- ``output``: the pairs, ``{"prompt": [messages as sampled], "chosen": [{"role": "assistant",
  ...}], "rejected": [...], ...}``, the conversational layout ``PreferenceDataModule`` reads, as
  JSON lines (``.jsonl``) or one JSON list (``.json``), as its name says;
- ``<output stem>.samples.jsonl``: every sample with its seed, score, finish reason, role
  (chosen / rejected / null), the prompt's drop reason and the settings' fingerprint;
- ``<output stem>.summary.json``: the settings' fingerprint record, the prompts kept and dropped
  (per reason) and the mean chosen - rejected score margin.

No file is written over unless ``overwrite`` (a sidecar left by an interrupted write of the same
run is the exception: it is the same file). The pairs file is written last: its presence means
the run is complete.
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass
from pathlib import Path

from treg_lightning.answers.pair_sampling import seed_parts
from treg_lightning.answers.predictions import OUTPUT_ADVICE, read_shard, write_rows
from treg_lightning.answers.record_files import check_suffix, write_records
from treg_lightning.answers.selection import DROP_REASONS, BestWorst, Choice, Sample
from treg_lightning.outputs import OutputFolderError, check_writable, disk_full_hint
from treg_lightning.passes import Parts, ShardPlan, write_json


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

    paths = OutputPaths.of(output)
    if paths.pairs.is_dir():
        raise OutputFolderError(
            errno.EISDIR, f"--output.path {paths.pairs} is a folder; give a .jsonl or .json name."
        )
    check_suffix(paths.pairs)
    if paths.pairs.exists() and not overwrite:
        raise OutputFolderError(
            errno.EEXIST,
            f"{paths.pairs} exists: pairs never writes over a pairs file. Choose another "
            "--output.path, or pass --output.overwrite true to replace it (and its "
            ".samples.jsonl and .summary.json).",
        )
    check_writable([("--output.path", paths.pairs.parent)])
    return paths


def check_sidecars(paths: OutputPaths, digest: str, overwrite: bool) -> None:
    """Refuse sidecar files of another run (a sidecar of this very run, left by a write that was
    interrupted before the pairs file, is the same file and is written again)."""

    if overwrite:
        return
    for path in (paths.samples, paths.summary):
        if path.exists() and _digest_of(path) != digest:
            raise OutputFolderError(
                errno.EEXIST,
                f"{path} exists and belongs to another run: pairs never writes over it. Choose "
                "another --output.path, move the file, or pass --output.overwrite true.",
            )


def _digest_of(path: Path) -> str | None:
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8")).get("digest")
        with path.open(encoding="utf-8") as f:
            return json.loads(f.readline()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def build_outputs(prompts, seeds, work_dir: Path, score_parts: Parts, shard_size: int,
                  selection: BestWorst, digest: str) -> tuple[list, list, dict]:  # fmt: skip
    """Pairs rows, sample rows and the counts, in prompt order, from the finished shards."""
    pairs, samples = [], []
    dropped = dict.fromkeys(DROP_REASONS, 0)
    margins = []
    plan = ShardPlan(len(prompts), shard_size)
    for k in range(plan.count):
        part = prompts[plan.slice(k)]
        expected = [p["index"] for p in part]
        shards = [read_shard(seed_parts(work_dir, s), k, expected) for s in seeds]
        scores = read_shard(score_parts, k, expected)
        for i, prompt in enumerate(part):
            rows = [shard[i] for shard in shards]
            values = scores[i]["scores"]
            choice: Choice = selection.select(
                [Sample(j, row["output"], values[j]) for j, row in enumerate(rows)]
            )
            if choice.kept:
                margins.append(values[choice.chosen] - values[choice.rejected])
                pairs.append(_pair_row(prompt, rows, values, seeds, choice))
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


def _pair_row(prompt: dict, rows: list[dict], values: list, seeds: list[int], choice: Choice):
    best, worst = rows[choice.chosen], rows[choice.rejected]
    return {
        **prompt.get("extra", {}),  # first: a prompt file's fields never replace ours
        "prompt": prompt["messages"],
        "chosen": [{"role": "assistant", "content": best["output"]}],
        "rejected": [{"role": "assistant", "content": worst["output"]}],
        "prompt_index": prompt["index"],
        "chosen_score": values[choice.chosen],
        "rejected_score": values[choice.rejected],
        "chosen_seed": seeds[choice.chosen],
        "rejected_seed": seeds[choice.rejected],
    }


def write_outputs(paths: OutputPaths, pairs: list, samples: list, summary: dict) -> None:
    """The sidecars, then the pairs file (last: its presence means the run is complete)."""
    write_rows(paths.samples, samples)
    with disk_full_hint(paths.summary, OUTPUT_ADVICE):
        write_json(paths.summary, summary, end="\n")
    write_records(paths.pairs, pairs, OUTPUT_ADVICE)  # JSON lines or a JSON list, as named
