"""The Python API refuses token ids that do not fit the model, as `treg` does, on every data
path: a plain ``Trainer`` fed dataloaders directly (no datamodule, so no tokenizer is known) and
a reference model with a smaller vocabulary than the policy's. Refused before any forward."""

from __future__ import annotations

import json
import re
from pathlib import Path
from unittest import mock

import lightning as L
import pytest

from builders import byte_tokenizer, save_tiny_model
from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.errors import ConfigError
from treg_lightning.losses import DPOLoss
from treg_lightning.module import PreferenceModule

EXTRA = tuple(f"<x{i}>" for i in range(40))
REACHED = AssertionError("a forward ran before the vocabulary check")


def trainer() -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    small = save_tiny_model(root / "small", byte_tokenizer())  # 259 embedding rows
    big = save_tiny_model(root / "big", byte_tokenizer(specials=EXTRA))  # 299
    rows = [{"prompt": f"Q{i}?", "chosen": f"A{i} <x39>", "rejected": f"B{i}."} for i in range(4)]
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"small": small, "big": big, "data": data}


def data_module(models, tokenizer: Path) -> PreferenceDataModule:
    return PreferenceDataModule(
        str(models["data"]), tokenizer=str(tokenizer), rewards=None, max_length=64,
        max_prompt_length=32, batch_size=2,
    )  # fmt: skip


def test_dataloaders_given_directly_are_checked_against_the_policy(models):
    """Was an IndexError inside the embedding lookup: no datamodule, so no tokenizer to check."""
    data = data_module(models, models["big"])
    data.setup("fit")
    module = PreferenceModule(str(models["small"]), regularizer=None)
    with (
        mock.patch.object(PreferenceModule, "forward_logps", side_effect=REACHED),
        pytest.raises(ConfigError) as info,
    ):
        trainer().fit(module, train_dataloaders=data.train_dataloader())
    message = str(info.value)
    # 297 is the big tokenizer's end-of-turn token, which ends every response.
    assert re.match(r"a batch holds token id 297 \(dataset rows \[\d, \d\]\), but the", message)
    assert f"but the model '{models['small']}' embeds only 259 tokens" in message


def test_a_reference_with_a_smaller_vocabulary(models):
    """The policy fits the data tokenizer; the live reference does not."""
    module = PreferenceModule(
        str(models["big"]),
        loss=DPOLoss(),
        regularizer=None,
        reference_model=str(models["small"]),
        live_reference=True,
    )
    with (
        mock.patch.object(PreferenceModule, "forward_logps", side_effect=REACHED),
        pytest.raises(ConfigError) as info,
    ):
        trainer().fit(module, datamodule=data_module(models, models["big"]))
    assert str(info.value).startswith(
        f"the tokenizer '{models['big']}' has 299 tokens but the model '{models['small']}' "
        "embeds only 259"
    )


def test_fitting_ids_pass(models):
    data = data_module(models, models["small"])
    data.setup("fit")
    module = PreferenceModule(str(models["small"]), regularizer=None)
    trainer().fit(module, train_dataloaders=data.train_dataloader())
    assert module.trainer.global_step == 1
