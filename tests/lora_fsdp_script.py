"""`python lora_fsdp_script.py model_dir data_file out_dir devices strategy [strategy2]`: LoRA
DPO + T-REG for 3 steps (SGD), recording the whole adapter weights after every step, then a
second fit in the same processes resumed from the step-2 checkpoint, then (with strategy2) a
3-step fit under the second strategy in the same processes. Run by
tests/training/test_lora_training.py; with devices=2 Lightning's launcher re-runs this very
script as rank 1."""

import functools
import sys
from pathlib import Path

import lightning as L
import peft
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.losses import DPOLoss, TokenRewardRegularizer
from treg_lightning.module import PreferenceModule
from treg_lightning.rewards import ContrastiveRewards
from treg_lightning.training.callbacks import ExportOnFitEnd

model_dir, data_file, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
devices, strategy_names = int(sys.argv[4]), sys.argv[5:]


class RecordAdapters(L.Callback):
    """The whole adapter weights after each optimizer step (gathered from the FSDP2 shards on
    every rank: ``full_tensor`` is a collective)."""

    def __init__(self):
        self.steps = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        weights = {}
        for name, param in pl_module.policy.named_parameters():
            if param.requires_grad:
                value = param.full_tensor() if hasattr(param, "full_tensor") else param
                weights[name.replace("_checkpoint_wrapped_module.", "")] = value.detach().clone()
        self.steps[trainer.global_step] = {"loss": float(outputs["loss"]), "adapters": weights}


class ReferenceFirst(L.Callback):
    """An adapters-off pass before the step's policy forward (a subclass may compute the
    reference first): under PEFT's own adapter switch, which flips requires_grad, this order
    left the last decoder layer's adapters frozen under FSDP2."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.reference_logps(batch)


def fit(strategy_name, max_steps, ckpt_path=None, export=False):
    L.seed_everything(0)
    module = PreferenceModule(
        model_dir,
        loss=DPOLoss(beta=0.5),
        regularizer=TokenRewardRegularizer(alpha=0.5),
        # SGD: a gradient averaged wrongly over the ranks changes the step itself (AdamW would
        # normalize a constant factor away).
        optimizer=functools.partial(torch.optim.SGD, lr=2.0),
        scheduler=None,
        gradient_checkpointing=True,
        # No dropout: 1 and 2 processes would draw different masks.
        peft=peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"),
    )
    data = PreferenceDataModule(
        data_file,
        tokenizer=model_dir,
        max_length=64,
        max_prompt_length=32,
        batch_size=4 // devices,
        # No cached reference log-probs: the reference is the policy with its adapters off.
        rewards=ContrastiveRewards(
            cache_dir=str(out_dir.parent / "cache"), store_reference_logps=False
        ),
    )
    strategies = {
        "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1),
        "ddp": lambda: "ddp",
        "single": lambda: "auto",
    }
    record = RecordAdapters()
    callbacks = [record, ReferenceFirst()]
    if ckpt_path is None:
        every_step = ModelCheckpoint(
            dirpath=out_dir / f"ckpt-{strategy_name}", every_n_train_steps=1, save_top_k=-1
        )
        callbacks.append(every_step)
    if export:
        callbacks.append(ExportOnFitEnd(export_dir=str(out_dir / "export"), heatmap_path=None))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategies[strategy_name](),
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        default_root_dir=out_dir,
        callbacks=callbacks,
        enable_checkpointing=ckpt_path is None,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, record


first = strategy_names[0]
trainer, straight = fit(first, 3, export=True)
step2 = sorted((out_dir / f"ckpt-{first}").glob("*step=2*"))[0]
_, resumed = fit(first, 3, ckpt_path=str(step2))
runs = {"straight": straight.steps, "resumed": resumed.steps}
for name in strategy_names[1:]:
    runs[name] = fit(name, 3)[1].steps
if trainer.is_global_zero:
    torch.save(runs, out_dir / "adapters.pt")
