"""Sharding: 2-process FSDP2 runs on CPU (gloo) equal single-process runs, weights compared
after every step (DPO, SimPO, gradient accumulation with clipping, packing, bfloat16 compute, a
resume from the sharded checkpoint); distributed `treg annotate`, rank by rank; the FSDP1 wrap
policy and the activation-checkpointing wrapper."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from builders import checkout_env, imported_from_checkout, run_in_group
from treg_lightning.models.parallel import (
    DecoderLayerWrapPolicy,
    _wrap_with_activation_checkpointing,
    decoder_layer_classes,
)

# Run as `python train.py model_dir data_file out_root devices run[,run...]`: each run is one
# setting of RUNS below, trained in turn in the same processes (one launch, one import). With
# devices=2 Lightning's launcher re-runs this very script as rank 1, so the test process never
# joins a process group. Rank 0 writes, per run, the full (gathered) policy weights before the
# first step and after every optimizer step: {global_step: state_dict}.
SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    import treg_lightning
    from treg_lightning.training.callbacks import ExportOnFitEnd
    from treg_lightning.data.datamodule import PreferenceDataModule
    from treg_lightning.losses import DPOLoss, SimPOLoss, TokenRewardRegularizer
    from treg_lightning.module import PreferenceModule
    from treg_lightning.rewards import ContrastiveRewards

    model_dir, data_file, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    devices, names = int(sys.argv[4]), sys.argv[5].split(",")

    # Global batch 4 everywhere: 4 pairs on one process or 2 x 2 sharded; "accum": 2 micro-
    # batches of 2 pairs (1 x 2 sharded) per step, with a clip that is active.
    RUNS = {
        "simpo": {"steps": 4, "export": True},
        "dpo": {"loss": "dpo", "steps": 3, "lr": 0.01},  # at 0.05 step 2 barely moves
        "accum": {"steps": 3, "batch": 2, "accumulate": 2, "clip": 0.5},
        "bf16": {"steps": 3, "fsdp_param_dtype": "bfloat16"},
        "packing": {"steps": 3, "packing": True},
        "resume": {"steps": 4, "stop": 2},
    }

    class RecordWeights(L.Callback):
        # full_tensor() gathers a DTensor shard: a collective, so every rank calls it.
        def __init__(self):
            self.weights, self.compute_dtypes = {}, set()

        def record(self, trainer, pl_module):
            state = pl_module.policy.state_dict()
            full = {k: getattr(v, "full_tensor", lambda v=v: v)() for k, v in state.items()}
            self.weights[trainer.global_step] = {k: v.detach().clone() for k, v in full.items()}

        def on_train_start(self, trainer, pl_module):
            layer = pl_module.policy.model.layers[0]
            layer = getattr(layer, "_checkpoint_wrapped_module", layer)
            layer.self_attn.q_proj.register_forward_hook(
                lambda m, args, out: self.compute_dtypes.add(str(m.weight.dtype))
            )
            self.record(trainer, pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step not in self.weights:  # an optimizer step happened
                self.record(trainer, pl_module)

    def fit(name, out, max_steps, ckpt_path=None, checkpoint=None):
        run = {"loss": "simpo", "batch": 4, "accumulate": 1, "clip": None, "lr": float(sys.argv[6])}
        run.update(RUNS[name])
        L.seed_everything(0)
        # SimPO: reference-free. DPO: a live reference model, sharded like the policy.
        losses = {"simpo": SimPOLoss(beta=2.0, gamma_beta_ratio=0.5), "dpo": DPOLoss(beta=0.5)}
        module = PreferenceModule(
            model_dir,
            loss=losses[run["loss"]],
            live_reference=run["loss"] == "dpo",
            regularizer=TokenRewardRegularizer(alpha=0.5),
            # SGD without momentum: the update is lr * gradient, so a gradient summed instead
            # of averaged across ranks doubles it (AdamW's first update is sign(g) and hides it).
            optimizer=lambda params: torch.optim.SGD(params, lr=run["lr"]),
            scheduler=None,
            gradient_checkpointing=True,
            packing=run.get("packing"),
            fsdp_param_dtype=run.get("fsdp_param_dtype"),
        )
        data = PreferenceDataModule(
            data_file, tokenizer=model_dir, max_length=64, max_prompt_length=32,
            batch_size=run["batch"] // devices,
            rewards=ContrastiveRewards(cache_dir=str(root / "cache"), chunk_pairs=4),
        )
        strategy = (
            ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
            if devices > 1 else "auto"
        )
        record = RecordWeights()
        callbacks = [record]
        if run.get("export"):
            callbacks.append(ExportOnFitEnd(export_dir=str(out / "export"), heatmap_path=None))
        if checkpoint is not None:
            callbacks.append(checkpoint)
        trainer = L.Trainer(
            accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps,
            logger=False, enable_progress_bar=False, enable_model_summary=False,
            use_distributed_sampler=False, limit_val_batches=0, default_root_dir=out,
            accumulate_grad_batches=run["accumulate"], gradient_clip_val=run["clip"],
            enable_checkpointing=bool(run.get("export")) or checkpoint is not None,
            callbacks=callbacks,
        )
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return trainer, record

    for name in names:
        out = root / f"{name}-{devices}"
        runs = []
        if "stop" in RUNS[name]:
            # Stop at `stop` steps (mid-epoch: 3 steps per epoch), save the sharded checkpoint
            # there, then resume from it in a new Trainer.
            saver = ModelCheckpoint(dirpath=out / "ckpt", save_last=True)
            runs.append(fit(name, out, RUNS[name]["stop"], checkpoint=saver))
            last = out / "ckpt" / "last.ckpt"
            runs.append(fit(name, out, RUNS[name]["steps"], ckpt_path=last))
        else:
            runs.append(fit(name, out, RUNS[name]["steps"]))
        trainer = runs[0][0]
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "weights": [record.weights for _, record in runs],
                    "compute_dtypes": sorted(set().union(*(r.compute_dtypes for _, r in runs))),
                    "treg_lightning": treg_lightning.__file__,
                },
                out / "weights.pt",
            )
    """
)

# SGD learning rate of the runs (DPO's is smaller): each step moves the tiny model's weights by
# ~1e-2 at most, far beyond float32 noise (a doubled gradient doubles the update), and every
# step still moves.
LR = 0.05
PAIRS = 12  # global batch 4: 3 steps per epoch; 4 steps cross into the second epoch
RUN_ORDER = ("simpo", "dpo", "accum", "bf16", "packing", "resume")  # the script's RUNS


def run(command: list[str], timeout: int = 300, env: dict | None = None) -> None:
    """Run ``command`` in its own process group (one thread per process unless ``env``)."""
    run_in_group(command, timeout, env if env is not None else checkout_env(OMP_NUM_THREADS="1"))


def needs(*runs: str):
    """The runs (``"{setting}-{devices}"``, ``{param}`` filled from the test's parameters) a
    test reads: the fixture launches only those of the selected tests."""

    def mark(test):
        test.fsdp_runs = runs
        return test

    return mark


def _needed(item) -> set[str]:
    params = item.callspec.params if hasattr(item, "callspec") else {}
    return {run.format(**params) for run in getattr(item.function, "fsdp_runs", ())}


@pytest.fixture(scope="module")
def runs(request, tiny_model_dir, tmp_path_factory):
    """At most one launch on one process (the references) and one on two (FSDP2), each
    training the runs the selected tests need, in turn; the first builds the token-reward
    cache, the others reuse it."""
    selected = [item for item in request.session.items if item.module is request.module]
    wanted = set().union(*map(_needed, selected))
    root = tmp_path_factory.mktemp("fsdp")
    script = root / "train.py"
    script.write_text(SCRIPT)
    data = root / "pairs.jsonl"
    with data.open("w") as f:
        for i in range(PAIRS):
            row = {
                "prompt": f"What is {i} + {i}?",
                "chosen": f"It is {2 * i}.",
                "rejected": f"It is {2 * i + 1}, I think." + " really" * (i % 5),
            }
            f.write(json.dumps(row) + "\n")
    for devices in (1, 2):
        names = [name for name in RUN_ORDER if f"{name}-{devices}" in wanted]
        if names:
            args = [tiny_model_dir, data, root, devices, ",".join(names), LR]
            run([sys.executable, str(script), *map(str, args)])
    return root


def _load(runs: Path, name: str) -> dict:
    record = torch.load(runs / name / "weights.pt", weights_only=True)
    assert imported_from_checkout(record["treg_lightning"]), record["treg_lightning"]
    return record


def _steps(record: dict) -> dict[int, dict[str, torch.Tensor]]:
    (weights,) = record["weights"]
    return weights


def _assert_same_updates(got, expected, steps, rtol=1e-4):
    """The same initial weights, and at each of ``steps`` the same update (the change from
    the step before), tensor by tensor, to ``rtol`` of the step's largest change: a gradient
    off by a factor, a pair seen twice or left out, or a shard missing moves it by far more."""
    for key, value in expected[0].items():
        torch.testing.assert_close(got[0][key], value, msg=f"initial {key}")
    for step in steps:
        updates = {k: expected[step][k] - expected[step - 1][k] for k in expected[0]}
        scale = max(update.abs().max().item() for update in updates.values())
        assert scale > 1e-4, f"step {step} barely moved the weights: {scale}"
        for key, update in updates.items():
            torch.testing.assert_close(
                got[step][key] - got[step - 1][key],
                update,
                rtol=rtol,
                atol=rtol * scale,
                msg=lambda m, key=key, step=step: f"step {step}, {key}: {m}",
            )


@pytest.mark.parametrize("loss", ["simpo", "dpo"])
@needs("{loss}-1", "{loss}-2")
def test_fsdp2_two_processes_equal_single_process(runs, loss):
    """Global batch 4 = 4 pairs on one process or 2 x 2 sharded: the same weights after every
    SGD step (the update is the gradient averaged across the two ranks, times lr). DPO also
    runs the sharded frozen reference; both train T-REG on the contrastive token rewards."""
    single, sharded = _steps(_load(runs, f"{loss}-1")), _steps(_load(runs, f"{loss}-2"))
    steps = sorted(single)[1:]
    assert sorted(single) == sorted(sharded) == list(range(len(steps) + 1))
    _assert_same_updates(sharded, single, steps)


@needs("accum-1", "accum-2")
def test_fsdp2_gradient_accumulation_and_clipping(runs):
    """2 micro-batches per step (gradients accumulate in the sharded parameters) and a
    gradient-norm clip that is active (the norm is global, over both ranks' shards)."""
    single, sharded = _steps(_load(runs, "accum-1")), _steps(_load(runs, "accum-2"))
    assert sorted(single) == sorted(sharded) == [0, 1, 2, 3]
    _assert_same_updates(sharded, single, [1, 2, 3])
    # The clip was active: the update of step 1 is lr * the clipped global norm, on both.
    for weights in (single, sharded):
        norm = torch.stack([(weights[1][k] - weights[0][k]).norm() for k in weights[0]]).norm()
        assert norm.item() == pytest.approx(LR * 0.5, rel=1e-3)


@needs("simpo-1", "packing-2")
def test_fsdp2_packing_equals_padded_single_process(runs):
    """Packed rows (one [1, N] row per rank, position ids restarting per sequence) under FSDP2
    train exactly as the padded single-process run."""
    _assert_same_updates(
        _steps(_load(runs, "packing-2")), _steps(_load(runs, "simpo-1")), [1, 2, 3]
    )


@pytest.mark.gpu_emulation
@needs("simpo-1", "bf16-2")
def test_fsdp2_bf16_parameters_close_to_float32(runs):
    """fsdp_param_dtype=bfloat16 on CPU gloo: the layers compute with bfloat16 weights while
    the sharded master weights stay float32, and the updates stay within bfloat16 precision of
    the float32 run's (but are not equal to them: bfloat16 was really used)."""
    record = _load(runs, "bf16-2")
    assert record["compute_dtypes"] == ["torch.bfloat16"]
    got, expected = _steps(record), _steps(_load(runs, "simpo-1"))
    assert all(v.dtype == torch.float32 for v in got[3].values())
    for step in (1, 2, 3):
        for key in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight"):
            delta, reference = got[step][key] - got[0][key], expected[step][key] - expected[0][key]
            error = ((delta - reference).norm() / reference.norm()).item()
            assert 1e-5 < error < 0.02, (step, key, error)  # measured: 2e-3 to 7e-3


@needs("simpo-1", "resume-2")
def test_fsdp2_resume_from_sharded_checkpoint_equals_uninterrupted(runs):
    """Train 2 steps (mid-epoch), save the sharded checkpoint, resume from it in a new Trainer
    to 4: the restored weights and those after steps 3 and 4 equal the uninterrupted run's."""
    first, resumed = _load(runs, "resume-2")["weights"]
    assert sorted(first) == [0, 1, 2] and sorted(resumed) == [2, 3, 4]
    assert (runs / "resume-2" / "ckpt" / "last.ckpt" / "meta.pt").is_file()  # sharded folder
    for key, value in first[2].items():
        torch.testing.assert_close(resumed[2][key], value, rtol=0, atol=0)  # restored exactly
    expected = _steps(_load(runs, "simpo-1"))
    _assert_same_updates({**first, **resumed}, expected, [1, 2, 3, 4])


@needs("simpo-1", "simpo-2")
def test_fsdp2_exports_and_sharded_checkpoint_consolidate(runs, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from treg_lightning.models.export import export_checkpoint
    from treg_lightning.module import PreferenceModule

    single = AutoModelForCausalLM.from_pretrained(runs / "simpo-1" / "export").state_dict()
    sharded = AutoModelForCausalLM.from_pretrained(runs / "simpo-2" / "export").state_dict()
    assert single.keys() == sharded.keys()
    final = _steps(_load(runs, "simpo-2"))[4]
    for key in single:
        torch.testing.assert_close(sharded[key], final[key])  # the export is the last step's
        torch.testing.assert_close(sharded[key], single[key], atol=1e-4, rtol=1e-4)
    # The FSDP2 checkpoint is a folder of shards; export consolidates it in this process.
    folder = next((runs / "simpo-2" / "checkpoints").iterdir())
    assert folder.is_dir() and (folder / "meta.pt").is_file()
    out = export_checkpoint(PreferenceModule(str(tiny_model_dir)), folder, runs / "from_shards")
    consolidated = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for key in sharded:
        torch.testing.assert_close(consolidated[key], sharded[key])


# A reward source that records, per process, the source rows of each chunk it scores.
PROBE = textwrap.dedent(
    """
    import json, os
    import torch.distributed as dist
    from treg_lightning.rewards import ContrastiveRewards

    class ProbedRewards(ContrastiveRewards):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            score = self.scorer.score

            def recorded(model, tokenizer, rows, on_batch=None):
                rank = dist.get_rank() if dist.is_initialized() else 0
                with open(os.path.join(os.environ["PROBE_OUT"], f"rank{rank}.jsonl"), "a") as f:
                    f.write(json.dumps([int(row["index"]) for row in rows]) + "\\n")
                return score(model, tokenizer, rows, on_batch)

            self.scorer.score = recorded
    """
)


@needs("simpo-1")  # its token-reward cache is the reference
def test_annotate_subcommand_on_two_processes(runs, tiny_model_dir):
    """`treg annotate` under DDP on 2 CPU processes: rank r scores exactly the chunks
    c % 2 == r (chunks of 3 pairs: rows 0-2 and 6-8 on rank 0, 3-5 and 9-11 on rank 1), rank 0
    merges; the cache equals the one built by the fit runs (other chunking, same values)."""
    import datasets

    cache, probe = runs / "cache-annotate", runs / "probe"
    probe.mkdir()
    (probe / "annotate_probe.py").write_text(PROBE)
    run(
        [
            sys.executable, "-m", "treg_lightning.cli.main", "annotate",
            f"--model.model={tiny_model_dir}", f"--data.source={runs / 'pairs.jsonl'}",
            "--data.max_length=64", "--data.max_prompt_length=32",
            "--data.rewards=annotate_probe.ProbedRewards",
            f"--data.rewards.cache_dir={cache}", "--data.rewards.chunk_pairs=3",
            "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        ],
        env=checkout_env(probe, OMP_NUM_THREADS="1", PROBE_OUT=str(probe)),
    )  # fmt: skip
    scored = [
        [json.loads(line) for line in (probe / f"rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert scored == [[[0, 1, 2], [6, 7, 8]], [[3, 4, 5], [9, 10, 11]]]
    built = datasets.load_from_disk(str(next(cache.glob("train-*")) / "data"))
    reference = datasets.load_from_disk(str(next((runs / "cache").glob("train-*")) / "data"))
    assert built["index"] == reference["index"] == list(range(PAIRS))
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
