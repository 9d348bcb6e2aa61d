"""Scoring forwards build no key/value cache: the annotate pass (contrastive and two-model
sources, the audit's rewards), the reward model of `treg evaluate` / `treg pairs`, and the
implicit-reward scorer. Each forward's output is checked for ``past_key_values``."""

from __future__ import annotations

import torch

from builders import tiny_llama


def record_caches(decoder: torch.nn.Module) -> list:
    """The ``past_key_values`` each forward of ``decoder`` returns (None: no cache built)."""
    caches = []
    decoder.register_forward_hook(lambda m, args, out: caches.append(out.past_key_values))
    return caches


def test_score_sequences_builds_no_cache():
    """The forward of ContrastiveScorer and ModelContrastRewards.score, on a model whose config
    asks for a cache (use_cache=True, transformers' default)."""
    from treg_lightning.rewards.annotate import score_sequences

    model = tiny_llama(64)
    assert model.config.use_cache
    caches = record_caches(model.model)
    sequences = [([1, 2, 3], [4, 5]), ([6, 7], [8, 9, 10, 11]), ([12], [13])]
    logps = score_sequences(model, sequences, batch_size=2)
    assert [len(x) for x in logps] == [2, 4, 1]
    assert len(caches) == 2 and all(cache is None for cache in caches)


def test_reward_model_builds_no_cache(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from treg_lightning.answers.reward_model import RewardModelScorer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         num_labels=1, pad_token_id=None)  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    scorer = RewardModelScorer(str(tmp_path), batch_size=2, device="cpu")
    caches = record_caches(scorer.model.model)
    conversations = [
        [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": str(i)}]
        for i in range(3)
    ]
    assert len(scorer.score(conversations)) == 3
    assert len(caches) == 2 and all(cache is None for cache in caches)


def test_implicit_reward_scorer_builds_no_cache(tiny_model_dir):
    from treg_lightning.answers.scorers import ImplicitRewardScorer

    scorer = ImplicitRewardScorer(str(tiny_model_dir), str(tiny_model_dir), batch_size=2)
    scorer.setup(torch.device("cpu"))
    caches = [record_caches(lm.model) for lm in scorer.models]
    items = [([{"role": "user", "content": f"Add {i}."}], f"{2 * i}.") for i in range(3)]
    assert len(scorer.score(items)) == 3
    assert [len(c) for c in caches] == [2, 2]
    assert all(cache is None for c in caches for cache in c)
