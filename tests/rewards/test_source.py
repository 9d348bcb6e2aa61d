"""A new token-reward source is one class: defined here, injected into the data module, trained.

The source stands for "rewards from an external token-level reward model": it scores each
response token by a rule known in advance (+0.25 on even token ids, -0.25 on odd ones), so the
test can check that exactly those values reach the batches and the T-REG term.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from builders import SIDES
from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.losses import DPOLoss, SimPOLoss, TokenRewardRegularizer
from treg_lightning.module import PreferenceModule
from treg_lightning.module.checks import ConfigError, check_pair_inputs
from treg_lightning.rewards import TokenRewardSource


class ParityRewards(TokenRewardSource):
    """+0.25 on even token ids, -0.25 on odd ones; no reference log-probs."""

    def __init__(self) -> None:
        self.calls = []

    def annotate(self, rows, split, context):
        self.calls.append((split, len(rows), context.model_name))
        return [
            {
                **row,
                **{
                    f"{side}_token_rewards": [
                        0.25 if t % 2 == 0 else -0.25 for t in row[f"{side}_ids"]
                    ]
                    for side in SIDES
                },
            }
            for row in rows
        ]


def write_pairs(path, n=6):
    with path.open("w") as f:
        for i in range(n):
            row = {"prompt": f"Add {i} and {i}.", "chosen": f"{2 * i}.", "rejected": "No" * (i + 1)}
            f.write(json.dumps(row) + "\n")
    return str(path)


class RecordBatches(L.Callback):
    def __init__(self):
        self.batches = []
        self.treg = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append(batch)
        self.treg.append(float(trainer.callback_metrics["train/treg_step"]))


def test_a_source_defined_here_trains_with_t_reg(tiny_model_dir, tmp_path):
    source = ParityRewards()
    data = PreferenceDataModule(
        write_pairs(tmp_path / "pairs.jsonl"),
        tokenizer=str(tiny_model_dir),
        max_length=48,
        max_prompt_length=24,
        batch_size=2,
        rewards=source,
    )
    module = PreferenceModule(
        str(tiny_model_dir), loss=SimPOLoss(beta=2.0), regularizer=TokenRewardRegularizer(0.5),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )  # fmt: skip
    record = RecordBatches()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, limit_val_batches=0, callbacks=[record],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3
    assert source.calls == [("train", 6, str(tiny_model_dir))]
    for batch in record.batches:
        for side in SIDES:
            ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_response_mask"]
            expected = torch.where(mask, torch.where(ids % 2 == 0, 0.25, -0.25), 0.0)
            torch.testing.assert_close(batch[f"{side}_token_rewards"], expected)
    assert all(value != 0 for value in record.treg)  # the T-REG term is on


def test_start_up_check_asks_the_source_what_it_provides():
    """ParityRewards serves token rewards but no reference log-probs: T-REG is fine, DPO
    without a live reference is not."""
    source = ParityRewards()
    check_pair_inputs(SimPOLoss(), TokenRewardRegularizer(0.25), None, source)
    check_pair_inputs(DPOLoss(), TokenRewardRegularizer(0.25), None, source)  # live reference
    with pytest.raises(
        ConfigError, match="DPOLoss needs reference log-probabilities.*ParityRewards"
    ):
        check_pair_inputs(DPOLoss(), TokenRewardRegularizer(0.25), False, source)
    with pytest.raises(ConfigError, match=r"alpha 0.25, targets SelfGeneratedRewards.*is null"):
        check_pair_inputs(SimPOLoss(), TokenRewardRegularizer(0.25), None, None)
    check_pair_inputs(SimPOLoss(), TokenRewardRegularizer(0.0), None, None)
    check_pair_inputs(SimPOLoss(), None, None, None)
