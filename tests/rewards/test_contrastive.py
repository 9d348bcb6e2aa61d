"""ContrastiveRewards, the paper's token-reward source: it loads its own evaluator (the data
tokenizer's model unless told otherwise), builds the fingerprinted cache once, reuses it, and
says what it provides."""

from __future__ import annotations

from pathlib import Path

import torch

from builders import save_tiny_model
from treg_lightning.rewards import AnnotationContext, ContrastiveRewards, read_meta
from treg_lightning.rewards.annotate import score_sequences


def test_builds_then_reuses_and_records_its_settings(rw_tokenizer, rw_rows, tmp_path, monkeypatch):
    folder = save_tiny_model(tmp_path / "model", rw_tokenizer)
    source = ContrastiveRewards("revise", cache_dir=str(tmp_path / "cache"), progress=False)
    assert source.provides_token_rewards and source.provides_reference_logps
    assert source.cache_folder == tmp_path / "cache"
    context = AnnotationContext(rw_tokenizer, str(folder), settings={"max_length": 9})
    ds = source.annotate(rw_rows, "train", context)
    forwards = source.scorer.stats["forwards"]
    assert forwards > 0
    (cache,) = (tmp_path / "cache").glob("train-*")
    settings = read_meta(cache)["description"]["settings"]
    assert settings["dtype"] == "torch.float32" and settings["max_length"] == 9
    assert settings["template"]["name"] == "revise"

    source.release()
    again = source.annotate(rw_rows, "train", context)  # the evaluator is loaded again ...
    assert source.scorer.stats["forwards"] == forwards  # ... for its fingerprint only
    assert again.data.table.equals(ds.data.table)
    other_split = source.annotate(rw_rows[:2], "val", context)
    assert len(other_split) == 2 and len(list((tmp_path / "cache").glob("*-*"))) == 2


def test_values_equal_a_direct_scoring_with_the_loaded_evaluator(rw_tokenizer, rw_rows, tmp_path):
    """What the source serves is the scorer's r_hat on the evaluator it loaded itself."""
    folder = save_tiny_model(tmp_path / "model", rw_tokenizer, seed=3)
    source = ContrastiveRewards(store_reference_logps=False, cache_dir=str(tmp_path / "c"))
    ds = source.annotate(rw_rows, "train", AnnotationContext(rw_tokenizer, str(folder)))
    assert not source.provides_reference_logps
    assert "chosen_ref_token_logps" not in ds.column_names
    model = source.evaluator_model(AnnotationContext(rw_tokenizer, str(folder)))
    row = rw_rows[0]
    better, worse = source.scorer.template.build(rw_tokenizer, row["prompt"], row["chosen"])
    logps = score_sequences(model, [(better, row["chosen_ids"]), (worse, row["chosen_ids"])], 2)
    expected = torch.sigmoid(torch.tensor(logps[0] - logps[1])) - 0.5
    torch.testing.assert_close(torch.tensor(ds[0]["chosen_token_rewards"]), expected)
    assert Path(source.cache_folder) == tmp_path / "c"
