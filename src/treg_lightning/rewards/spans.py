"""Token rewards read from the data: character spans with a value, mapped onto the tokens.

A pair may carry, per response, a list of spans (span-level human feedback: which sentence is
wrong, rude, unsafe)::

    {"prompt": "...", "chosen": "...", "rejected": "Sure. Here is how to pick a lock: ...",
     "rejected_spans": [{"start": 6, "end": 38, "reward": -0.5}]}

``start`` / ``end`` are character offsets (``end`` exclusive) into the response text as it is
trained on: the assistant reply with its surrounding whitespace stripped (the ``chosen`` /
``rejected`` text of the normalized row, :mod:`treg_lightning.data.formats`). A span may also
carry ``"text"``: the characters it covers, checked against the response (a guard against offsets
computed on another version of the text).

Mapping to tokens (the fast tokenizer's offset mapping of the response text, which is how the
response ids are built, :mod:`treg_lightning.data.tokenize`):

- a token gets a span's value when at least one of its characters lies inside the span (a token
  half inside a span counts as inside); a token touched by two spans gets the value of the one
  covering more of its characters (the earlier span on a tie);
- the characters a token covers are the ones its tokenizer reports: byte-level BPE tokenizers
  (GPT-2, Llama-3, SmolLM2) count a leading space as part of the token (``" world"`` is
  characters 5-11 of ``"Hello world"``), so a span starting at the ``w`` covers it;
- the end-of-turn token appended to each response covers one virtual character at position
  ``len(text)``: a span with ``end = len(text) + 1`` covers it, one ending at ``len(text)`` does
  not;
- every other token gets ``default``.

Values are on the regularizer's scale, ``[-0.5, 0.5]``, or on a declared ``value_range`` ``(lo,
hi)`` rescaled linearly onto it (``lo -> -0.5``, ``hi -> 0.5``). Bad annotations (a span outside
the text, an empty span, two overlapping spans with different values however they nest, a value
outside the range, a response whose token ids cannot be rebuilt from its text) raise
:class:`SpanAnnotationError` naming the row and field, or with ``skip_bad_annotations`` are
counted and dropped (that response's tokens get ``default``) with a warning. The values are
cached like every source's, fingerprinted with the annotations.

Values computed per word, or per token of another tokenizer, come as ``{side}_pieces``: the
pieces with their text, which must spell the response (surrounding whitespace aside)::

    "rejected_pieces": [{"text": "Sure.", "reward": 0.0}, {"text": " Here", "reward": -0.4}, ...]

Each piece becomes a span over its characters (a piece with ``"reward": null`` stays
unannotated), then the rules above apply.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from treg_lightning.errors import ConfigError, UserError
from treg_lightning.pairs import SIDES, field
from treg_lightning.rewards.cache import compute_fingerprint, load_or_build
from treg_lightning.rewards.source import AnnotationContext, TokenRewardSource, cache_folder_for

SPAN_KEYS = ("start", "end", "reward")


class SpanAnnotationError(UserError, ValueError):
    """A row's span annotations cannot be mapped onto its tokens (the message names the row)."""


class SpanRewards(TokenRewardSource):
    """Token rewards from character spans carried by the data (``{side}_spans`` columns).

    Args:
        default: Value of the tokens no span covers, on the regularizer's scale (-0.5, 0.5).
        value_range: Declared range ``[lo, hi]`` of the span values, rescaled linearly onto
            [-0.5, 0.5]; None: the values are already on that scale. Values outside are refused.
        skip_bad_annotations: Count and drop a response's bad annotations (its tokens get
            ``default``) with a warning, instead of stopping with an error naming the row.
        chunk_pairs: Pairs per cache chunk.
        cache_dir: Folder of the caches; None: `$TREG_CACHE/token_rewards` or
            `~/.cache/treg_lightning/token_rewards`.
    """

    def __init__(
        self,
        default: float = 0.0,
        value_range: tuple[float, float] | None = None,
        skip_bad_annotations: bool = False,
        chunk_pairs: int = 256,
        cache_dir: str | None = None,
    ) -> None:
        if not -0.5 <= default <= 0.5:
            raise ConfigError(
                f"SpanRewards: default must be in [-0.5, 0.5] (the regularizer's scale), got "
                f"{default}."
            )
        if value_range is not None:
            lo, hi = (float(v) for v in value_range)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ConfigError(
                    f"SpanRewards: value_range must be [lo, hi] with finite lo < hi, got "
                    f"{list(value_range)}."
                )
            value_range = (lo, hi)
        if chunk_pairs < 1:
            raise ConfigError(f"SpanRewards: chunk_pairs must be >= 1, got {chunk_pairs}.")
        self.default = float(default)
        self.value_range = value_range
        self.skip_bad_annotations = skip_bad_annotations
        self.chunk_pairs = chunk_pairs
        self.cache_dir = cache_dir
        self.skipped: dict[str, int] = {}

    @property
    def cache_folder(self) -> Path:
        return cache_folder_for(self.cache_dir)

    def settings(self) -> dict[str, Any]:
        """What changes the values (for the cache fingerprint)."""
        return {
            "source": "spans",
            "default": self.default,
            "value_range": self.value_range,
            "skip_bad_annotations": self.skip_bad_annotations,
        }

    def annotate(
        self, rows: list[Mapping[str, Any]], split: str, context: AnnotationContext
    ) -> Any:
        """The split's cache (a ``datasets.Dataset``); every row is checked first, so a bad
        annotation stops the run before anything is built or trained."""
        values = self.token_values(rows, context.tokenizer, split)
        by_row = {id(row): i for i, row in enumerate(rows)}
        fingerprint = compute_fingerprint(
            model=None,
            tokenizer=context.tokenizer,
            template=None,
            rows=rows,
            settings={
                **self.settings(),
                **dict(context.settings),
                "annotations": annotations_digest(rows),
            },
            model_name="spans",
        )

        def score_chunk(chunk: list[Mapping[str, Any]]) -> dict[str, list[np.ndarray]]:
            return {
                name: [column[by_row[id(row)]] for row in chunk] for name, column in values.items()
            }

        return load_or_build(
            rows,
            self.cache_folder / f"{split}-{fingerprint.digest[:16]}",
            fingerprint,
            score_chunk,
            chunk_pairs=self.chunk_pairs,
        )

    def token_values(
        self, rows: Sequence[Mapping[str, Any]], tokenizer, split: str = "train"
    ) -> dict[str, list[np.ndarray]]:
        """``{"chosen_token_rewards": [float32 array per row], ...}`` of ``rows``.

        Raises:
            SpanAnnotationError: a bad annotation (unless ``skip_bad_annotations``).
        """
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(
                "SpanRewards needs a fast tokenizer (offset mappings) to map character spans "
                f"onto tokens; {type(tokenizer).__name__} is not one. Use the model's "
                "tokenizer.json (PreTrainedTokenizerFast)."
            )
        columns: dict[str, list[np.ndarray]] = {field(s, "token_rewards"): [] for s in SIDES}
        skipped = 0
        first_problem = None
        for position, row in enumerate(rows):
            for side in SIDES:
                try:
                    values = self.response_values(row, side, tokenizer)
                except SpanAnnotationError as error:
                    if not self.skip_bad_annotations:
                        raise
                    skipped += 1
                    first_problem = first_problem or str(error)
                    values = np.full(len(row[field(side, "ids")]), self.default, np.float32)
                columns[field(side, "token_rewards")].append(values)
        self.skipped[split] = skipped
        if skipped:
            warnings.warn(
                f"SpanRewards: {skipped} response(s) of the {split} split had bad span "
                f"annotations, dropped (their tokens get default={self.default}); the first: "
                f"{first_problem}",
                stacklevel=2,
            )
        return columns

    def response_values(self, row: Mapping[str, Any], side: str, tokenizer) -> np.ndarray:
        """Per-token values of one response (one per id in ``row[f"{side}_ids"]``)."""
        return self._mapped(row, side, tokenizer, self.default, scaled=True)

    def response_marks(self, row: Mapping[str, Any], side: str, tokenizer) -> np.ndarray:
        """The span values of one response's tokens as annotated (not rescaled, no range
        check), NaN where no span covers a token: the ground truth of ``treg audit``."""
        return self._mapped(row, side, tokenizer, np.nan, scaled=False)

    def _mapped(self, row, side: str, tokenizer, default: float, scaled: bool) -> np.ndarray:
        ids = list(row[field(side, "ids")])
        out = np.full(len(ids), default, np.float32)
        where = _Where(row, side)
        text = row[side]
        spans = row.get(field(side, "spans"))
        pieces = row.get(field(side, "pieces"))
        if spans and pieces:
            raise where.error(f"give either spans or {field(side, 'pieces')}, not both")
        if pieces:
            where.field = field(side, "pieces")
            spans = pieces_to_spans(pieces, text, where)
        if not spans:
            return out
        spans = self._checked_spans(spans, text, where, scaled)
        offsets = response_offsets(tokenizer, text, ids, where)
        starts = np.array([s[0] for s in spans])
        ends = np.array([s[1] for s in spans])
        values = np.array([s[2] for s in spans], np.float32)
        for j, (a, b) in enumerate(offsets):
            if b <= a:
                continue
            overlap = np.minimum(ends, b) - np.maximum(starts, a)
            best = int(np.argmax(overlap))  # first maximum: the earlier span on a tie
            if overlap[best] > 0:
                out[j] = values[best]
        return out

    def _checked_spans(
        self, spans, text: str, where: _Where, scaled: bool = True
    ) -> list[tuple[int, int, float]]:
        if not isinstance(spans, list):
            raise where.error(f"expected a list of {{start, end, reward}}, got {spans!r}")
        checked = []
        for k, span in enumerate(spans):
            if not isinstance(span, Mapping) or any(key not in span for key in SPAN_KEYS):
                raise where.error(f"span {k} is {span!r}; each span needs start, end, reward", k)
            start, end, value = span["start"], span["end"], span["reward"]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
                raise where.error(f"start and end must be integers, got {start!r}, {end!r}", k)
            if start == end:
                raise where.error(
                    f"span [{start}, {end}) is empty (start equals end, so it covers no "
                    "character); remove it, or give the end of the text it marks (end is "
                    "exclusive)",
                    k,
                )
            if start > end:
                raise where.error(
                    f"span [{start}, {end}) ends before it starts; start is the first character "
                    "and end the one after the last",
                    k,
                )
            if not 0 <= start < end <= len(text) + 1:
                raise where.error(
                    f"span [{start}, {end}) lies outside the response text ({len(text)} "
                    f"characters; end may be {len(text) + 1} to cover the end-of-turn token)",
                    k,
                )
            if "text" in span and text[start:end] != span["text"]:
                raise where.error(
                    f"span [{start}, {end}) covers {text[start:end]!r} but says "
                    f"text={span['text']!r}: the offsets were computed on another text (offsets "
                    "count the response with its surrounding whitespace stripped)",
                    k,
                )
            checked.append((start, end, self._scaled(value, where, k, scaled)))
        check_overlaps(checked, where)
        return checked

    def _scaled(self, value, where: _Where, k: int, scaled: bool = True) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise where.error(f"reward must be a number, got {value!r}", k)
        if not scaled:
            return float(value)
        lo, hi = self.value_range if self.value_range is not None else (-0.5, 0.5)
        if not lo <= value <= hi:  # also refuses NaN
            declared = "the declared value_range" if self.value_range else "the (-0.5, 0.5) scale"
            raise where.error(
                f"reward {value} is outside {declared} [{lo}, {hi}]; "
                "set data.rewards.value_range to the range of your values",
                k,
            )
        return float(value) if self.value_range is None else (value - lo) / (hi - lo) - 0.5


def check_overlaps(spans: Sequence[tuple[int, int, float]], where: _Where) -> None:
    """Refuse any two overlapping spans with different values, however they nest.

    A sweep by start: when a span opens, every earlier span still open (its end beyond this
    start) overlaps it, whether it is the previous one in start order or one that opened long
    before and covers both (``[0, 20)`` around ``[2, 4)`` and ``[8, 12)``).
    """
    order = sorted(range(len(spans)), key=lambda k: spans[k][:2])
    open_spans: list[int] = []
    for current in order:
        start, end, value = spans[current]
        open_spans = [k for k in open_spans if spans[k][1] > start]
        for earlier in open_spans:
            if spans[earlier][2] != value:
                first, second = sorted((earlier, current))
                (a0, b0, _), (a1, b1, _) = spans[first], spans[second]
                raise where.error(
                    f"spans {first} [{a0}, {b0}) and {second} [{a1}, {b1}) overlap with "
                    "different rewards; make them disjoint or give them the same value",
                    second,
                )
        open_spans.append(current)


class _Where:
    """Names a row's spans field in messages."""

    def __init__(self, row: Mapping[str, Any], side: str) -> None:
        self.index = row.get("index", "?")
        self.field = field(side, "spans")

    def error(self, message: str, span: int | None = None) -> SpanAnnotationError:
        at = self.field if span is None else f"{self.field}[{span}]"
        return SpanAnnotationError(
            f"data row {self.index}, field '{at}': {message}. Fix the annotation, or set "
            "data.rewards.skip_bad_annotations=true to count and drop bad annotations."
        )


def response_offsets(tokenizer, text: str, ids: Sequence[int], where: _Where | None = None):
    """Character range ``(start, end)`` of each response token in ``text``: the tokenizer's
    offsets, the appended end-of-turn token at ``(len(text), len(text) + 1)``.

    Raises:
        SpanAnnotationError: ``ids`` are not the tokens of ``text`` (plus end-of-turn, possibly
            cut by truncation): the response was changed on its way to the ids.
    """
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    own, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    if not own or own[-1] != tokenizer.eos_token_id:
        own.append(tokenizer.eos_token_id)
        offsets.append((len(text), len(text) + 1))
    if list(ids) != own[: len(ids)]:
        at = next((j for j, (a, b) in enumerate(zip(ids, own)) if a != b), min(len(ids), len(own)))
        message = (
            f"the response's token ids differ from the tokens of its text at token {at}: the "
            "text was changed on its way to the ids (chat template or tokenizer), so the spans "
            "cannot be placed"
        )
        if where is None:
            raise SpanAnnotationError(message + ".")
        raise where.error(message)
    return offsets[: len(ids)]


def pieces_to_spans(pieces, text: str, where: _Where) -> list[dict[str, Any]]:
    """Spans of values given per piece of text (``[{"text": "Hello", "reward": 0.1}, {"text":
    " world", "reward": -0.3}, ...]``, one per word or per token of another tokenizer): the
    pieces must spell the response (surrounding whitespace aside); a piece whose reward is null
    is left unannotated."""
    if not isinstance(pieces, list) or not all(
        isinstance(p, Mapping) and isinstance(p.get("text"), str) and "reward" in p for p in pieces
    ):
        raise where.error('expected a list of {"text": str, "reward": number or null}')
    joined = "".join(p["text"] for p in pieces)
    lead = len(joined) - len(joined.lstrip())
    if joined.strip() != text:
        at = next(
            (i for i, (a, b) in enumerate(zip(joined.strip(), text)) if a != b),
            min(len(joined.strip()), len(text)),
        )
        raise where.error(
            f"the pieces spell another text than the response (first difference at character "
            f"{at}: {joined.strip()[at : at + 20]!r} vs {text[at : at + 20]!r}); the values were "
            "computed on another version of the text"
        )
    spans, position = [], -lead
    for piece in pieces:
        start, end = max(position, 0), min(position + len(piece["text"]), len(text))
        if piece["reward"] is not None and end > start:
            spans.append({"start": start, "end": end, "reward": piece["reward"]})
        position += len(piece["text"])
    return spans


def annotations_digest(rows: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of every row's span annotations (part of the cache fingerprint)."""
    h = hashlib.sha256()
    for row in rows:
        spans = [row.get(field(side, name)) for side in SIDES for name in ("spans", "pieces")]
        h.update(json.dumps(spans, sort_keys=True, default=str).encode())
    return h.hexdigest()
