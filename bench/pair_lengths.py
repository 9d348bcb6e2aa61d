"""The pairs every benchmark trains on: HH-RLHF token lengths (committed in
``bench/data/hh_lengths.json``, see ``derive_hh_lengths.py``), cut to a max length with the
contract's rule, filled with random token ids. The same file on every machine, so CPU and GPU
runs draw the same pairs from the same seed."""

from __future__ import annotations

import json
import random
from pathlib import Path

LENGTHS_FILE = Path(__file__).resolve().parent / "data" / "hh_lengths.json"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def load_table(path: Path = LENGTHS_FILE) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token lengths of every pair in ``path``."""
    return [tuple(row) for row in json.loads(path.read_text())["lengths"]]


def truncate(lengths, max_length: int, scale=1.0, response_scale=1.0) -> tuple[int, int, int]:
    """The contract's rule: the prompt keeps at most max_length // 2 tokens (cut from the left),
    each response is cut so that prompt + response <= max_length. ``scale`` stretches all
    lengths, ``response_scale`` the responses only (UltraFeedback-like pairs)."""
    scales = (scale, scale * response_scale, scale * response_scale)
    prompt, chosen, rejected = (max(1, round(n * s)) for n, s in zip(lengths, scales))
    prompt = max(2, min(prompt, max_length // 2))  # BOS + at least one prompt token
    return prompt, min(chosen, max_length - prompt), min(rejected, max_length - prompt)


def sample(count: int, max_length: int, seed: int, table=None, scale=1.0, response_scale=1.0):
    """``count`` pairs' lengths drawn (with replacement, seeded) from ``table``, truncated."""
    table = load_table() if table is None else table
    rng = random.Random(seed)
    return [truncate(rng.choice(table), max_length, scale, response_scale) for _ in range(count)]


def make_rows(lengths, vocab_size: int, seed: int) -> list[dict]:
    """Cache-like rows of the given lengths: random ids with BOS/EOS, r_hat uniform in
    (-0.5, 0.5)."""
    rng = random.Random(seed)

    def ids(n):
        return [rng.randrange(3, vocab_size) for _ in range(n)]

    rows = []
    for index, (prompt, chosen, rejected) in enumerate(lengths):
        row = {"index": index, "prompt_ids": [BOS_ID] + ids(prompt - 1)}
        for side, n in (("chosen", chosen), ("rejected", rejected)):
            row[f"{side}_ids"] = ids(n - 1) + [EOS_ID]
            row[f"{side}_token_rewards"] = [rng.random() - 0.5 for _ in range(n)]
        rows.append(row)
    return rows


def triple(row: dict) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) lengths of a row."""
    return len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"])


def pair_tokens(rows) -> int:
    """The pairs' own tokens, each once: prompt + chosen + rejected. The cross-side figure: it
    does not depend on how a side lays the pairs out."""
    return sum(sum(triple(r)) for r in rows)


def padded_tokens(batches) -> int:
    """Positions a padded ``[2B, T]`` forward computes (chosen and rejected to one length)."""
    return sum(
        2 * len(rows) * max(p + max(c, r) for p, c, r in map(triple, rows)) for rows in batches
    )


def shared_padded_tokens(batches) -> int:
    """Positions a shared-prompt ``[B, W]`` forward computes (one row per pair, padded)."""
    return sum(len(rows) * max(p + c + r + 1 for p, c, r in map(triple, rows)) for rows in batches)
