"""A few PreferenceModule training steps under FSDP2 (Lightning's ModelParallelStrategy) on CPU
gloo processes, recording what the FSDP2 tests check. Not a test module: the tests run it as

    python fsdp2_steps.py OUT_FILE DEVICES RUNS_JSON

with the checkout's ``src`` and ``tests`` on PYTHONPATH; Lightning's launcher re-runs it as the
other ranks. ``RUNS_JSON`` maps run names to settings, trained in turn in the same processes:
``steps``, ``accumulate``, ``fsdp_param_dtype``, ``optimizer`` (``"sgd"`` / ``"adamw"``), ``lr``,
``sync_every_micro_batch`` (the reference that reduce-scatters after every backward).

Rank 0 saves ``{run: record}`` with ``torch.save``: the policy's full float32 weights before
the first step and after each optimizer step, each step's full gradients (as the optimizer saw
them), each micro-batch's loss per rank, the reduce-scatters per optimizer step (count and
dtypes, from a spy on ``torch.distributed.reduce_scatter_single``, FSDP2's collective), the
FSDP units, and the dtypes seen: sharded parameters, optimizer states, a layer's weights and
inputs in the forward.
"""

from __future__ import annotations

import json
import sys

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy

from builders import tiny_llama
from pair_paths import VOCAB, contract_batch
from treg_lightning.losses import SimPOLoss, TokenRewardRegularizer
from treg_lightning.module import PreferenceModule

REDUCE_SCATTERS: list[torch.dtype] = []
_reduce_scatter = dist.reduce_scatter_single


def counted_reduce_scatter(output, input, *args, **kwargs):
    REDUCE_SCATTERS.append(input.dtype)
    return _reduce_scatter(output, input, *args, **kwargs)


class RandomLlama(PreferenceModule):
    """The tiny random Llama of the suite (float32, 2 layers, untied head), no files."""

    def __init__(self, **kwargs):
        super().__init__("tiny", **kwargs)
        self.losses = []

    def load_model(self, name_or_path):
        return tiny_llama(VOCAB, 0, attn_implementation="sdpa")

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(float(loss.detach()))
        return loss


def full(tensor):
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def local_dtype(tensor):
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).dtype


class Record(L.Callback):
    """Collectives run on every rank (full_tensor gathers); rank 0 keeps the record."""

    def __init__(self):
        self.weights, self.grads, self.reduce_scatters = [], [], []
        self.dtypes, self.forward_dtypes = {}, set()

    def weights_now(self, policy):
        self.weights.append({n: full(p) for n, p in policy.named_parameters()})

    def on_train_start(self, trainer, pl_module):
        policy = pl_module.policy
        layer = policy.model.layers[0]
        layer = getattr(layer, "_checkpoint_wrapped_module", layer)

        def seen(module, args):
            self.forward_dtypes.add((str(args[0].dtype), str(module.weight.dtype)))

        layer.self_attn.q_proj.register_forward_pre_hook(seen)
        params = list(policy.parameters())
        self.dtypes["sharded"] = sorted({str(local_dtype(p)) for p in params})
        self.dtypes["all_dtensors"] = all(hasattr(p, "to_local") for p in params)
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
        self.dtypes["local_share"] = local / sum(p.numel() for p in params)
        self.units = sum(type(m).__name__.startswith("FSDP") for m in policy.modules())
        self.weights_now(policy)
        REDUCE_SCATTERS.clear()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: full(p.grad) for n, p in pl_module.policy.named_parameters()})
        self.reduce_scatters.append([str(d) for d in REDUCE_SCATTERS])
        REDUCE_SCATTERS.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == len(self.weights):  # an optimizer step just happened
            self.weights_now(pl_module.policy)

    def on_train_end(self, trainer, pl_module):
        states = trainer.optimizers[0].state.values()
        self.dtypes["optimizer"] = sorted(
            {str(local_dtype(v)) for s in states for k, v in s.items() if k != "step"}
        )
        self.dtypes["forward"] = sorted(self.forward_dtypes)
        self.losses = trainer.strategy.all_gather(torch.tensor(pl_module.losses))


def make_module(settings: dict) -> RandomLlama:
    """The run's module (the tests build the single-process reference with it too)."""
    optimizers = {
        "sgd": lambda params: torch.optim.SGD(params, lr=settings["lr"]),
        "adamw": lambda params: torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.0),
    }
    return RandomLlama(
        fsdp_sync_every_micro_batch=settings.get("sync_every_micro_batch", False),
        loss=SimPOLoss(beta=2.0, gamma_beta_ratio=0.5),
        regularizer=TokenRewardRegularizer(alpha=0.5),
        optimizer=optimizers[settings["optimizer"]],
        scheduler=None,
        shared_prompt=False,
        fsdp_param_dtype=settings.get("fsdp_param_dtype"),
    )


def micro_batches(settings: dict, devices: int) -> list[dict]:
    """One contract batch (3 pairs) per micro-batch and rank: rank r trains on items r,
    r + devices, r + 2 * devices, ... in this order (:class:`RankItems`)."""
    count = settings["steps"] * settings["accumulate"] * devices
    return [contract_batch(seed=i) for i in range(count)]


class RankItems(torch.utils.data.Sampler):
    """Items ``rank, rank + devices, ...`` in order; the rank is read when iterating, once the
    process group exists (Lightning's own DistributedSampler would shuffle them)."""

    def __init__(self, count: int, devices: int):
        self.count, self.devices = count, devices

    def __iter__(self):
        return iter(range(dist.get_rank(), self.count, self.devices))

    def __len__(self):
        return self.count // self.devices


def fit(settings: dict, devices: int) -> tuple[bool, dict]:
    L.seed_everything(0)
    module = make_module(settings)
    items = micro_batches(settings, devices)
    sampler = RankItems(len(items), devices)
    loader = torch.utils.data.DataLoader(items, batch_size=None, sampler=sampler)
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, max_steps=settings["steps"], logger=False,
        strategy=ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1),
        accumulate_grad_batches=settings["accumulate"], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
        use_distributed_sampler=False, callbacks=[record],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    return trainer.is_global_zero, {
        "weights": record.weights, "grads": record.grads,
        "losses": record.losses.reshape(devices, -1),
        "reduce_scatters": record.reduce_scatters, "units": record.units,
        "dtypes": record.dtypes,
    }  # fmt: skip


def main() -> None:
    out_file, devices, runs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    dist.reduce_scatter_single = counted_reduce_scatter  # FSDP2 looks it up on every call
    results = {}
    for name, settings in runs.items():
        is_zero, results[name] = fit(settings, devices)
    if is_zero:
        torch.save(results, out_file)


if __name__ == "__main__":
    main()
