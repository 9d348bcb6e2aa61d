"""Which contrastive template preset separates chosen from rejected better, and how fast.

For each preset, SmolLM2-135M-Instruct annotates the first ``--limit`` HH-RLHF pairs and we
report the share of pairs whose chosen response gets a higher MEAN token reward than the
rejected one, with its standard error ``sqrt(p (1 - p) / n)``, and the annotation throughput
(tokens forwarded per second, contexts included). The plain-prompt likelihood baseline (mean
token logp of chosen > rejected, no contrastive prompt) is reported beside it with
``--reference``.

Defaults keep sequences modest for CPUs: max_length 512, max_prompt_length 384,
max_context_length 640 (contrastive contexts, which in the revise preset include the response).
Cost: about 1,000 (instruct) and 1,400 (revise) forwarded tokens per pair, +50 % for
``--reference`` on the first preset; on 2 CPU cores (~250 tokens/s) 500 pairs take about 35 and
50 minutes. Work is saved in resumable chunks under ``--work-dir``: a killed run continues where
it stopped (rerun the same command).

    .venv/bin/python bench/annotate_presets.py --limit 500 --out bench/annotate_presets.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from treg_lightning.data.errors import SkipReport
from treg_lightning.data.formats import normalize_rows
from treg_lightning.data.sources import load_source
from treg_lightning.data.tokenize import PairTokenizer, tokenize_pairs
from treg_lightning.models.loading import cache_root, load_causal_lm, load_tokenizer
from treg_lightning.rewards.annotate import ContrastiveScorer
from treg_lightning.rewards.cache import build_in_chunks
from treg_lightning.rewards.prompts import PRESETS

DEFAULT_DATA = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="pairs file (HH-RLHF jsonl.gz)")
    p.add_argument("--model", default="smollm2", help="evaluator model (default: smollm2)")
    p.add_argument("--limit", type=int, default=500, help="first N pairs of the file")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=384)
    p.add_argument("--max-context-length", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-pairs", type=int, default=16, help="pairs per resumable chunk")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--reference", action="store_true", help="also the plain-likelihood baseline")
    p.add_argument("--work-dir", default=None, help="resumable chunks (default: under cache)")
    p.add_argument("--out", default="annotate_presets.json", help="results json")
    return p.parse_args(argv)


def load_pairs(args, tokenizer) -> tuple[list[dict], SkipReport]:
    source = load_source(args.data, limit=args.limit)
    report = SkipReport()
    examples = normalize_rows(source, skip_invalid_rows=True, report=report)
    pair_tokenizer = PairTokenizer(tokenizer, args.max_length, args.max_prompt_length)
    rows = tokenize_pairs(examples, pair_tokenizer, True, report, source.name)
    return rows, report


def separation(chosen: list, rejected: list) -> dict:
    """Share of pairs with mean(chosen) > mean(rejected), its standard error, ties, margin."""
    chosen_means = np.array([np.mean(v) for v in chosen])
    rejected_means = np.array([np.mean(v) for v in rejected])
    n = len(chosen_means)
    p = float(np.mean(chosen_means > rejected_means)) if n else float("nan")
    return {
        "n": n,
        "accuracy": p,
        "stderr": math.sqrt(p * (1 - p) / n) if n else float("nan"),
        "ties": int(np.sum(chosen_means == rejected_means)),
        "mean_margin": float(np.mean(chosen_means - rejected_means)) if n else float("nan"),
    }


def run_preset(args, preset: str, model, tokenizer, rows, with_reference: bool) -> dict:
    scorer = ContrastiveScorer(
        preset,
        batch_size=args.batch_size,
        store_reference_logps=with_reference,
        max_context_length=args.max_context_length,
    )
    key = hashlib.sha256(
        json.dumps(
            [
                args.model,
                args.data,
                args.limit,
                args.max_length,
                args.max_prompt_length,
                scorer.settings(),
            ],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:12]
    root = Path(args.work_dir) if args.work_dir else cache_root() / "bench" / "annotate_presets"
    start = time.perf_counter()
    chunks_done = []
    ds = build_in_chunks(
        rows,
        root / f"{preset}-{key}",
        lambda chunk: scorer.score(model, tokenizer, chunk),
        args.chunk_pairs,
        on_chunk_done=chunks_done.append,
    )
    result = separation(ds["chosen_token_rewards"], ds["rejected_token_rewards"])
    result.update(
        forward_tokens=scorer.stats["tokens"],
        forward_seconds=round(scorer.stats["seconds"], 2),
        tokens_per_s=round(scorer.stats["tokens"] / max(scorer.stats["seconds"], 1e-9), 1),
        chunks_computed=len(chunks_done),
        wall_seconds=round(time.perf_counter() - start, 2),
    )
    if with_reference:
        result["plain_likelihood"] = separation(
            ds["chosen_ref_token_logps"], ds["rejected_ref_token_logps"]
        )
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model).eval()
    rows, report = load_pairs(args, tokenizer)
    print(f"{len(rows)} pairs ({report.summary()})")
    results = {
        "model": args.model,
        "data": args.data,
        "pairs": len(rows),
        "data_report": report.summary(),
        "settings": {
            k: getattr(args, k)
            for k in (
                "limit",
                "max_length",
                "max_prompt_length",
                "max_context_length",
                "batch_size",
                "chunk_pairs",
            )
        },
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "metric": "share of pairs with mean token reward chosen > rejected; stderr "
        "sqrt(p(1-p)/n); tokens_per_s counts every forwarded token (contexts + responses)",
        "presets": {},
    }
    for i, preset in enumerate(p for p in args.presets.split(",") if p):
        with_reference = args.reference and i == 0
        results["presets"][preset] = run_preset(
            args, preset, model, tokenizer, rows, with_reference
        )
        r = results["presets"][preset]
        print(
            f"{preset}: accuracy {r['accuracy']:.3f} +- {r['stderr']:.3f} (n={r['n']}), "
            f"{r['tokens_per_s']:.0f} tok/s"
        )
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
