"""The token-reward cache: fingerprints, the chunked resumable build across ranks (a pass of
:mod:`treg_lightning.passes`), storage.

Everything that touches the disk for token rewards lives here; scoring lives in
:mod:`treg_lightning.rewards.annotate`, the choice of evaluator in
:mod:`treg_lightning.rewards.contrastive`. The on-disk format is described in
docs/cache-format.md. In short::

    fp = compute_fingerprint(model=evaluator, tokenizer=tok, template=scorer.template,
                             rows=rows, settings={**scorer.settings(), "max_length": 512})
    ds = load_or_build(rows, cache_dir, fp,
                       score_chunk=lambda chunk: scorer.score(evaluator, tok, chunk))

``rows`` are tokenized pairs (``index``, ``prompt`` messages, ``chosen`` / ``rejected`` texts,
``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``); ``score_chunk(rows)`` returns their per-token
value columns under the names of :mod:`treg_lightning.pairs` (``chosen_token_rewards``, ...).
"""

from treg_lightning.rewards.cache.chunks import build_in_chunks, merge_chunks
from treg_lightning.rewards.cache.fingerprint import (
    FORMAT,
    FORMAT_VERSION,
    Fingerprint,
    compute_fingerprint,
    model_identity,
    rows_digest,
    tokenizer_identity,
)
from treg_lightning.rewards.cache.store import (
    CacheError,
    load_or_build,
    read_meta,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CacheError",
    "Fingerprint",
    "build_in_chunks",
    "compute_fingerprint",
    "load_or_build",
    "merge_chunks",
    "model_identity",
    "read_meta",
    "rows_digest",
    "tokenizer_identity",
]
