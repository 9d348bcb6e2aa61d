"""Self-generated token rewards by contrastive prompting (the paper's source), cached.

The evaluator (by default the reference model, as in the paper) scores every response token
under a "better" and a "worse" context (:mod:`treg_lightning.rewards.prompts`):

    r_hat_t = sigmoid(log p(y_t | x_better, y_<t) - log p(y_t | x_worse, y_<t)) - 0.5

and, with ``store_reference_logps``, under the plain prompt (the reference log-probs, so DPO and
IPO train without a reference model in memory). Values are computed once per split, by every
process on its share of the pairs, and kept in a fingerprinted cache
(:mod:`treg_lightning.rewards.cache`): a rerun with the same inputs reuses it, a killed build
resumes, a cache of other inputs is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from treg_lightning.errors import ConfigError
from treg_lightning.models.loading import check_vocab_fits, load_causal_lm, parse_dtype
from treg_lightning.models.preflight import check_model
from treg_lightning.passes import distributed
from treg_lightning.rewards.annotate import ContrastiveScorer
from treg_lightning.rewards.cache import compute_fingerprint, load_or_build
from treg_lightning.rewards.prompts import ContrastiveTemplate
from treg_lightning.rewards.source import AnnotationContext, TokenRewardSource, cache_folder_for


class ContrastiveRewards(TokenRewardSource):
    """Contrastive self-generated token rewards (and reference log-probs), cached on disk.

    Args:
        template: Contrastive template: preset "instruct" or "revise", or a
            ContrastiveTemplate with custom texts.
        evaluator: Model scoring the response tokens (hub id, folder, .gguf or "smollm2");
            None: the model named by data.tokenizer (the reference model, as in the paper).
            It must share the data tokenizer's vocabulary.
        evaluator_dtype: Dtype of the evaluator during annotation ("float32", "bfloat16", ...).
        store_reference_logps: Also cache the evaluator's token log-probs under the plain
            prompt, so DPO / IPO train without a live reference model (valid when the
            evaluator is the reference model).
        batch_size: Sequences (context + response) per evaluator forward pass.
        max_context_length: Cut the contrastive contexts to this many tokens (older turns
            first; the instruction is kept); None keeps them whole.
        chunk_pairs: Pairs per resumable unit of work (one file each).
        cache_dir: Folder of the caches (one subfolder per split and fingerprint); None:
            `$TREG_CACHE/token_rewards` or `~/.cache/treg_lightning/token_rewards`.
        progress: Show a progress bar (sequences, tokens/s) on rank 0.
    """

    def __init__(
        self,
        template: str | ContrastiveTemplate = "instruct",
        evaluator: str | None = None,
        evaluator_dtype: str = "float32",
        store_reference_logps: bool = True,
        batch_size: int = 8,
        max_context_length: int | None = None,
        chunk_pairs: int = 32,
        cache_dir: str | None = None,
        progress: bool = True,
    ) -> None:
        if chunk_pairs < 1:
            raise ConfigError(f"ContrastiveRewards: chunk_pairs must be >= 1, got {chunk_pairs}.")
        if max_context_length is not None and max_context_length < 1:
            raise ConfigError(
                "ContrastiveRewards: max_context_length must be >= 1 (tokens of a contrastive "
                f"context), or null to keep contexts whole; got {max_context_length}."
            )
        parse_dtype(evaluator_dtype)  # at start-up, not after tokenizing every pair
        self.scorer = ContrastiveScorer(
            template,
            batch_size=batch_size,
            store_reference_logps=store_reference_logps,
            max_context_length=max_context_length,
        )
        self.evaluator = evaluator
        self.evaluator_dtype = evaluator_dtype
        self.chunk_pairs = chunk_pairs
        self.cache_dir = cache_dir
        self.progress = progress
        self._model: torch.nn.Module | None = None
        self._checked: set[tuple] = set()  # contexts whose evaluator passed check_models

    @property
    def provides_reference_logps(self) -> bool:
        return self.scorer.store_reference_logps

    @property
    def cache_folder(self) -> Path:
        return cache_folder_for(self.cache_dir)

    def annotate(
        self, rows: list[Mapping[str, Any]], split: str, context: AnnotationContext
    ) -> Any:
        """The split's cache (a ``datasets.Dataset``), built with the evaluator if missing."""
        if self.scorer.max_context_length is not None:  # the instruction alone must fit
            empty = [{"role": "user", "content": ""}]
            self.scorer.template.build(context.tokenizer, empty, "", self.scorer.max_context_length)
        model = self.evaluator_model(context)
        name = self.evaluator or context.model_name
        settings = {
            **self.scorer.settings(),
            **dict(context.settings),
            "dtype": str(next(model.parameters()).dtype),
        }
        fingerprint = compute_fingerprint(
            model=model,
            tokenizer=context.tokenizer,
            template=self.scorer.template,
            rows=rows,
            settings=settings,
            model_name=name,
        )
        bar = _ProgressBar(self.scorer.sequences_per_pair) if self.progress else None
        try:
            return load_or_build(
                rows,
                self.cache_folder / f"{split}-{fingerprint.digest[:16]}",
                fingerprint,
                lambda chunk: self.scorer.score(model, context.tokenizer, chunk, bar),
                chunk_pairs=self.chunk_pairs,
                on_start=bar.start if bar else None,
            )
        finally:
            if bar is not None:
                bar.close()

    def check_models(self, context: AnnotationContext, setting: str = "data.rewards") -> None:
        """At start-up, before any pair is tokenized or weight read: the evaluator exists, is a
        causal LM and reads the data tokenizer's ids
        (:func:`~treg_lightning.models.preflight.check_model`)."""
        key = (id(context.tokenizer), context.model_name, setting)
        if key in self._checked:
            return
        shown = f"{setting}.evaluator"
        if self.evaluator is None:
            shown += " (unset: data.tokenizer, which follows model.model)"
        check_model(
            self.evaluator or context.model_name, shown, tokenizer=context.tokenizer,
            trust_remote_code=context.trust_remote_code,
        )  # fmt: skip
        self._checked.add(key)

    def evaluator_model(self, context: AnnotationContext) -> torch.nn.Module:
        """The evaluator on ``context.device``, loaded once after :meth:`check_models` (its
        fingerprint is taken even when the cache exists, so a changed model is never served
        stale rewards)."""
        self.check_models(context)
        if self._model is None:
            model = load_causal_lm(
                self.evaluator or context.model_name,
                self.evaluator_dtype,
                trust_remote_code=context.trust_remote_code,
                device_type=context.device.type,
            )
            check_vocab_fits(context.tokenizer, model, self.evaluator or context.model_name)
            self._model = model.to(context.device).eval()
        return self._model

    def release(self) -> None:
        self._model = None


class _ProgressBar:
    """tqdm over the sequences this process scores, with tokens/s; rank 0 only."""

    def __init__(self, sequences_per_pair: int) -> None:
        self.per_pair = sequences_per_pair
        self.bar = None
        self.tokens = 0

    def start(self, pairs: int) -> None:
        if distributed().rank != 0 or pairs == 0:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=pairs * self.per_pair, unit="seq", desc="annotate", smoothing=0.1)

    def __call__(self, n_sequences: int, n_tokens: int) -> None:
        if self.bar is None:
            return
        self.tokens += n_tokens
        self.bar.update(n_sequences)
        elapsed = self.bar.format_dict.get("elapsed") or 0.0
        if elapsed > 0:
            self.bar.set_postfix(tok_s=f"{self.tokens / elapsed:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
