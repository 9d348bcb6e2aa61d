"""PreferenceDataModule end to end: sources -> batches, with and without token rewards."""

from __future__ import annotations

import json
from types import SimpleNamespace

import datasets
import lightning.pytorch as pl
import pytest
import torch

from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.data.errors import DataFormatError
from treg_lightning.data.sources import load_source
from treg_lightning.data.tokenize import PairTokenizer
from treg_lightning.rewards import ContrastiveRewards

# A batch without token rewards or reference logps (data.rewards: None).
BATCH_KEYS = {
    "index",
    "prompt_lengths",
    *(
        f"{side}_{name}"
        for side in ("chosen", "rejected")
        for name in ("input_ids", "attention_mask", "response_mask")
    ),
}
VALUE_KEYS = {
    f"{side}_{name}"
    for side in ("chosen", "rejected")
    for name in ("token_rewards", "ref_token_logps")
}


def make_module(tokenizer_dir, **kwargs):
    settings = dict(tokenizer=str(tokenizer_dir), max_length=256, max_prompt_length=128)
    settings.update(rewards=None, batch_size=4)
    return PreferenceDataModule(**{**settings, **kwargs})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_demo_batches_without_rewards_match_an_independent_tokenization(tokenizer_dir, tokenizer):
    data = make_module(tokenizer_dir, source="demo", val_fraction=0.1)
    data.setup("fit")
    assert len(data.datasets["train"]) == 108 and len(data.datasets["val"]) == 12
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == BATCH_KEYS  # no ref logps without the annotate pass
    raw = load_source("demo").rows
    pair_tokenizer = PairTokenizer(tokenizer, 256, 128)
    for b, index in enumerate(batch["index"].tolist()):
        row = raw[index]
        prompt = pair_tokenizer.prompt_ids([{"role": "user", "content": row["prompt"]}])
        prompt = pair_tokenizer._truncate_prompt(prompt, None)
        chosen = pair_tokenizer.response_ids(row["chosen"])[: 256 - len(prompt)]
        length = len(prompt) + len(chosen)
        assert batch["chosen_input_ids"][b, :length].tolist() == prompt + chosen
        assert batch["chosen_attention_mask"][b].sum() == length
        assert batch["chosen_response_mask"][b].nonzero().flatten().tolist() == list(
            range(len(prompt), length)
        )
    assert not set(batch) & VALUE_KEYS  # no token rewards: none in the batch (not zeros)


def test_val_fraction_split_is_deterministic_by_seed_and_disjoint(tokenizer_dir):
    def split(seed):
        data = make_module(tokenizer_dir, source="demo", val_fraction=0.1, seed=seed)
        data.setup("fit")
        return [sorted(row["index"] for row in data.datasets[s]) for s in ("train", "val")]

    train, val = split(42)
    assert len(val) == 12 and sorted(train + val) == list(range(120))
    assert split(42) == [train, val]
    assert split(7)[1] != val


def test_val_split_of_the_same_saved_dataset(tokenizer_dir, tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:4]),
            "test": datasets.Dataset.from_list(rows[4:]),
        }
    ).save_to_disk(str(tmp_path / "pairs"))
    data = make_module(tokenizer_dir, source=str(tmp_path / "pairs"), val_split="test")
    data.setup("fit")
    assert len(data.datasets["train"]) == 4
    assert [row["chosen"] for row in data.datasets["val"]] == ["good 4", "good 5"]
    assert next(iter(data.val_dataloader()))["index"].tolist() == [0, 1]


def test_no_validation_data_gives_an_empty_val_loader(tokenizer_dir):
    data = make_module(tokenizer_dir, source="demo", limit=10)
    data.setup("fit")
    assert data.val_dataloader() == []


def test_skipped_rows_are_reported(tokenizer_dir, tmp_path):
    rows = [
        {"prompt": "a", "chosen": "yes", "rejected": "no"},
        {"prompt": "b", "chosen": "  ", "rejected": "no"},
        {"prompt": "c", "chosen": "yes", "rejected": "nope"},
    ]
    data = make_module(tokenizer_dir, source=write_jsonl(tmp_path / "data.jsonl", rows))
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 rows: 1 empty response \(row 1\)"):
        data.setup("fit")
    assert [row["index"] for row in data.datasets["train"]] == [0, 2]
    assert data.reports["train"].skipped == {"empty response": 1}


def test_invalid_row_raises_when_not_skipping(tokenizer_dir, tmp_path):
    rows = [{"prompt": "a", "chosen": "yes", "rejected": "no"}, {"prompt": "b", "chosen": "x"}]
    path = write_jsonl(tmp_path / "data.jsonl", [rows[0], {**rows[1], "rejected": "x"}])
    data = make_module(tokenizer_dir, source=path, skip_invalid_rows=False)
    with pytest.raises(DataFormatError, match=r"^data\.jsonl row 1 \(line 2\), field 'rejected'"):
        data.setup("fit")


def test_no_usable_row_is_an_error(tokenizer_dir, tmp_path):
    rows = [{"prompt": "a", "chosen": "same", "rejected": "same"}] * 2
    data = make_module(tokenizer_dir, source=write_jsonl(tmp_path / "data.jsonl", rows))
    with pytest.raises(DataFormatError, match=r"data\.jsonl: no usable pairs left: skipped 2 of 2"):
        with pytest.warns(UserWarning):
            data.setup("fit")


def test_arguments_are_validated(tokenizer_dir):
    with pytest.raises(ValueError, match=r"max_prompt_length \(256\) must be positive"):
        make_module(tokenizer_dir, max_prompt_length=256)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        make_module(tokenizer_dir, val_fraction=1.0)


def test_sampler_takes_data_parallel_rank_from_the_trainer(tokenizer_dir):
    data = make_module(tokenizer_dir, source="demo", limit=10)
    data.setup("fit")
    strategy = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1})
    data.trainer = SimpleNamespace(strategy=strategy)
    loader = data.train_dataloader()
    assert (loader.sampler.num_replicas, loader.sampler.rank) == (2, 1)
    assert len(loader.sampler) == 5


class RecordingModule(pl.LightningModule):
    """Consumes batches with a dummy parameter and records the pair indices it saw."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = {"train": [], "val": []}

    def training_step(self, batch, batch_idx):
        assert set(batch) == BATCH_KEYS
        self.seen["train"].append((self.current_epoch, batch["index"].tolist()))
        return self.weight * batch["chosen_attention_mask"].sum() + self.weight**2

    def validation_step(self, batch, batch_idx):
        self.seen["val"].extend(batch["index"].tolist())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_plain_trainer_fit_reshuffles_each_epoch(tokenizer_dir):
    data = make_module(tokenizer_dir, source="demo", limit=40, val_fraction=0.2)
    module = RecordingModule()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    epochs = [
        [i for epoch, batch in module.seen["train"] if epoch == e for i in batch] for e in (0, 1)
    ]
    train_indices = sorted(row["index"] for row in data.datasets["train"])
    assert sorted(epochs[0]) == sorted(epochs[1]) == train_indices
    assert epochs[0] != epochs[1]  # Lightning called set_epoch on our sampler
    val_indices = sorted(row["index"] for row in data.datasets["val"])
    assert sorted(module.seen["val"]) == sorted(val_indices * 2)  # validated after each epoch


def test_annotated_rewards_are_cached_and_reused(tiny_model_dir, tmp_path, monkeypatch):
    settings = dict(source="demo", tokenizer=str(tiny_model_dir), limit=6, max_length=256)
    rewards = ContrastiveRewards(cache_dir=str(tmp_path / "cache"))
    settings.update(max_prompt_length=128, batch_size=3, rewards=rewards)
    data = PreferenceDataModule(**settings)
    data.setup("fit")
    cache = {row["index"]: row for row in data.datasets["train"]}
    assert len(cache) == 6 and "val" not in data.datasets
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == BATCH_KEYS | VALUE_KEYS
    for side in ("chosen", "rejected"):
        mask = batch[f"{side}_response_mask"]
        rewards = batch[f"{side}_token_rewards"]
        assert (rewards[~mask] == 0).all() and (rewards[mask].abs() < 0.5).all()
        assert (batch[f"{side}_ref_token_logps"][mask] < 0).all()
        for b, index in enumerate(batch["index"].tolist()):  # values land on their tokens
            expected = torch.tensor(cache[index][f"{side}_token_rewards"])
            torch.testing.assert_close(rewards[b][mask[b]], expected)

    from treg_lightning.rewards import ContrastiveScorer

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(ContrastiveScorer, "score", must_not_run)
    settings["rewards"] = ContrastiveRewards(cache_dir=str(tmp_path / "cache"))
    again = PreferenceDataModule(**settings)
    again.setup("fit")
    assert [row["chosen_token_rewards"] for row in again.datasets["train"]] == [
        row["chosen_token_rewards"] for row in data.datasets["train"]
    ]


DDP_SCRIPT = """
import json, sys
import lightning.pytorch as pl
import torch
from treg_lightning.data import PreferenceDataModule

out, tokenizer_dir = sys.argv[1], sys.argv[2]


class Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return self.weight**2 + 0 * batch["chosen_input_ids"].float().sum()

    def on_train_end(self):
        sampler = self.trainer.train_dataloader.sampler
        record = {"seen": self.seen, "sampler": type(sampler).__name__,
                  "replicas": [sampler.num_replicas, sampler.rank]}
        with open(f"{out}/rank{self.global_rank}.json", "w") as f:
            json.dump(record, f)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


data = PreferenceDataModule("demo", tokenizer=tokenizer_dir, rewards=None, limit=20,
                            batch_size=2, max_length=256, max_prompt_length=128)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)
trainer.fit(Recorder(), datamodule=data)
"""


def test_ddp_ranks_get_disjoint_length_grouped_shards(tokenizer_dir, tmp_path):
    """Two CPU processes (gloo) under Lightning's default use_distributed_sampler=True: our
    sampler is kept (not replaced by Lightning's) and splits the pairs between the ranks."""
    import subprocess
    import sys

    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(tokenizer_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["sampler"] for r in ranks] == ["LengthGroupedSampler"] * 2
    assert [r["replicas"] for r in ranks] == [[2, 0], [2, 1]]
    seen = [[i for batch in r["seen"] for i in batch] for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 10
    assert sorted(seen[0] + seen[1]) == list(range(20))
