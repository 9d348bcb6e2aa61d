"""The data's token ids must fit the embedding tables of the policy and the reference.

A tokenizer with more tokens than a model embeds fails only inside the embedding lookup (an
index error on CPU, a device-side assert on GPU), far from its cause. Two checks, used by
:class:`~treg_lightning.module.PreferenceModule`:

- :func:`check_model_fits_data`: when a model is built, against the tokenizer of the attached
  :class:`~treg_lightning.data.PreferenceDataModule` (the same check ``treg`` relies on);
- :func:`check_batch_fits`: every batch, on CPU before it moves to the device, against the
  models themselves: this covers data that comes from anywhere else (dataloaders passed to
  ``trainer.fit`` directly, another datamodule), where no tokenizer is known.
"""

from __future__ import annotations

import torch
from torch import nn

from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.errors import ConfigError
from treg_lightning.models.loading import check_vocab_fits


def check_model_fits_data(module, lm: nn.Module, name: str) -> None:
    """Refuse ``lm`` when the trainer's ``PreferenceDataModule`` tokenizer does not fit it."""
    trainer = module._trainer
    datamodule = trainer.datamodule if trainer is not None else None
    tokenizer = datamodule.tokenizer if isinstance(datamodule, PreferenceDataModule) else None
    if tokenizer is not None:
        check_vocab_fits(tokenizer, lm, name)


def embedding_rows(lm: nn.Module | None) -> int | None:
    """Rows of ``lm``'s input embedding table (None when unknown)."""
    if lm is None or not hasattr(lm, "get_input_embeddings"):
        return None
    return getattr(lm.get_input_embeddings(), "num_embeddings", None)


def check_batch_fits(batch, module) -> None:
    """Refuse a batch holding a token id past the embedding table of ``module``'s policy or
    reference (every tensor field named ``*input_ids`` is checked)."""
    if not isinstance(batch, dict):
        return
    ids = [
        value
        for key, value in batch.items()
        if key.endswith("input_ids") and isinstance(value, torch.Tensor) and value.numel()
    ]
    if not ids:
        return
    largest = max(int(tensor.max()) for tensor in ids)  # one small sync per step on a GPU
    models = [(module.model_name, module.policy)]
    models.append(
        (getattr(module, "reference_model_name", None), getattr(module, "reference", None))
    )
    for name, lm in models:
        rows = embedding_rows(lm)
        if rows is None or largest < rows:
            continue
        where = ""
        if isinstance(batch.get("index"), torch.Tensor):
            bad = torch.zeros(len(batch["index"]), dtype=torch.bool)
            for tensor in ids:
                bad |= (tensor >= rows).flatten(1).any(1).cpu()
            where = f" (dataset rows {batch['index'][bad].tolist()})"
        raise ConfigError(
            f"a batch holds token id {largest}{where}, but the model {name!r} embeds only "
            f"{rows} tokens: the data was tokenized with another tokenizer than the model's. "
            "Tokenize with the model's own tokenizer (PreferenceDataModule(tokenizer=...) = the "
            "model; in treg, data.tokenizer follows model.model), or resize the model's "
            "embeddings before training."
        )
