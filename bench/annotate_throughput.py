"""Throughput of the annotate pass next to a plain forward of the same tokens.

The annotate pass (:class:`treg_lightning.rewards.annotate.ContrastiveScorer` under the chunked
build of :mod:`treg_lightning.rewards.cache`) forwards each
response three times, after its better and worse contrastive contexts and after the plain prompt
(for the reference logps). Here the same sequences (contexts + response ids, built exactly as the
pass builds them) are also forwarded plainly, in the same length-sorted batches:

- ``annotate``: the whole pass (template rendering, forward, chunked log-probs, token rewards,
  chunk files and the merged dataset), tokens forwarded / wall seconds;
- ``score``: :func:`treg_lightning.rewards.annotate.score_sequences` alone (the pass's
  forward + chunked log-probs of the response tokens);
- ``plain``: ``model(input_ids, attention_mask).logits`` of the same padded batches under
  ``inference_mode``, the forward any Hugging Face user would run.

The three run alternately, ``--repeats`` times; in each repeat a side repeats its pass until
``--min-seconds`` (20 s) of wall time passed, so every figure comes from a window long enough
not to move with a moment's load. Each side reports the median over the repeats with its spread,
and the ratios to ``plain`` per repeat likewise. Tokens are non-padding tokens (contexts +
responses).

    python bench/annotate_throughput.py --limit 4 --repeats 3 --out annotate_throughput.json
    python bench/annotate_throughput.py --limit 1 --repeats 1 --min-seconds 0   # a dry run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from treg_lightning.data.errors import SkipReport
from treg_lightning.data.formats import normalize_rows
from treg_lightning.data.sources import load_source
from treg_lightning.data.tokenize import PairTokenizer, tokenize_pairs
from treg_lightning.models.loading import load_causal_lm, load_tokenizer
from treg_lightning.rewards.annotate import ContrastiveScorer, score_sequences
from treg_lightning.rewards.cache import build_in_chunks

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402  (bench/timing.py)

DEFAULT_DATA = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
)


def load_rows(args, tokenizer) -> list[dict]:
    source = load_source(args.data, limit=args.limit)
    report = SkipReport()
    examples = normalize_rows(source, skip_invalid_rows=True, report=report)
    pair_tokenizer = PairTokenizer(tokenizer, args.max_length, args.max_prompt_length)
    return tokenize_pairs(examples, pair_tokenizer, True, report, source.name)


def annotated_sequences(annotator, tokenizer, rows) -> list[tuple[list[int], list[int]]]:
    """The (context, response) id pairs the annotate pass forwards: better, worse, plain."""
    sequences = []
    for row in rows:
        for side in ("chosen", "rejected"):
            better, worse = annotator.template.build(
                tokenizer, row["prompt"], row[side], max_length=annotator.max_context_length
            )
            for context in (better, worse, list(row["prompt_ids"])):
                sequences.append((list(context), list(row[f"{side}_ids"])))
    return sequences


@torch.inference_mode()
def plain_forward(model, sequences, batch_size: int) -> None:
    """``model(...).logits`` of the sequences in score_sequences' batches (longest first)."""
    order = sorted(range(len(sequences)), key=lambda i: -sum(map(len, sequences[i])))
    for start in range(0, len(order), batch_size):
        batch = [sequences[i] for i in order[start : start + batch_size]]
        width = max(len(c) + len(r) for c, r in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for b, (context, response) in enumerate(batch):
            input_ids[b, : len(context) + len(response)] = torch.tensor(context + response)
            attention_mask[b, : len(context) + len(response)] = 1
        model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="pairs file (HH-RLHF jsonl.gz)")
    p.add_argument("--model", default="smollm2", help="evaluator model (default: smollm2)")
    p.add_argument("--limit", type=int, default=4, help="first N pairs of the file")
    p.add_argument("--template", default="instruct")
    p.add_argument("--max-length", type=int, default=320)
    p.add_argument("--max-prompt-length", type=int, default=192)
    p.add_argument("--max-context-length", type=int, default=448)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats (median)")
    p.add_argument("--min-seconds", type=float, default=timing.MIN_WINDOW_S,
                   help="timed window per side and repeat (passes repeat until then)")  # fmt: skip
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model).eval()
    rows = load_rows(args, tokenizer)
    annotator = ContrastiveScorer(
        args.template, batch_size=args.batch_size, store_reference_logps=True,
        max_context_length=args.max_context_length,
    )  # fmt: skip
    sequences = annotated_sequences(annotator, tokenizer, rows)
    tokens = sum(len(c) + len(r) for c, r in sequences)

    def annotate():
        with tempfile.TemporaryDirectory(prefix="annotate-throughput-") as work_dir:
            score_chunk = lambda chunk: annotator.score(model, tokenizer, chunk)  # noqa: E731
            build_in_chunks(rows, work_dir, score_chunk, chunk_pairs=len(rows))

    def score():
        with torch.inference_mode():
            score_sequences(model, sequences, args.batch_size)

    runs = {"plain": lambda: plain_forward(model, sequences, args.batch_size),
            "score": score, "annotate": annotate}  # fmt: skip
    seconds = {name: [] for name in runs}  # seconds of one pass, one value per repeat
    windows = {name: [] for name in runs}
    calls = dict.fromkeys(runs, 0)
    for _ in range(args.repeats):
        for name, fn in runs.items():
            count, window = timing.timed_window(fn, args.min_seconds)
            calls[name] += count
            windows[name].append(window)
            seconds[name].append(window / count)
    forwarded = annotator.stats["tokens"] // calls["annotate"]
    assert forwarded == tokens, (forwarded, tokens)  # the pass forwarded exactly these tokens
    rates = {name: [tokens / s for s in values] for name, values in seconds.items()}
    report = {
        "model": args.model, "pairs": len(rows), "sequences": len(sequences),
        "tokens": tokens, "settings": {k: str(v) for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "seconds": seconds, "timed_windows_s": windows, "passes": calls,
        "tokens_per_s": {name: statistics.median(values) for name, values in rates.items()},
        "tokens_per_s_spread": {name: timing.spread(values) for name, values in rates.items()},
        "ratio_to_plain": {
            name: timing.spread([a / b for a, b in zip(values, rates["plain"], strict=True)])
            for name, values in rates.items()
        },
    }  # fmt: skip
    for name, rate in report["tokens_per_s"].items():
        spread = report["tokens_per_s_spread"][name]
        print(f"{name:<9} {rate:8.1f} tokens/s median (min {spread['min']:.1f}, max "
              f"{spread['max']:.1f}); of plain "
              f"{timing.format_spread(report['ratio_to_plain'][name])}")  # fmt: skip
    print(f"{len(rows)} pairs, {len(sequences)} sequences, {tokens} tokens forwarded per pass; "
          f"load average {report['load_average']}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
