"""Extending PreferenceModule by overriding one method, trained with a plain Trainer and
PreferenceDataModule (no CLI)."""

from __future__ import annotations

import json

import lightning as L
import torch

from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.losses import SimPOLoss
from treg_lightning.module import PreferenceModule
from treg_lightning.rewards import ContrastiveRewards


class SimPOWithSFT(PreferenceModule):
    """SimPO plus an SFT term on the chosen response: ``sft_weight * mean(-s_w / |y_w|)``."""

    def __init__(self, *args, sft_weight: float = 0.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sft_weight = sft_weight

    def compute_loss(self, batch, stage="train"):
        loss, outputs = super().compute_loss(batch, stage)
        lengths = batch["chosen_response_mask"].sum(-1)
        sft = -(outputs["pair"].chosen.logps / lengths).mean()
        self.log(f"{stage}/sft", sft.detach(), batch_size=lengths.shape[0])
        return loss + self.sft_weight * sft, outputs


def write_pairs(path):
    with path.open("w") as f:
        for i in range(6):
            row = {"prompt": f"Echo {i}.", "chosen": f"{i}.", "rejected": f"Not {i}, but {i + 1}."}
            f.write(json.dumps(row) + "\n")
    return path


def test_subclass_adds_exactly_its_term(tiny_model_dir, tmp_path):
    data = PreferenceDataModule(
        str(write_pairs(tmp_path / "pairs.jsonl")),
        tokenizer=str(tiny_model_dir),
        max_length=64,
        max_prompt_length=32,
        batch_size=3,
        rewards=None,
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    base = PreferenceModule(str(tiny_model_dir), loss=SimPOLoss(), regularizer=None)
    sub = SimPOWithSFT(str(tiny_model_dir), loss=SimPOLoss(), regularizer=None, sft_weight=0.5)
    base.configure_model()
    sub.configure_model()
    base_loss, _ = base.compute_loss(batch)
    sub.log = lambda *args, **kwargs: None  # not attached to a trainer here
    sub_loss, _ = sub.compute_loss(batch)
    # SFT term from full logits, independently of the chunked path.
    ids, mask = batch["chosen_input_ids"], batch["chosen_response_mask"]
    logits = sub.policy(input_ids=ids, attention_mask=batch["chosen_attention_mask"]).logits
    token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    s_w = (token_logps * mask[:, 1:]).sum(-1)
    expected_sft = -(s_w / mask.sum(-1)).mean()
    torch.testing.assert_close(sub_loss - base_loss, 0.5 * expected_sft, atol=1e-5, rtol=1e-5)


def test_subclass_trains_with_plain_trainer(tiny_model_dir, tmp_path):
    data = PreferenceDataModule(
        str(write_pairs(tmp_path / "pairs.jsonl")),
        tokenizer=str(tiny_model_dir),
        max_length=64,
        max_prompt_length=32,
        batch_size=2,
        val_fraction=0.34,
        rewards=ContrastiveRewards(cache_dir=str(tmp_path / "cache")),
    )
    module = SimPOWithSFT(
        str(tiny_model_dir), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), sft_weight=1.0
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert trainer.global_step == 2
    assert torch.isfinite(torch.tensor([metrics["train/sft"], metrics["val/sft"]])).all()
    assert metrics["train/treg_step"] != 0.0  # the default T-REG regularizer is on
    trained = module.policy.state_dict()
    initial = PreferenceModule(str(tiny_model_dir))
    initial.configure_model()
    changed = [k for k, v in initial.policy.state_dict().items() if not torch.equal(trained[k], v)]
    assert changed  # the optimizer stepped the subclass's policy
