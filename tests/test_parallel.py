"""Sharding: 2-process FSDP2 runs on CPU (gloo) equal single-process runs; distributed
`treg annotate`; the FSDP1 wrap policy and the activation-checkpointing wrapper."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from treg_lightning.parallel import (
    DecoderLayerWrapPolicy,
    _wrap_with_activation_checkpointing,
    decoder_layer_classes,
)

SRC = Path(__file__).resolve().parents[1] / "src"

# Run as `python train.py model_dir data_file out_dir devices loss`. With devices=2 Lightning's
# launcher re-runs this very script as rank 1, so the test process never joins a process group.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    from treg_lightning.callbacks import ExportOnFitEnd
    from treg_lightning.data.datamodule import PreferenceDataModule
    from treg_lightning.losses import DPOLoss, SimPOLoss, TokenRewardRegularizer
    from treg_lightning.module import PreferenceModule
    from treg_lightning.rewards import ContrastiveRewards

    model_dir, data_file = sys.argv[1], sys.argv[2]
    out_dir, devices, loss_name = Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

    class RecordLosses(L.Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(trainer.callback_metrics["train/loss_step"]))

    L.seed_everything(0)
    # SimPO: reference-free. DPO: a live reference model, sharded like the policy.
    losses = {"simpo": SimPOLoss(beta=2.0, gamma_beta_ratio=0.5), "dpo": DPOLoss(beta=0.5)}
    module = PreferenceModule(
        model_dir,
        loss=losses[loss_name],
        live_reference=loss_name == "dpo",
        regularizer=TokenRewardRegularizer(alpha=0.5),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0),
        gradient_checkpointing=True,
    )
    data = PreferenceDataModule(
        data_file, tokenizer=model_dir, max_length=64, max_prompt_length=32,
        batch_size=4 // devices,
        rewards=ContrastiveRewards(cache_dir=str(out_dir.parent / "cache")),
    )
    strategy = (
        ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
        if devices > 1 else "auto"
    )
    record = RecordLosses()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=3, logger=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        limit_val_batches=0, default_root_dir=out_dir, gradient_clip_val=1.0,
        callbacks=[record, ExportOnFitEnd(export_dir=str(out_dir / "export"), heatmap_path=None)],
    )
    trainer.fit(module, datamodule=data)
    if trainer.is_global_zero:
        (out_dir / "losses.json").write_text(json.dumps(record.losses))
    """
)


def run(command: list[str], timeout: int = 240) -> None:
    """Run ``command`` in its own process group; on timeout kill the group (launched ranks too)."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"{command[1:3]} hung for {timeout} s:\n{stderr[-4000:]}")
    assert process.returncode == 0, stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    script = root / "train.py"
    script.write_text(SCRIPT)
    data = root / "pairs.jsonl"
    with data.open("w") as f:
        for i in range(8):
            row = {
                "prompt": f"What is {i} + {i}?",
                "chosen": f"It is {2 * i}.",
                "rejected": f"It is {2 * i + 1}, I think." + " really" * i,
            }
            f.write(json.dumps(row) + "\n")
    for loss in ("simpo", "dpo"):
        for devices in (1, 2):
            out = root / f"{loss}{devices}"
            args = [tiny_model_dir, data, out, devices, loss]
            run([sys.executable, str(script), *map(str, args)])
    return root


@pytest.mark.parametrize("loss", ["simpo", "dpo"])
def test_fsdp2_two_processes_equal_single_process(runs, loss):
    """Global batch 4 = 4 pairs on one process or 2 x 2 sharded: the same three losses (the
    2nd and 3rd depend on gradients averaged across the two ranks, on the global gradient norm
    clipping and on sharded AdamW). DPO also runs the sharded frozen reference."""
    single = json.loads((runs / f"{loss}1" / "losses.json").read_text())
    sharded = json.loads((runs / f"{loss}2" / "losses.json").read_text())
    assert len(single) == len(sharded) == 3
    assert single[0] != pytest.approx(single[2], abs=1e-3)  # training moved the loss
    torch.testing.assert_close(torch.tensor(sharded), torch.tensor(single), atol=1e-4, rtol=1e-4)


def test_fsdp2_exports_and_sharded_checkpoint_consolidate(runs, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from treg_lightning.export import export_checkpoint
    from treg_lightning.module import PreferenceModule

    single = AutoModelForCausalLM.from_pretrained(runs / "simpo1" / "export").state_dict()
    sharded = AutoModelForCausalLM.from_pretrained(runs / "simpo2" / "export").state_dict()
    assert single.keys() == sharded.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], atol=1e-4, rtol=1e-4)
    # The FSDP2 checkpoint is a folder of shards; export consolidates it in this process.
    folder = next((runs / "simpo2" / "checkpoints").iterdir())
    assert folder.is_dir() and (folder / "meta.pt").is_file()
    out = export_checkpoint(PreferenceModule(str(tiny_model_dir)), folder, runs / "from_shards")
    consolidated = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for key in sharded:
        torch.testing.assert_close(consolidated[key], sharded[key])


def test_annotate_subcommand_on_two_processes(runs, tiny_model_dir):
    """`treg annotate` under DDP on 2 CPU processes: each rank annotates its shard, rank 0
    merges; the cache equals the one built by the single-process fit runs."""
    import datasets

    cache = runs / "cache-annotate"
    run(
        [
            sys.executable, "-m", "treg_lightning.cli", "annotate",
            f"--model.model={tiny_model_dir}", f"--data.source={runs / 'pairs.jsonl'}",
            "--data.max_length=64", "--data.max_prompt_length=32",
            f"--data.rewards.cache_dir={cache}",
            "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        ]
    )  # fmt: skip
    built = datasets.load_from_disk(str(next(cache.glob("train-*")) / "data"))
    reference = datasets.load_from_disk(str(next((runs / "cache").glob("train-*")) / "data"))
    assert built["index"] == reference["index"] and len(built) == 8
    for column in (
        "chosen_ids",
        "chosen_token_rewards",
        "rejected_token_rewards",
        "chosen_ref_token_logps",
    ):
        for a, b in zip(built[column], reference[column], strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)


def test_decoder_layer_discovery_and_fsdp1_policy(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert decoder_layer_classes(model) == {LlamaDecoderLayer}
    policy = DecoderLayerWrapPolicy()
    layer = model.model.layers[0]
    assert policy(model, recurse=True, nonwrapped_numel=0)  # always descend
    assert policy(layer, recurse=False, nonwrapped_numel=0)
    assert not policy(model.lm_head, recurse=False, nonwrapped_numel=0)
    assert not DecoderLayerWrapPolicy(["Gemma2DecoderLayer"])(layer, False, 0)
    with pytest.raises(ValueError, match="_no_split_modules"):
        decoder_layer_classes(nn.Sequential(nn.Linear(2, 2)))


def test_activation_checkpointing_keeps_names_and_values(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, 256, (2, 10))
    expected = model(ids).logits
    names = set(model.state_dict())
    _wrap_with_activation_checkpointing(model)
    assert "CheckpointWrapper" in type(model.model.layers[0]).__name__
    assert set(model.state_dict()) == names  # checkpoints and exports keep HF names
    logits = model(ids).logits
    torch.testing.assert_close(logits, expected)
    logits.sum().backward()
    assert model.model.layers[0]._checkpoint_wrapped_module.mlp.up_proj.weight.grad is not None
