"""LoRA through PreferenceModule(peft=...): the reference is the base model with the adapters
off, DPO + T-REG trains and resumes exactly, checkpoints hold the adapters alone, 2-process
FSDP2 equals 1 process, the merged export equals base + adapter, the NonFiniteGuard checks the
adapter gradients, and the `treg` command exports, checks and refuses (QLoRA on CPU)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

peft = pytest.importorskip("peft", reason="LoRA tests need peft (the `lora`/`dev` extra)")

from builders import checkout_env, pair_batch, run_in_group  # noqa: E402
from treg_lightning.data.datamodule import PreferenceDataModule  # noqa: E402
from treg_lightning.forward.batch import bind_token_logps, padded_token_logps  # noqa: E402
from treg_lightning.losses import DPOLoss, TokenRewardRegularizer  # noqa: E402
from treg_lightning.module import PreferenceModule  # noqa: E402
from treg_lightning.module.schedulers import WarmupCosineLR  # noqa: E402
from treg_lightning.pairs import SIDES, field  # noqa: E402
from treg_lightning.rewards import ContrastiveRewards  # noqa: E402
from treg_lightning.training.callbacks import ExportOnFitEnd  # noqa: E402
from treg_lightning.training.guards import NonFiniteError, NonFiniteGuard  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 4  # 8 pairs, 2 per batch
STEPS = 6  # the resume stops at step 3, mid-epoch 1


def lora_config(dropout: float = 0.1):
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")


def write_pairs(path: Path, n: int = 2 * STEPS_PER_EPOCH) -> Path:
    if not path.exists():
        with path.open("w") as f:
            for i in range(n):
                rejected = "No" * (i + 1)
                row = {"prompt": f"Add {i} and {i}.", "chosen": f"{2 * i}.", "rejected": rejected}
                f.write(json.dumps(row) + "\n")
    return path


def make_module(model_dir, **settings) -> PreferenceModule:
    defaults = {
        "loss": DPOLoss(beta=0.5),
        "regularizer": TokenRewardRegularizer(alpha=0.5),
        "optimizer": functools.partial(torch.optim.AdamW, lr=2e-2, weight_decay=0.0),
        # A fixed horizon: the schedule must not depend on where a run stops.
        "scheduler": functools.partial(WarmupCosineLR, warmup_ratio=0.25, num_training_steps=8),
        "peft": lora_config(),
    }
    return PreferenceModule(str(model_dir), **{**defaults, **settings})


def make_data(model_dir, root: Path, store_reference_logps: bool = False):
    return PreferenceDataModule(
        str(write_pairs(root / "pairs.jsonl")),
        tokenizer=str(model_dir),
        max_length=64,
        max_prompt_length=32,
        batch_size=2,
        # Without cached reference log-probs the reference is the live adapters-off policy.
        rewards=ContrastiveRewards(
            cache_dir=str(root / "cache"), store_reference_logps=store_reference_logps
        ),
    )


def adapters(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}


class RecordSteps(L.Callback):
    """Loss and adapter weights after each optimizer step."""

    def __init__(self):
        self.losses, self.adapters = {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        self.adapters[trainer.global_step] = adapters(pl_module)


def fit(model_dir, root: Path, name: str, ckpt_path=None, callbacks=(), **limits):
    L.seed_everything(0)
    record = RecordSteps()
    checkpoint = ModelCheckpoint(dirpath=root / name, every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record, checkpoint, *callbacks],
        limit_val_batches=0,
        **limits,
    )
    module = make_module(model_dir)
    trainer.fit(module, datamodule=make_data(model_dir, root), ckpt_path=ckpt_path)
    return record, module, checkpoint


def load_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def logits_of(model, seed: int = 3) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- the reference: the same model with its adapters off -------------------------------------


def test_reference_is_the_base_model_with_adapters_off(tiny_model_dir):
    """After steps that made the adapters non-zero, the module's reference log-probs equal the
    base model's bit for bit, no second model is held, and the optimizer sees the adapters only."""
    module = make_module(
        tiny_model_dir, live_reference=True, optimizer=functools.partial(torch.optim.SGD, lr=1.0)
    )
    module.scheduler_factory = None
    module.configure_model()
    base = bind_token_logps(load_base(tiny_model_dir))
    assert module.reference is None
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    held = sum(p.numel() for p in module.parameters())
    assert held == sum(p.numel() for p in base.parameters()) + sum(
        p.numel() for p in trainable.values()
    )  # base + adapters: no reference copy
    optimizer = module.configure_optimizers()
    seen = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert seen == {id(p) for p in trainable.values()}

    batch = pair_batch(seed=1)
    for _ in range(2):
        loss, _ = module.compute_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)

    with torch.no_grad():
        expected = padded_token_logps(base, batch, module.logp_chunk_size, None, module._pad_id())
        reference = module.reference_logps(batch)
        policy = module.forward_logps(batch)
    for side in SIDES:
        assert torch.equal(reference[side], expected[side]), side
        assert not torch.allclose(policy[side], expected[side], atol=1e-3), side
    assert module.policy.training  # the adapters-off pass put back the training mode
    assert all(p.requires_grad for p in trainable.values())


# --- training, exact resume, checkpoints of the adapters alone ------------------------------


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """The uninterrupted LoRA DPO + T-REG run (6 steps, AdamW, warmup-cosine, LoRA dropout),
    a checkpoint after every step, and the merged export written by ExportOnFitEnd."""
    root = tmp_path_factory.mktemp("lora-fit")
    export = ExportOnFitEnd(export_dir=str(root / "fit_export"), heatmap_path=None)
    record, module, checkpoint = fit(
        tiny_model_dir, root, "straight", max_steps=STEPS, callbacks=[export]
    )
    return root, record, module, checkpoint


def test_lora_dpo_treg_resumes_exactly(tiny_model_dir, straight):
    """Resuming from the step-3 checkpoint (mid-epoch, not the last one) gives the losses and
    adapter weights of the run that never stopped: adapters, AdamW moments, scheduler, sampler
    position and RNG (LoRA dropout) restored, the frozen base rebuilt from model.model."""
    root, record, module, _ = straight
    assert sorted(record.losses) == list(range(1, STEPS + 1))
    assert len(set(record.losses.values())) == STEPS  # the loss moved every step
    ckpt = next((root / "straight").glob("*step=3.ckpt"))
    resumed, resumed_module, _ = fit(
        tiny_model_dir, root, "resumed", ckpt_path=str(ckpt), max_steps=STEPS
    )
    assert sorted(resumed.losses) == list(range(4, STEPS + 1))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(record.losses[step], rel=1e-6, abs=1e-7), step
        for name, value in record.adapters[step].items():
            torch.testing.assert_close(resumed.adapters[step][name], value, rtol=1e-6, atol=1e-7)
    final = module.policy.state_dict()
    for name, value in resumed_module.policy.state_dict().items():
        assert torch.equal(value, final[name]), name


def test_checkpoint_holds_the_adapters_and_their_optimizer_state_only(straight, tiny_model_dir):
    root, _, module, _ = straight
    ckpt = torch.load(next((root / "straight").glob("*step=3.ckpt")), weights_only=True)
    names = {f"policy.{n}" for n, p in module.policy.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == names
    (moments,) = [s["state"] for s in ckpt["optimizer_states"]]
    assert len(moments) == len(names)  # AdamW state of the adapters, nothing else
    assert ckpt["hyper_parameters"]["peft"]["class_path"].endswith("LoraConfig")
    adapter_bytes = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
    base_bytes = sum(p.numel() * p.element_size() for p in load_base(tiny_model_dir).parameters())
    assert adapter_bytes < base_bytes / 5


def test_cached_reference_is_the_adapters_off_reference(straight, tiny_model_dir):
    """The annotate pass scores with the base model (the evaluator loads by name): its cached
    reference log-probs equal the trained LoRA policy's adapters-off log-probs."""
    root, _, module, _ = straight
    data = make_data(tiny_model_dir, root, store_reference_logps=True)
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    cached = {side: batch.pop(field(side, "ref_token_logps")) for side in SIDES}
    module.eval()
    live = module.reference_logps(batch)
    with torch.no_grad():
        policy = module.forward_logps(batch)
    for side in SIDES:
        mask = batch[field(side, "response_mask")]
        torch.testing.assert_close(live[side][mask], cached[side][mask], atol=1e-5, rtol=0)
        assert not torch.allclose(policy[side][mask], cached[side][mask], atol=1e-3)


# --- export ------------------------------------------------------------------------------------


def test_merged_and_adapter_exports_equal_base_plus_adapter(straight, tiny_model_dir, tmp_path):
    """From the last checkpoint: the merged folder loads in transformers without peft and its
    logits equal the base model with the adapter (PeftModel.from_pretrained) at 1e-5; the
    adapter folder loads back exactly; ExportOnFitEnd wrote the same merged model."""
    from transformers import AutoModelForCausalLM

    from treg_lightning.models.export import export_checkpoint

    root, _, module, _ = straight
    ckpt = next((root / "straight").glob(f"*step={STEPS}.ckpt"))
    merged_dir = export_checkpoint(make_module(tiny_model_dir), ckpt, tmp_path / "merged")
    adapter_dir = export_checkpoint(
        make_module(tiny_model_dir), ckpt, tmp_path / "adapter", adapter_only=True
    )
    assert not (merged_dir / "adapter_config.json").exists()
    assert (adapter_dir / "adapter_config.json").is_file()
    assert not list(adapter_dir.glob("model*.safetensors"))  # no base weights

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    with_adapter = peft.PeftModel.from_pretrained(load_base(tiny_model_dir), adapter_dir).eval()
    module.policy.eval()
    live = logits_of(module.policy)
    assert torch.equal(logits_of(with_adapter), live)
    torch.testing.assert_close(logits_of(merged), live, atol=1e-5, rtol=0)
    assert not torch.allclose(logits_of(load_base(tiny_model_dir)), live, atol=1e-3)
    at_fit_end = AutoModelForCausalLM.from_pretrained(root / "fit_export").state_dict()
    for name, value in merged.state_dict().items():
        assert torch.equal(at_fit_end[name], value), name


# --- NonFiniteGuard on adapter gradients ---------------------------------------------------------


class PoisonAdapterGrad(L.Callback):
    """A NaN in one adapter's gradient at step ``step`` (the frozen base has no gradients)."""

    def __init__(self, step: int):
        self.step = step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            grad = next(p for n, p in pl_module.named_parameters() if "lora_B" in n).grad
            grad.view(-1)[0] = float("nan")


def test_guard_stops_on_a_non_finite_adapter_gradient(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir)
    before = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            before.update(adapters(pl_module))

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Snapshot(), PoisonAdapterGrad(step=1), NonFiniteGuard()],
    )
    with pytest.raises(NonFiniteError, match="non-finite gradients at global step 1"):
        trainer.fit(module, datamodule=make_data(tiny_model_dir, tmp_path))
    for name, value in adapters(module).items():  # the optimizer did not step
        assert torch.equal(value, before[name]), name


# --- 2-process FSDP2 + LoRA equals 1 process ---------------------------------------------------


def run(command: list[str], timeout: int = 240) -> None:
    """Run ``command`` in its own process group, importing this checkout."""
    run_in_group(command, timeout, checkout_env())


@pytest.fixture(scope="module")
def sharded_runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-fsdp")
    data = write_pairs(root / "pairs.jsonl")
    # The 2-process launch also runs DDP after FSDP2 (same processes: one start-up, not two).
    for devices, strategies in ((1, ["single"]), (2, ["fsdp2", "ddp"])):
        args = [tiny_model_dir, data, root / strategies[0], devices, *strategies]
        run([sys.executable, str(TESTS / "lora_fsdp_script.py"), *map(str, args)])
    return root


def test_fsdp2_and_ddp_lora_two_processes_equal_one(sharded_runs, tiny_model_dir):
    """Global batch 4 as 4 pairs on one process or 2 x 2 sharded (decoder layers as FSDP2
    units holding frozen base weights beside trainable adapters, activation checkpointing, the
    adapters-off reference through the sharded model), or 2 x 2 under DDP: the same adapter
    weights after every SGD step; resuming from the step-2 checkpoint gives step 3 exactly; the
    sharded checkpoint holds the adapters alone; the merged exports agree."""
    from transformers import AutoModelForCausalLM

    from treg_lightning.models.checkpoints import policy_shapes
    from treg_lightning.models.export import export_checkpoint

    single = torch.load(sharded_runs / "single" / "adapters.pt", weights_only=True)
    sharded = torch.load(sharded_runs / "fsdp2" / "adapters.pt", weights_only=True)
    assert sorted(single["straight"]) == sorted(sharded["straight"]) == [1, 2, 3]
    assert sorted(sharded["ddp"]) == [1, 2, 3]
    for step in (1, 2, 3):
        ours = single["straight"][step]["adapters"]
        assert len(ours) == 28  # 7 projections x 2 layers x (A, B)
        # PEFT starts lora_B at zero: the steps moved it.
        assert max(v.abs().max() for n, v in ours.items() if "lora_B" in n) > 1e-2
        for theirs in (sharded["straight"][step]["adapters"], sharded["ddp"][step]["adapters"]):
            assert theirs.keys() == ours.keys()
            for name, value in ours.items():
                torch.testing.assert_close(theirs[name], value, atol=1e-4, rtol=1e-4)
    for run_steps in (single, sharded):
        for name, value in run_steps["straight"][3]["adapters"].items():
            assert torch.equal(run_steps["resumed"][3]["adapters"][name], value), name

    folder = sorted((sharded_runs / "fsdp2" / "ckpt-fsdp2").glob("*step=3*"))[0]
    assert folder.is_dir()
    assert set(policy_shapes(folder)) == set(single["straight"][3]["adapters"])
    single_export = AutoModelForCausalLM.from_pretrained(sharded_runs / "single" / "export")
    sharded_export = AutoModelForCausalLM.from_pretrained(sharded_runs / "fsdp2" / "export")
    module = make_module(tiny_model_dir, peft=lora_config(dropout=0.0))
    from_shards = export_checkpoint(module, folder, sharded_runs / "from_shards")
    consolidated = AutoModelForCausalLM.from_pretrained(from_shards).state_dict()
    for name, value in single_export.state_dict().items():
        torch.testing.assert_close(sharded_export.state_dict()[name], value, atol=1e-4, rtol=1e-4)
        assert torch.equal(consolidated[name], sharded_export.state_dict()[name]), name


# --- QLoRA (CUDA + bitsandbytes only) ------------------------------------------------------------


@pytest.mark.gpu
def test_qlora_module_trains_and_its_reference_is_the_4bit_base(tiny_model_dir):
    if not torch.cuda.is_available():
        pytest.skip("QLoRA needs a CUDA device")
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the `qlora` extra)")
    from treg_lightning.models.adapters import QLoRA

    module = make_module(
        tiny_model_dir,
        quantization=QLoRA(),
        torch_dtype="bfloat16",
        live_reference=True,
        optimizer=functools.partial(torch.optim.SGD, lr=1.0),
        peft=lora_config(dropout=0.0),
    )
    module.scheduler_factory = None
    module.check_device("cuda")
    module.configure_model()
    assert any(type(m).__name__ == "Linear4bit" for m in module.policy.modules())
    assert module.reference is None
    batch = {k: v.cuda() for k, v in pair_batch(seed=1).items()}
    before = module.reference_logps(batch)
    optimizer = module.configure_optimizers()
    loss, _ = module.compute_loss(batch)
    loss.backward()
    optimizer.step()
    after = module.reference_logps(batch)
    with torch.no_grad():
        policy = module.forward_logps(batch)
    for side in SIDES:
        assert torch.equal(before[side], after[side])  # the frozen 4-bit base did not move
        assert not torch.equal(policy[side], after[side])  # the adapters did
