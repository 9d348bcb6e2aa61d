"""What the credit experiment (``bench/credit.py``) adds around the library's token-reward
sources: the brief LoRA fine-tuning that makes the two models of ``ModelContrastRewards``, and
:class:`WithReference`, which serves reference log-probs computed once for every variant.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from treg_lightning.rewards.source import AnnotationContext, TokenRewardSource


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@torch.no_grad()
def response_logps(model, prompt_ids: list[int], ids: list[int]) -> list[float]:
    """log p(y_t | x, y_<t) of each response token under a plain transformers forward."""
    input_ids = torch.tensor([prompt_ids + ids])
    logits = model(input_ids=input_ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist()


def finetune_lora(model_name: str, rows: Sequence[Mapping[str, Any]], side: str, out: Path,
                  steps: int, lr: float, seed: int, rank: int = 16) -> Path:  # fmt: skip
    """A LoRA copy of ``model_name`` fine-tuned (next-token loss on the response tokens) on the
    ``side`` answers of ``rows`` (tokenized), merged and saved to ``out``."""
    from peft import LoraConfig, get_peft_model

    from treg_lightning.models.loading import load_causal_lm, load_tokenizer

    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    base = load_causal_lm(model_name, torch_dtype=torch.float32)
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
