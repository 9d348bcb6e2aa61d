"""Scoring for the contrastive token rewards (docs/method.md, section 1) and reference logps.

For each pair and each response ``y`` (chosen, rejected) the evaluator scores the same response
ids after three contexts: ``x_better`` and ``x_worse`` from a :class:`ContrastiveTemplate`, and
the plain prompt ``x`` (``prompt_ids``). Per response token::

    r_hat_t    = sigmoid(log p(y_t | x_better, y_<t) - log p(y_t | x_worse, y_<t)) - 0.5
    ref_logp_t = log p(y_t | x, y_<t)            (if store_reference_logps)

This module only scores: where the values are stored, how the work is split across ranks and
resumed is :mod:`treg_lightning.rewards.cache`'s; which model scores is
:class:`~treg_lightning.rewards.contrastive.ContrastiveRewards`'.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from treg_lightning.errors import ConfigError
from treg_lightning.forward.logprobs import causal_lm_token_logps, check_plain_logits, model_softcap
from treg_lightning.models.preflight import vocabulary_difference
from treg_lightning.pairs import SIDES, field
from treg_lightning.rewards.prompts import ContrastiveTemplate, get_template


class ContrastiveScorer:
    """Token rewards (and reference token logps) of tokenized pairs under one evaluator.

    Args:
        template: contrastive template: a preset name (``"instruct"``, ``"revise"``) or a
            :class:`ContrastiveTemplate`.
        batch_size: sequences (context + response) per forward pass.
        store_reference_logps: also score each response under the plain prompt (the reference
            token log-probs, when the evaluator is the reference model).
        max_context_length: cut the contrastive contexts to this many tokens (older turns first;
            the instruction is kept); None leaves them whole.
        logp_chunk_size: rows of lm_head logits computed at a time.
    """

    def __init__(
        self,
        template: str | ContrastiveTemplate = "instruct",
        batch_size: int = 8,
        store_reference_logps: bool = True,
        max_context_length: int | None = None,
        logp_chunk_size: int = 1024,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        self.template = get_template(template)
        self.batch_size = batch_size
        self.store_reference_logps = store_reference_logps
        self.max_context_length = max_context_length
        self.logp_chunk_size = logp_chunk_size
        # Throughput counters: tokens forwarded (contexts + responses), seconds, forward passes.
        self.stats = {"tokens": 0, "seconds": 0.0, "forwards": 0}

    def settings(self) -> dict[str, Any]:
        """What changes the scores (for the cache fingerprint)."""
        return {
            "template": self.template.to_dict(),
            "store_reference_logps": self.store_reference_logps,
            "max_context_length": self.max_context_length,
        }

    @property
    def value_fields(self) -> tuple[str, ...]:
        """The per-token row fields this scorer fills (see :mod:`treg_lightning.pairs`)."""
        return (
            ("token_rewards", "ref_token_logps")
            if self.store_reference_logps
            else ("token_rewards",)
        )

    @property
    def sequences_per_pair(self) -> int:
        """Forwarded sequences per pair: better and worse (and plain) for both responses."""
        return len(SIDES) * (3 if self.store_reference_logps else 2)

    @torch.inference_mode()
    def score(
        self,
        model: torch.nn.Module,
        tokenizer,
        rows: Sequence[Mapping[str, Any]],
        on_batch: Callable[[int, int], None] | None = None,
    ) -> dict[str, list[np.ndarray]]:
        """Per-token values of ``rows``: ``{"chosen_token_rewards": [array per row], ...}``.

        Args:
            model: the evaluator, a causal LM.
            tokenizer: its tokenizer (the one that produced the rows' ids).
            rows: tokenized pairs with ``prompt`` (messages), ``chosen``/``rejected`` (texts)
                and ``prompt_ids``/``chosen_ids``/``rejected_ids``.
            on_batch: called with ``(n_sequences, n_tokens)`` after each forward pass.
        """
        check_plain_logits(model)
        was_training = model.training
        model.eval()  # no dropout: scores must be deterministic
        try:
            return self._score(model, tokenizer, rows, on_batch)
        finally:
            model.train(was_training)

    def _score(self, model, tokenizer, rows, on_batch) -> dict[str, list[np.ndarray]]:
        sequences, keys = [], []
        for i, row in enumerate(rows):
            for side in SIDES:
                for context_name, context in self._contexts(tokenizer, row, side).items():
                    sequences.append((context, list(row[field(side, "ids")])))
                    keys.append((i, side, context_name))
        start, seconds_before = time.perf_counter(), self.stats["seconds"]

        def counted(n_sequences: int, n_tokens: int) -> None:
            self.stats["tokens"] += n_tokens
            self.stats["forwards"] += 1
            self.stats["seconds"] = seconds_before + time.perf_counter() - start
            if on_batch is not None:
                on_batch(n_sequences, n_tokens)

        logps = score_sequences(model, sequences, self.batch_size, self.logp_chunk_size, counted)
        by_key = dict(zip(keys, logps, strict=True))
        columns: dict[str, list[np.ndarray]] = {}
        for side in SIDES:
            columns[field(side, "token_rewards")] = [
                token_rewards(by_key[i, side, "better"], by_key[i, side, "worse"])
                for i in range(len(rows))
            ]
            if self.store_reference_logps:
                columns[field(side, "ref_token_logps")] = [
                    by_key[i, side, "plain"] for i in range(len(rows))
                ]
        return columns

    def _contexts(self, tokenizer, row, side: str) -> dict[str, list[int]]:
        better, worse = self.template.build(
            tokenizer, row["prompt"], row[side], max_length=self.max_context_length
        )
        contexts = {"better": better, "worse": worse}
        if self.store_reference_logps:
            contexts["plain"] = list(row["prompt_ids"])
        return contexts


def token_rewards(
    better_token_logps: np.ndarray, worse_token_logps: np.ndarray, scale: float = 1.0
) -> np.ndarray:
    """``r_hat_t = sigmoid(scale * (better_t - worse_t)) - 0.5``, float32, in (-0.5, 0.5)."""
    diff = torch.from_numpy(better_token_logps - worse_token_logps)
    return (torch.sigmoid(diff * scale) - 0.5).numpy().astype(np.float32)


@torch.inference_mode()
def score_sequences(
    model: torch.nn.Module,
    sequences: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
    logp_chunk_size: int = 1024,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[np.ndarray]:
    """Token logps of each ``response`` after its ``context``: one float32 array per sequence.

    Sequences are sorted by length (longest first, stable) and batched with right padding, so
    the result depends only on the list given. ``on_batch(n_sequences, n_tokens)`` is called
    after each forward pass.
    """
    order = sorted(range(len(sequences)), key=lambda i: -sum(map(len, sequences[i])))
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(sequences)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = [sequences[i] for i in indices]
        for i, logps in zip(indices, _score_batch(model, batch, logp_chunk_size), strict=True):
            out[i] = logps
        if on_batch is not None:
            on_batch(len(batch), sum(len(c) + len(r) for c, r in batch))
    return out


def _score_batch(model, batch, logp_chunk_size: int) -> list[np.ndarray]:
    device = model.get_output_embeddings().weight.device
    width = max(len(c) + len(r) for c, r in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
    response_mask = torch.zeros(len(batch), width, dtype=torch.bool)
    for b, (context, response) in enumerate(batch):
        n = len(context) + len(response)
        input_ids[b, :n] = torch.tensor(context + response)
        attention_mask[b, :n] = 1
        response_mask[b, len(context) : n] = True
    model_inputs = {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        # No key/value cache: nothing is decoded after this forward, and a cache would hold
        # every layer's keys and values of the whole batch (gigabytes at 8B and 2k tokens).
        "use_cache": False,
    }
    token_logps = causal_lm_token_logps(
        model, model_inputs, response_mask.to(device), logp_chunk_size, model_softcap(model)
    ).float()
    return [
        token_logps[b, len(c) : len(c) + len(r)].cpu().numpy() for b, (c, r) in enumerate(batch)
    ]


def check_same_vocab(tokenizer, evaluator_tokenizer, evaluator_name: str = "evaluator") -> None:
    """Raise if the evaluator's tokenizer does not map every token to the same id: the cached
    response ids are scored by the evaluator as they are."""
    a, b = tokenizer.get_vocab(), evaluator_tokenizer.get_vocab()
    diff = vocabulary_difference(a, b, 5)
    if diff:
        raise ConfigError(
            f"The {evaluator_name} model's tokenizer differs from the data tokenizer (vocab sizes "
            f"{len(b)} vs {len(a)}; e.g. {diff}): token rewards need the same vocabulary. Use an "
            "evaluator from the same model family, or leave it unset to use the reference model."
        )
