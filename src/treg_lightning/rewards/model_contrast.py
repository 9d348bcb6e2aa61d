"""Token rewards from two models: how much more a "positive" model likes each response token
than a "negative" one, cached.

Both models score every response token after the plain prompt (``prompt_ids``)::

    r_hat_t = sigmoid(scale * (log p_pos(y_t | x, y_<t) - log p_neg(y_t | x, y_<t))) - 0.5

e.g. an aligned model against its reference (the log-ratio of an implicit reward model), or a
model fine-tuned on good answers against one fine-tuned on bad ones. Both must be causal LMs
sharing the data tokenizer's vocabulary (the cached response ids are scored as they are), and
two models (the same one twice gives r_hat = 0 everywhere): checked at start-up, before any
pair is tokenized (:meth:`ModelContrastRewards.check_models`). Scoring is
:func:`treg_lightning.rewards.annotate.score_sequences`, the contrastive source's forward; the
build is split across ranks, resumable and fingerprinted like it
(:mod:`treg_lightning.rewards.cache`), with both models in the fingerprint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from treg_lightning.errors import ConfigError
from treg_lightning.forward.logprobs import check_plain_logits
from treg_lightning.models.loading import check_vocab_fits, load_causal_lm, parse_dtype
from treg_lightning.models.preflight import check_model, model_location
from treg_lightning.pairs import SIDES, field
from treg_lightning.rewards.annotate import score_sequences, token_rewards
from treg_lightning.rewards.cache import compute_fingerprint, load_or_build, model_identity
from treg_lightning.rewards.source import AnnotationContext, TokenRewardSource, cache_folder_for

ROLES = ("positive", "negative")


class ModelContrastRewards(TokenRewardSource):
    """Token rewards from the log-ratio of two models, cached on disk.

    Args:
        positive: The model whose preferred tokens get positive rewards (hub id, folder,
            .gguf or "smollm2"); None: the model named by data.tokenizer.
        negative: The model it is contrasted with; None: the model named by data.tokenizer
            (the reference model).
        scale: Multiplies the log-ratio before the sigmoid (> 0; a temperature).
        dtype: Dtype of both models during annotation ("float32", "bfloat16", ...).
        store_reference_logps: Also cache the negative model's token log-probs as the
            reference log-probs (valid when the negative model is the reference model), so
            DPO / IPO train without a live reference model.
        batch_size: Sequences (prompt + response) per forward pass.
        chunk_pairs: Pairs per resumable unit of work (one file each).
        cache_dir: Folder of the caches; None: `$TREG_CACHE/token_rewards` or
            `~/.cache/treg_lightning/token_rewards`.
    """

    def __init__(
        self,
        positive: str | None = None,
        negative: str | None = None,
        scale: float = 1.0,
        dtype: str = "float32",
        store_reference_logps: bool = False,
        batch_size: int = 8,
        chunk_pairs: int = 32,
        cache_dir: str | None = None,
    ) -> None:
        if not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"ModelContrastRewards: scale must be > 0, got {scale}.")
        if batch_size < 1 or chunk_pairs < 1:
            raise ConfigError(
                f"ModelContrastRewards: batch_size and chunk_pairs must be >= 1, got "
                f"{batch_size} and {chunk_pairs}."
            )
        parse_dtype(dtype)  # at start-up, not after tokenizing every pair
        self.positive = positive
        self.negative = negative
        self.scale = float(scale)
        self.dtype = dtype
        self.store_reference_logps = store_reference_logps
        self.batch_size = batch_size
        self.chunk_pairs = chunk_pairs
        self.cache_dir = cache_dir
        self._models: dict[str, torch.nn.Module] = {}
        self._checked: set[tuple] = set()  # contexts whose models passed check_models

    @property
    def provides_reference_logps(self) -> bool:
        return self.store_reference_logps

    @property
    def cache_folder(self) -> Path:
        return cache_folder_for(self.cache_dir)

    def annotate(
        self, rows: list[Mapping[str, Any]], split: str, context: AnnotationContext
    ) -> Any:
        """The split's cache (a ``datasets.Dataset``), built with both models if missing."""
        positive, negative = self.model("positive", context), self.model("negative", context)
        names = {role: self._name(role, context) for role in ("positive", "negative")}
        settings = {
            "source": "model_contrast",
            "scale": self.scale,
            "store_reference_logps": self.store_reference_logps,
            "negative": names["negative"],
            "negative_identity": model_identity(negative),
            **dict(context.settings),
            "dtype": str(next(positive.parameters()).dtype),
        }
        fingerprint = compute_fingerprint(
            model=positive,
            tokenizer=context.tokenizer,
            template=None,
            rows=rows,
            settings=settings,
            model_name=f"{names['positive']} vs {names['negative']}",
        )
        return load_or_build(
            rows,
            self.cache_folder / f"{split}-{fingerprint.digest[:16]}",
            fingerprint,
            lambda chunk: self.score(positive, negative, chunk),
            chunk_pairs=self.chunk_pairs,
        )

    @torch.inference_mode()
    def score(self, positive, negative, rows) -> dict[str, list[np.ndarray]]:
        """Per-token values of ``rows`` under the two models (see the module docstring)."""
        sequences = [
            (list(row["prompt_ids"]), list(row[field(side, "ids")]))
            for side in SIDES
            for row in rows
        ]
        pos = score_sequences(positive, sequences, self.batch_size)
        neg = pos if negative is positive else score_sequences(negative, sequences, self.batch_size)
        columns: dict[str, list[np.ndarray]] = {}
        for s, side in enumerate(SIDES):
            part = slice(s * len(rows), (s + 1) * len(rows))
            columns[field(side, "token_rewards")] = [
                token_rewards(p, n, self.scale) for p, n in zip(pos[part], neg[part], strict=True)
            ]
            if self.store_reference_logps:
                columns[field(side, "ref_token_logps")] = list(neg[part])
        return columns

    def check_models(self, context: AnnotationContext, setting: str = "data.rewards") -> None:
        """At start-up, before any pair is tokenized or weight read: the two models are two
        (the same model twice makes every ``r_hat`` 0), and each exists, is a causal LM and reads
        the data tokenizer's ids (:func:`~treg_lightning.models.preflight.check_model`)."""
        key = (id(context.tokenizer), context.model_name, setting)
        if key in self._checked:
            return
        names = {role: self._name(role, context) for role in ROLES}
        shown = {
            role: f"{setting}.{role}"
            + ("" if getattr(self, role) else " (unset: data.tokenizer, which follows model.model)")
            for role in ROLES
        }
        where = {role: model_location(names[role]) for role in ROLES}
        if where["positive"] == where["negative"]:
            raise ConfigError(
                f"ModelContrastRewards: {shown['positive']} {names['positive']!r} and "
                f"{shown['negative']} {names['negative']!r} are the same model "
                f"({where['positive']}): every r_hat would be 0, and T-REG would train on "
                "nothing. Give two different models, e.g. positive: the model fine-tuned on good "
                "answers (or the aligned model) and negative: its reference."
            )
        for role in ROLES:
            check_model(
                names[role], shown[role], tokenizer=context.tokenizer,
                trust_remote_code=context.trust_remote_code,
            )  # fmt: skip
        self._checked.add(key)

    def model(self, role: str, context: AnnotationContext) -> torch.nn.Module:
        """The ``"positive"`` or ``"negative"`` model on ``context.device``, loaded once, after
        :meth:`check_models`."""
        self.check_models(context)
        name = self._name(role, context)
        if name not in self._models:
            model = load_causal_lm(
                name,
                self.dtype,
                trust_remote_code=context.trust_remote_code,
                device_type=context.device.type,
            )
            check_vocab_fits(context.tokenizer, model, name)  # the loaded table, to be sure
            check_plain_logits(model)
            self._models[name] = model.to(context.device).eval()
        return self._models[name]

    def _name(self, role: str, context: AnnotationContext) -> str:
        return getattr(self, role) or context.model_name

    def release(self) -> None:
        self._models = {}
