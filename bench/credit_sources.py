"""Token-reward sources of the credit experiment (``bench/credit.py``).

The library's sources are used where they exist: ``treg_lightning.rewards.spans.SpanRewards``
(span annotations -> token rewards) and ``treg_lightning.rewards.model_contrast.
ModelContrastRewards`` (two models' log-ratio). Until those are merged, the stand-ins below
compute the same values (:class:`FileSpans`, :class:`TwoModelRewards`); ``settings.json`` records
which one a run used. Also here: the brief LoRA fine-tuning that makes the two models.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from treg_lightning.rewards.source import AnnotationContext, TokenRewardSource

try:
    from credit_data import token_labels
except ImportError:  # pragma: no cover - imported by path
    token_labels = __import__("sys").modules["credit_data"].token_labels


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


class FileSpans(TokenRewardSource):
    """Span annotations of the credit files -> token rewards (stand-in for ``SpanRewards``).

    The data module keeps only prompt / chosen / rejected of a row, and each tokenized row
    carries its ``index`` in the source file: the spans are read back from ``files[split]``.
    A token overlapping a span gets the span's reward; others 0; the end-of-turn token 0.
    The rejected text is checked to be the one the spans were written on.
    """

    def __init__(self, files: Mapping[str, str | Path]) -> None:
        self.files = {split: Path(path) for split, path in files.items()}

    def annotate(self, rows, split: str, context: AnnotationContext):
        source = read_rows(self.files[split])
        out = []
        for row in rows:
            original = source[row["index"]]
            served = dict(row)
            for side in ("chosen", "rejected"):
                text = original[side][0]["content"]
                if text != row[side]:
                    raise ValueError(f"{self.files[split]} row {row['index']}: {side} text differs")
                spans = original[f"{side}_spans"]
                labels = token_labels(context.tokenizer, text, spans)
                values = [0.0] * len(labels)
                encoded = context.tokenizer(text, add_special_tokens=False,
                                            return_offsets_mapping=True)  # fmt: skip
                for t, (start, end) in enumerate(encoded["offset_mapping"]):
                    for span in spans:
                        if start < span["end"] and end > span["start"]:
                            values[t] = float(span["reward"])
                served[f"{side}_token_rewards"] = values[: len(row[f"{side}_ids"])]
            out.append(served)
        return out


def span_source(files: Mapping[str, str | Path], cache_dir: str) -> tuple[TokenRewardSource, str]:
    """The library's ``SpanRewards`` if it is there (rows carry the spans), else the stand-in."""
    try:
        from treg_lightning.rewards.spans import SpanRewards

        return SpanRewards(cache_dir=cache_dir), "treg_lightning.rewards.spans.SpanRewards"
    except (ImportError, TypeError):
        return FileSpans(files), "bench/credit_sources.py FileSpans (SpanRewards not merged yet)"


@torch.no_grad()
def response_logps(model, prompt_ids: list[int], ids: list[int]) -> list[float]:
    """log p(y_t | x, y_<t) of each response token under a plain transformers forward."""
    input_ids = torch.tensor([prompt_ids + ids])
    logits = model(input_ids=input_ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist()


class TwoModelRewards(TokenRewardSource):
    """``r_hat_t = sigmoid(scale * (log p_pos - log p_neg)) - 0.5`` (stand-in for
    ``ModelContrastRewards``); plain forwards, one sequence at a time, no cache."""

    def __init__(self, positive: str, negative: str, scale: float = 1.0) -> None:
        self.positive, self.negative, self.scale = positive, negative, scale

    def annotate(self, rows, split: str, context: AnnotationContext):
        from transformers import AutoModelForCausalLM

        models = [AutoModelForCausalLM.from_pretrained(p).eval()
                  for p in (self.positive, self.negative)]  # fmt: skip
        out = []
        for row in rows:
            served = dict(row)
            for side in ("chosen", "rejected"):
                ids = row[f"{side}_ids"]
                pos, neg = (torch.tensor(response_logps(m, row["prompt_ids"], ids))
                            for m in models)  # fmt: skip
                served[f"{side}_token_rewards"] = (
                    torch.sigmoid(self.scale * (pos - neg)) - 0.5
                ).tolist()
            out.append(served)
        return out


def two_model_source(positive: str, negative: str, scale: float, cache_dir: str):
    """The library's ``ModelContrastRewards`` if it is there, else the stand-in."""
    try:
        from treg_lightning.rewards.model_contrast import ModelContrastRewards

        source = ModelContrastRewards(positive=positive, negative=negative, scale=scale,
                                      cache_dir=cache_dir)  # fmt: skip
        return (source,
                "treg_lightning.rewards.model_contrast.ModelContrastRewards")  # fmt: skip
    except (ImportError, TypeError):
        return (TwoModelRewards(positive, negative, scale),
                "bench/credit_sources.py TwoModelRewards (stand-in)")  # fmt: skip


def finetune_lora(model_name: str, rows: Sequence[Mapping[str, Any]], side: str, out: Path,
                  steps: int, lr: float, seed: int, rank: int = 16) -> Path:  # fmt: skip
    """A LoRA copy of ``model_name`` fine-tuned (next-token loss on the response tokens) on the
    ``side`` answers of ``rows`` (tokenized), merged and saved to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from treg_lightning.models.loading import load_causal_lm, load_tokenizer

    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    try:
        base = load_causal_lm(model_name, torch_dtype=torch.float32)
    except TypeError:  # pragma: no cover - other signature
        base = AutoModelForCausalLM.from_pretrained(model_name)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules="all-linear"))  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        row = rows[int(torch.randint(len(rows), (1,), generator=generator))]
        ids = row[f"{side}_ids"]
        input_ids = torch.tensor([row["prompt_ids"] + ids])
        labels = input_ids.clone()
        labels[0, : len(row["prompt_ids"])] = -100
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = model.merge_and_unload().eval()
    merged.save_pretrained(out)
    load_tokenizer(model_name).save_pretrained(out)
    return out


_REFERENCE: dict[tuple, list[float]] = {}  # (model, prompt ids, response ids) -> token logps
_MODELS: dict[str, Any] = {}


class WithReference(TokenRewardSource):
    """``inner``'s token rewards (none for ``inner=None``) plus the reference token log-probs
    ``{side}_ref_token_logps`` of ``model`` (plain forwards, computed once per response for all
    variants and seeds of a run), so that no variant pays a reference forward per step."""

    def __init__(self, inner: TokenRewardSource | None, model: str) -> None:
        self.inner, self.model = inner, model

    @property
    def provides_token_rewards(self) -> bool:
        return self.inner is not None and self.inner.provides_token_rewards

    @property
    def provides_reference_logps(self) -> bool:
        return True

    @property
    def cache_folder(self):
        return None if self.inner is None else self.inner.cache_folder

    def release(self) -> None:
        if self.inner is not None:
            self.inner.release()

    def annotate(self, rows, split: str, context: AnnotationContext):
        rows = rows if self.inner is None else self.inner.annotate(rows, split, context)
        if self.model not in _MODELS:
            from treg_lightning.models.loading import load_causal_lm

            _MODELS[self.model] = load_causal_lm(self.model).eval()
        model = _MODELS[self.model]
        out = []
        for row in rows:
            served = dict(row)
            for side in ("chosen", "rejected"):
                key = (self.model, tuple(row["prompt_ids"]), tuple(row[f"{side}_ids"]))
                if key not in _REFERENCE:
                    _REFERENCE[key] = response_logps(model, row["prompt_ids"], row[f"{side}_ids"])
                served[f"{side}_ref_token_logps"] = _REFERENCE[key]
            out.append(served)
        return out
