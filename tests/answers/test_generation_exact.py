"""Greedy answers of a real model depend on the prompt and nothing else the run could change
between an interrupted run and its rerun: not on the shards generated before in the process, nor
on the number of CPU threads. This is what makes the rerun of a `treg predict` killed with
kill -9 write the file an uninterrupted run writes (a shard is generated as one batch list, the
same in both runs; the end-to-end kill test is tests/answers/test_predict.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from treg_lightning.answers.generation import SamplingSettings, TransformersBackend
from treg_lightning.models.loading import load_causal_lm, load_tokenizer

DEMO = Path(__file__).resolve().parents[2] / "src/treg_lightning/data/demo/pairs.jsonl"
SHARD = 2  # prompts per shard, one batch each (left-padded)


class SmolLM2:
    def load(self):
        return load_causal_lm("smollm2", torch_dtype="float32")

    def folder(self, work_dir):
        return work_dir


def demo_prompt_ids(tokenizer, count: int) -> list[list[int]]:
    prompts = []
    for line in DEMO.read_text().splitlines():
        prompt = json.loads(line)["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids not in prompts:
            prompts.append(ids)
    return prompts[:count]


def answers(tokenizer, prompts, shards, tmp_path) -> dict[int, list[list[int]]]:
    backend = TransformersBackend()  # a fresh process's backend: nothing generated before
    backend.setup(SmolLM2(), tokenizer, torch.device("cpu"), tmp_path)
    sampling = SamplingSettings(max_new_tokens=24)
    return {
        k: [
            g.token_ids
            for g in backend.generate(prompts[k * SHARD : (k + 1) * SHARD], sampling, key=f"{k}:0")
        ]  # fmt: skip
        for k in shards
    }


@pytest.mark.slow
def test_a_shard_generated_first_on_one_thread_equals_the_uninterrupted_run(tmp_path):
    tokenizer = load_tokenizer("smollm2")
    prompts = demo_prompt_ids(tokenizer, 2 * SHARD)
    threads = torch.get_num_threads()
    whole = answers(tokenizer, prompts, range(2), tmp_path)  # the uninterrupted run
    try:
        torch.set_num_threads(1)  # the rerun, on another thread count
        rerun = answers(tokenizer, prompts, [1], tmp_path)  # shard 0 was kept
    finally:
        torch.set_num_threads(threads)
    assert all(len(ids) > 0 for shard in whole.values() for ids in shard)
    assert rerun == {1: whole[1]}
