"""bench/credit.py on a tiny model: the AUROC of the loss's implicit token rewards at the defect
tokens equals an independent recomputation from the saved policy (plain transformers forwards,
labels from the tokenizer's offsets, AUROC by counting token pairs)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
VARIANTS = ("DPO + T-REG (spans)", "SimPO + T-REG (spans)")


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("credit")
    data = root / "data"
    credit_data = load("credit_data")
    credit_data.build(data, seed=0, hh_path=None)  # the demo set only: no shared data needed
    credit = load("credit")
    results = credit.main(["--size", "dry-run", "--seeds", "1", "--variants", *VARIANTS,
                           "--out", str(root / "out"), "--work-dir", str(root / "work"),
                           "--data", str(data)])  # fmt: skip
    return root, results


def pair_count_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(marked score > unmarked score) + P(tie) / 2, by counting every (marked, unmarked) pair."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    greater = (positive[:, None] > negative[None, :]).sum()
    ties = (positive[:, None] == negative[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positive) * len(negative)))


def close_pairs(labels: np.ndarray, scores: np.ndarray, tolerance: float) -> int:
    """(marked, unmarked) token pairs whose scores are within ``tolerance``: the only pairs two
    float32 code paths may order differently."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    return int((np.abs(positive[:, None] - negative[None, :]) <= tolerance).sum())


@torch.no_grad()
def token_logps(model, prompt_ids: list[int], ids: list[int]) -> np.ndarray:
    logits = model(input_ids=torch.tensor([prompt_ids + ids])).logits[0].double()
    logps = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], -1)
    return logps[torch.arange(len(ids)), torch.tensor(ids)].numpy()


@pytest.mark.parametrize("variant", VARIANTS)
def test_implicit_reward_auroc_matches_a_recomputation(tiny_run, variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, results = tiny_run
    work = root / "work"
    slug = variant.lower().replace(" + ", "-").replace(" (", "-").replace(")", "").replace(" ", "-")
    tokenizer = AutoTokenizer.from_pretrained(work / "tiny")
    base = AutoModelForCausalLM.from_pretrained(work / "tiny").eval()
    policy = AutoModelForCausalLM.from_pretrained(work / "policies" / f"{slug}-seed0").eval()
    pairs = [json.loads(line) for line in (work / "pairs" / "heldout.jsonl").read_text().split("\n")
             if line]  # fmt: skip
    labels, scores, largest, scale = [], [], 1.0, 0.0
    for pair in pairs:
        text = tokenizer.apply_chat_template(pair["prompt"], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rejected = pair["rejected"][0]["content"]
        encoded = tokenizer(rejected, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"] + [tokenizer.eos_token_id]
        (span,) = pair["rejected_spans"]
        labels += [int(s < span["end"] and e > span["start"]) for s, e in encoded["offset_mapping"]]
        logp = token_logps(policy, prompt_ids, ids)
        if variant.startswith("DPO"):  # c(y) (log pi - log pi_ref), c(y) = beta = 0.1
            reward = 0.1 * (logp - token_logps(base, prompt_ids, ids))
        else:  # SimPO, reference-free: c(y) log pi, c(y) = beta / |y| = 2 / |y|
            reward = 2.0 / len(ids) * logp
        largest = max(largest, float(np.abs(logp).max()))
        scale = max(scale, 0.1 if variant.startswith("DPO") else 2.0 / len(ids))
        scores += list(-reward[:-1])  # the end-of-turn token is left out
    labels, scores = np.asarray(labels), np.asarray(scores)
    assert 0 < labels.sum() < len(labels)
    expected = pair_count_auroc(labels, scores)
    reported = results["variants"][variant]["all"]["auroc_implicit"]["mean"]
    # float32 forwards (LoRA vs merged weights, padded/shared-prompt vs plain) agree to a few
    # float32 ulps of the log-probs; only token pairs closer than that may swap order.
    tolerance = 2 * scale * 64 * np.finfo(np.float32).eps * largest
    ambiguous = close_pairs(labels, scores, tolerance)
    total = labels.sum() * (len(labels) - labels.sum())
    assert abs(reported - expected) <= ambiguous / total + 1e-12, (reported, expected, ambiguous)


def test_variant_names_give_source_and_strength():
    credit = load("credit")
    assert credit.source_key("DPO") is None
    assert credit.source_key("DPO + T-REG (spans, alpha 2)") == "spans"
    assert credit.source_key("SimPO + T-REG (two-model)") == "two-model"
    assert credit.variant_alpha("DPO + T-REG (spans, alpha 2)", 0.25) == 2.0
    assert credit.variant_alpha("DPO + T-REG (spans)", 0.25) == 0.25
    _, regularizer = credit.loss_and_regularizer("DPO + T-REG (spans, alpha 2)", 0.25)
    assert regularizer.alpha == 2.0
    assert credit.loss_and_regularizer("SimPO", 0.25)[1] is None


def test_audit_rows_of_the_run(tiny_run):
    """The span source marks exactly the defect tokens: AUROC 1. The no-source row is the AUROC
    of -log pi_ref, recomputed here from the base model by plain forwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, results = tiny_run
    audits = results["audit"]
    assert audits["spans"]["all"]["mean"] == 1.0
    assert audits["spans"]["all"]["pairs"] == 8
    work = root / "work"
    tokenizer = AutoTokenizer.from_pretrained(work / "tiny")
    base = AutoModelForCausalLM.from_pretrained(work / "tiny").eval()
    pairs = [json.loads(line) for line in (work / "pairs" / "heldout.jsonl").read_text().split("\n")
             if line]  # fmt: skip
    labels, scores = [], []
    for pair in pairs:
        text = tokenizer.apply_chat_template(pair["prompt"], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        encoded = tokenizer(pair["rejected"][0]["content"], add_special_tokens=False,
                            return_offsets_mapping=True)  # fmt: skip
        (span,) = pair["rejected_spans"]
        labels += [int(s < span["end"] and e > span["start"]) for s, e in encoded["offset_mapping"]]
        ids = encoded["input_ids"] + [tokenizer.eos_token_id]
        scores += list(-token_logps(base, prompt_ids, ids)[:-1])
    labels, scores = np.asarray(labels), np.asarray(scores)
    expected = pair_count_auroc(labels, scores)
    reported = next(v for k, v in audits.items() if k.startswith("none"))["all"]["mean"]
    tolerance = 2 * 64 * np.finfo(np.float32).eps * float(np.abs(scores).max())
    ambiguous = close_pairs(labels, scores, tolerance)
    total = labels.sum() * (len(labels) - labels.sum())
    assert abs(reported - expected) <= ambiguous / total + 1e-12, (reported, expected, ambiguous)
