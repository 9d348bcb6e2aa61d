"""FSDP1 (``configs/strategy/fsdp1.yaml``) emulated on 2 CPU processes with gloo
(``tests/fsdp1_on_cpu.py``): gradient clipping by norm works and equals
``torch.nn.utils.clip_grad_norm_`` on the unsharded model, and the shipped mixed precision
computes in bfloat16, reduces in float32 and leaves the batch's float32 values alone."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from builders import checkout_env, imported_from_checkout, run_in_group, write_pairs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TESTS = Path(__file__).resolve().parents[1]

# `python train.py model_dir data root devices run[,run...]`: each run trains 2 SGD steps of a
# global batch of 4 pairs (4 on one process, 2 x 2 under FSDP1) with an active norm clip, and
# rank 0 writes the full weights before and after every step, plus what the forward saw.
SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import lightning as L
    import torch
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    import treg_lightning
    from fsdp1_on_cpu import unwrapped_name
    from treg_lightning.data.datamodule import PreferenceDataModule
    from treg_lightning.losses import SimPOLoss
    from treg_lightning.module import PreferenceModule
    from treg_lightning.rewards import SpanRewards

    model_dir, data_file, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    devices, names, fsdp1_yaml = int(sys.argv[4]), sys.argv[5].split(","), sys.argv[6]
    CLIP, LR = 0.1, 0.05

    def fsdp1_strategy(float32):
        # The shipped strategy settings, on the CPU stand-in device.
        config = yaml.safe_load(Path(fsdp1_yaml).read_text())["trainer"]
        strategy = config["strategy"]
        strategy["class_path"] = "fsdp1_on_cpu.CPUFSDPStrategy"
        if float32:  # the same units in float32: updates comparable to 1e-5
            mixed = strategy["init_args"].get("mixed_precision") or {}
            strategy["init_args"]["mixed_precision"] = {**mixed, "param_dtype": "torch.float32"}
        parser = ArgumentParser()
        parser.add_argument("--strategy", type=FSDPStrategy)
        init = parser.instantiate(parser.parse_object({"strategy": strategy}))
        return init.strategy, "32-true" if float32 else config["precision"]

    class Record(L.Callback):
        def __init__(self):
            self.weights, self.seen = {}, {}

        def record(self, trainer, pl_module):
            root = trainer.strategy.model
            if isinstance(root, FullyShardedDataParallel):  # a collective: every rank
                with FullyShardedDataParallel.summon_full_params(root, writeback=False):
                    state = {unwrapped_name(k): v.detach().clone()
                             for k, v in pl_module.policy.named_parameters()}
                self.seen["root_mixed_precision"] = str(root.mixed_precision)
            else:
                state = {k: v.detach().clone() for k, v in pl_module.policy.named_parameters()}
            self.weights[trainer.global_step] = state

        def on_train_start(self, trainer, pl_module):
            layer = pl_module.policy.model.layers[0]
            layer.self_attn.q_proj.register_forward_hook(self.forward_dtype)
            self.record(trainer, pl_module)

        def forward_dtype(self, module, args, output):
            self.seen["q_proj_weight_in_forward"] = str(module.weight.dtype)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.seen["grad_dtypes"] = sorted({str(g.dtype) for g in grads})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step not in self.weights:
                self.record(trainer, pl_module)

    class Module(PreferenceModule):
        def compute_loss(self, batch, stage="train"):
            self._record.seen["batch_float_dtypes"] = sorted(
                {str(v.dtype) for v in batch.values() if v.is_floating_point()}
            )
            return super().compute_loss(batch, stage)

    def fit(name):
        L.seed_everything(0)
        module = Module(
            model_dir, loss=SimPOLoss(beta=2.0, gamma_beta_ratio=0.5), regularizer=None,
            optimizer=lambda params: torch.optim.SGD(params, lr=LR), scheduler=None,
        )
        data = PreferenceDataModule(
            data_file, tokenizer=model_dir, max_length=48, max_prompt_length=24,
            batch_size=4 // devices, rewards=SpanRewards(),  # float token rewards, no model
        )
        strategy, precision = ("auto", "32-true") if name == "plain" else fsdp1_strategy(
            float32=name == "fsdp1-fp32"
        )
        record = module._record = Record()
        trainer = L.Trainer(
            accelerator="cpu", devices=devices, strategy=strategy, precision=precision,
            max_steps=2, gradient_clip_val=CLIP, logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False,
            use_distributed_sampler=False, limit_val_batches=0, callbacks=[record],
        )
        trainer.fit(module, datamodule=data)
        if trainer.is_global_zero:
            torch.save({"weights": record.weights, "seen": record.seen, "clip": CLIP, "lr": LR,
                        "treg_lightning": treg_lightning.__file__}, root / f"{name}.pt")

    for name in names:
        fit(name)
    """
)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """One process without FSDP (the reference), then 2 FSDP1 processes: float32 units, then
    the shipped bf16 mixed precision."""
    root = tmp_path_factory.mktemp("fsdp1")
    script = root / "train.py"
    script.write_text(SCRIPT)
    data = write_pairs(root / "pairs.jsonl", 8)
    env = checkout_env(TESTS, OMP_NUM_THREADS="1")
    for devices, names in ((1, "plain"), (2, "fsdp1-fp32,fsdp1-bf16")):
        args = [tiny_model_dir, data, root, devices, names, CONFIGS / "strategy" / "fsdp1.yaml"]
        run_in_group([sys.executable, str(script), *map(str, args)], 300, env)
    return {
        name: torch.load(root / f"{name}.pt", weights_only=True)
        for name in ("plain", "fsdp1-fp32", "fsdp1-bf16")
    }


def _updates(record, step):
    weights = record["weights"]
    return {k: weights[step][k] - weights[step - 1][k] for k in weights[0]}


def _norm(tensors) -> float:
    return torch.linalg.vector_norm(torch.stack([t.norm() for t in tensors])).item()


@pytest.mark.gpu_emulation
def test_fsdp1_clips_by_the_global_norm(runs):
    """The clip is active (an SGD update of norm lr x clip on the unsharded run, where Lightning
    clips with torch.nn.utils.clip_grad_norm_) and the 2-process FSDP1 run makes the same update
    tensor by tensor: the norm was taken over both ranks' shards, not each rank's own."""
    plain, sharded = runs["plain"], runs["fsdp1-fp32"]
    assert imported_from_checkout(sharded["treg_lightning"])
    assert sorted(plain["weights"]) == sorted(sharded["weights"]) == [0, 1, 2]
    for key, value in plain["weights"][0].items():
        torch.testing.assert_close(sharded["weights"][0][key], value)
    for step in (1, 2):
        expected, got = _updates(plain, step), _updates(sharded, step)
        # SGD: update = -lr * clipped gradient, whose norm is the clip value.
        assert _norm(expected.values()) == pytest.approx(plain["lr"] * plain["clip"], rel=1e-4)
        scale = max(u.abs().max().item() for u in expected.values())
        for key, update in expected.items():
            torch.testing.assert_close(got[key], update, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.gpu_emulation
def test_fsdp1_yaml_mixed_precision(runs):
    """fsdp1.yaml's mixed precision on top of precision bf16-mixed: the layers compute with
    bfloat16 weights, gradients are reduced and kept in float32 (fp32 masters), and the batch's
    float values (token rewards, reference log-probs) reach the loss in float32."""
    bf16, plain = runs["fsdp1-bf16"], runs["plain"]
    seen = bf16["seen"]
    assert seen["q_proj_weight_in_forward"] == "torch.bfloat16"
    assert seen["grad_dtypes"] == ["torch.float32"]
    assert seen["batch_float_dtypes"] == ["torch.float32"]
    assert "reduce_dtype=torch.float32" in seen["root_mixed_precision"]
    assert all(w.dtype == torch.float32 for w in bf16["weights"][2].values())
    # The same clipped update as the float32 run, within bfloat16 rounding of the forward.
    for step in (1, 2):
        expected, got = _updates(plain, step), _updates(bf16, step)
        assert _norm(got.values()) == pytest.approx(plain["lr"] * plain["clip"], rel=1e-3)
        cosine = sum((got[k] * expected[k]).sum() for k in expected) / (
            _norm(got.values()) * _norm(expected.values())
        )
        assert cosine > 1 - 2**-5, cosine
