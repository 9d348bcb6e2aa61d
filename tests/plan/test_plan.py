"""`treg plan`: shapes and parameter counts, activation bytes against what autograd saves,
sharding divisors, the micro-batch search, offline shapes, the CLI on every shipped config."""

from __future__ import annotations

import json
import sys
import weakref
from pathlib import Path
from unittest import mock

import pytest
import torch

from treg_lightning.plan import PlanError, plan_from_config, resolve_shape
from treg_lightning.plan.activations import (
    KERNELS,
    LoraSpec,
    attention_kernel,
    layer_activation_bytes,
    layer_constant_bytes,
)
from treg_lightning.plan.estimate import estimate, max_micro_batch
from treg_lightning.plan.report import format_plan, parse_size
from treg_lightning.plan.settings import settings_from_config
from treg_lightning.plan.shapes import SHIPPED_SHAPES, shape_from_config

ROOT = Path(__file__).resolve().parents[2]
# Run configs only: a `treg pairs` config (onpolicy_demo.yaml) has its own sections.
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "onpolicy_demo.yaml")
STRATEGIES = sorted((ROOT / "configs" / "strategy").glob("*.yaml"))


def tiny_config(kind: str, layers: int = 3, **overrides):
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    common.update(overrides)
    if kind == "gemma2":
        return Gemma2Config(**common, query_pre_attn_scalar=16)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[kind](**common)


# ---- shapes and parameter counts ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma2"])
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_equals_the_real_model(kind, tied):
    from transformers import AutoModelForCausalLM

    config = tiny_config(kind, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config)
    shape = shape_from_config(config)
    assert shape.param_count is None  # counted from the shape, not on a meta model
    assert shape.num_params() == sum(p.numel() for p in model.parameters())


def test_weights_part_is_parameter_count_times_bytes(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    numel = sum(p.numel() for p in model.parameters())
    plan = plan_from_config(config_for(str(tiny_model_dir)), gpu_memory="1TB")
    parts = {p.name: p.bytes for p in plan.estimate.parts}
    assert parts["weights"] == numel * 4
    assert parts["gradients"] == numel * 4
    assert parts["optimizer states"] == 2 * numel * 4


def test_shipped_shapes_count_the_published_parameters():
    # Llama-3-8B: 8,030,261,248 parameters; Gemma-2-9B: 9,241,705,984 (model cards).
    assert SHIPPED_SHAPES["meta-llama/Meta-Llama-3-8B-Instruct"].num_params() == 8_030_261_248
    assert SHIPPED_SHAPES["google/gemma-2-9b-it"].num_params() == 9_241_705_984
    assert SHIPPED_SHAPES["smollm2"].num_params() == 134_515_008


# ---- activations against what autograd saves ----------------------------------------------


def saved_bytes_per_token_layer(config, dtype, attn, length, padded, lora_spec=None) -> float:
    """Bytes autograd saves for one decoder layer, per token: the saved tensors of a 3-layer
    forward minus those of the first 2 layers (Gemma-2 alternates layer kinds; the third
    layer repeats the first, with every shared mask already built). Weights are left out."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    if lora_spec is not None:
        import peft

        targets = lora_spec.target_modules
        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=lora_spec.r,
                lora_dropout=lora_spec.dropout,
                target_modules=targets if isinstance(targets, str) else list(targets),
                use_dora=lora_spec.use_dora,
            ),
        )
    model.train()
    lm = model.get_base_model() if lora_spec is not None else model
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    ids = torch.randint(0, config.vocab_size, (2, length))
    mask = torch.ones(2, length, dtype=torch.long)
    if padded:
        mask[1, -1] = 0
    layers = list(lm.model.layers)

    def saved(count: int) -> int:
        packed = []  # weak references: a graph dropped during the forward frees its tensors

        def pack(tensor):
            if tensor.untyped_storage().data_ptr() not in weights:
                packed.append(weakref.ref(tensor))
            return tensor

        lm.model.layers = torch.nn.ModuleList(layers[:count])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
        alive = [ref() for ref in packed if ref() is not None]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}
        del out
        return sum(storages.values())

    return (saved(3) - saved(2)) / ids.numel()


ACTIVATION_CASES = [
    # (model, dtype, attention, length, padded, lora)
    ("llama", torch.float32, "sdpa", 64, True, None),
    ("llama", torch.float32, "sdpa", 96, False, None),
    ("llama", torch.bfloat16, "sdpa", 64, True, None),
    ("llama", torch.float32, "eager", 64, True, None),
    ("qwen2", torch.float32, "sdpa", 64, True, None),
    ("gemma2", torch.float32, "eager", 64, True, None),
    ("gemma2", torch.bfloat16, "eager", 96, True, None),
    ("llama", torch.float32, "sdpa", 64, True, LoraSpec(r=8)),
    ("llama", torch.float32, "sdpa", 64, True, LoraSpec(r=8, dropout=0.1)),
    ("llama", torch.bfloat16, "sdpa", 64, True, LoraSpec(r=8)),
    ("llama", torch.bfloat16, "sdpa", 64, True, LoraSpec(r=8, dropout=0.1)),
    ("llama", torch.float32, "sdpa", 64, True, LoraSpec(r=8, target_modules=("q_proj", "v_proj"))),
    ("llama", torch.float32, "eager", 64, True, LoraSpec(r=8)),
    ("llama", torch.float32, "eager", 64, True, LoraSpec(r=8, target_modules=("q_proj",))),
    ("gemma2", torch.float32, "eager", 64, True, LoraSpec(r=8)),
    ("gemma2", torch.bfloat16, "eager", 64, True, LoraSpec(r=8, dropout=0.05)),
]


@pytest.mark.parametrize(
    "case",
    ACTIVATION_CASES,
    ids=lambda c: (
        "-".join(map(str, c[:5]))
        + (f"-lora{c[5].r}-{c[5].dropout}-{c[5].target_modules}" if c[5] else "")
    ),
)
def test_layer_activation_bytes_equal_what_autograd_saves(case):
    kind, dtype, attn, length, padded, lora_spec = case
    if lora_spec is not None:
        pytest.importorskip("peft")
    config = tiny_config(kind)
    measured = saved_bytes_per_token_layer(config, dtype, attn, length, padded, lora_spec)
    # sdpa without padding runs grouped-query attention natively and needs no mask: the
    # flash kernels' model.
    kernel = attention_kernel(attn if padded or attn != "sdpa" else "flash_attention_2")
    compute = 2 if dtype == torch.bfloat16 else 4
    shape = shape_from_config(config)
    expected = layer_activation_bytes(shape, length, compute, kernel, lora_spec, None, 4)
    expected += layer_constant_bytes(shape, lora_spec) / (2 * length)
    assert expected == measured


def test_dora_activation_bytes_within_ten_percent():
    pytest.importorskip("peft")
    config, spec = tiny_config("llama"), LoraSpec(r=8, use_dora=True)
    measured = saved_bytes_per_token_layer(config, torch.bfloat16, "sdpa", 128, True, spec)
    shape = shape_from_config(config)
    expected = layer_activation_bytes(shape, 128, 2, KERNELS["sdpa"], spec)
    expected += layer_constant_bytes(shape, spec) / (2 * 128)
    assert abs(expected - measured) / measured < 0.10


def test_lora_adapter_count_equals_peft():
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    for spec, targets in (
        (LoraSpec(r=4), "all-linear"),
        (LoraSpec(r=2, target_modules=("q_proj", "down_proj")), ["q_proj", "down_proj"]),
        (LoraSpec(r=4, use_dora=True), "all-linear"),
    ):
        model = peft.get_peft_model(
            AutoModelForCausalLM.from_config(config),
            peft.LoraConfig(r=spec.r, target_modules=targets, use_dora=spec.use_dora),
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert spec.params(shape_from_config(config)) == trainable


# ---- run settings, sharding, the micro-batch search ---------------------------------------


def config_for(name: str, **sections) -> dict:
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true"},
        "model": {
            "model": name,
            "loss": {"class_path": "treg_lightning.losses.SimPOLoss"},
            "torch_dtype": "float32",
            "attn_implementation": "sdpa",
            "logp_chunk_size": 64,
        },
        "data": {"max_length": 128, "batch_size": 2, "rewards": "none"},
    }
    for name, values in sections.items():
        config[name].update(values)
    return config


LLAMA = "meta-llama/Meta-Llama-3-8B-Instruct"


def parts_of(config, **kwargs) -> dict:
    plan = plan_from_config(config, gpu_memory="1TB", **kwargs)
    return {p.name: p.bytes for p in plan.estimate.parts}, plan


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache with nothing in it, and no network: shipped shapes only."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_fsdp2_shards_weights_gradients_and_states(empty_hub_cache):
    params = SHIPPED_SHAPES[LLAMA].num_params()
    strategy = {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 8, "tensor_parallel_size": 1},
    }
    parts, _ = parts_of(config_for(LLAMA, trainer={"devices": 8, "strategy": strategy}))
    assert parts["weights"] == params * 4 / 8
    assert parts["gradients"] == params * 4 / 8
    assert parts["optimizer states"] == 2 * params * 4 / 8
    assert "FSDP all-gather buffers" in parts
    # --plan.devices 4 on the command line re-derives the data-parallel size of an explicit 8.
    with pytest.raises(PlanError, match="data_parallel_size 8"):
        plan_from_config(config_for(LLAMA, trainer={"devices": 4, "strategy": strategy}))
    strategy["init_args"]["data_parallel_size"] = "auto"
    parts, _ = parts_of(config_for(LLAMA, trainer={"strategy": strategy}), devices=4)
    assert parts["weights"] == params * 4 / 4
    offload = config_for(
        LLAMA,
        trainer={
            "devices": 8,
            "strategy": {
                **strategy,
                "init_args": {"data_parallel_size": 8, "tensor_parallel_size": 1},
            },
        },
        model={"fsdp_cpu_offload": True},
    )
    parts, plan = parts_of(offload)
    assert parts["weights"] == parts["gradients"] == parts["optimizer states"] == 0
    assert {p.name: p.bytes for p in plan.estimate.host}["optimizer states"] == 2 * params * 4 / 8


def test_fsdp2_accumulation_holds_the_unsynced_gradients(empty_hub_cache):
    """With one gradient sync per optimizer step, FSDP2 keeps every trainable parameter's
    gradient unsharded in float32 between syncs: 8.03e9 parameters x 4 bytes, whatever the
    number of devices; nothing when it syncs every micro-batch, with one micro-batch per
    step, or under DDP (its no-sync holds the gradients it holds anyway)."""
    params = SHIPPED_SHAPES[LLAMA].num_params()
    fsdp2 = {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 8, "tensor_parallel_size": 1},
    }
    trainer = {"devices": 8, "strategy": fsdp2, "accumulate_grad_batches": 8}
    parts, plan = parts_of(config_for(LLAMA, trainer=trainer))
    assert parts["unsynced gradients"] == params * 4
    assert plan.estimate.peak >= params * 4 + parts["weights"] + parts["optimizer states"]
    every = config_for(LLAMA, trainer=trainer, model={"fsdp_sync_every_micro_batch": True})
    assert "unsynced gradients" not in parts_of(every)[0]
    once = config_for(LLAMA, trainer={**trainer, "accumulate_grad_batches": 1})
    assert "unsynced gradients" not in parts_of(once)[0]
    ddp = {**trainer, "strategy": {"class_path": "lightning.pytorch.strategies.DDPStrategy"}}
    assert "unsynced gradients" not in parts_of(config_for(LLAMA, trainer=ddp))[0]


def test_log_prob_block_counts_the_head_gradient_in_the_compute_dtype():
    """The chunked log-prob backward (forward/logprobs.py) writes the head's weight gradient
    slice by slice in the weight's dtype: vocab x hidden x 2 bytes in bfloat16, no float32
    accumulator. Shape: vocab 1000, hidden 64, 2 pairs x 2 sides x 127 scored tokens (max
    length 128, the worst case) = 508; the backward's peak is that gradient + the hidden
    states' float32 gradient + one float32 block of chunk x vocab values and its bf16 operand
    copy."""
    from dataclasses import replace

    from treg_lightning.plan.estimate import logits_bytes, tokens

    shape = replace(SHIPPED_SHAPES[LLAMA], vocab_size=1000, hidden_size=64)
    settings = plan_from_config(config_for(LLAMA), gpu_memory="1TB").estimate.settings
    settings = replace(settings, compute_dtype="bfloat16", logp_chunk_size=64)
    assert tokens(settings, 2) == (512, 508)
    scored = 508
    saved, transient = logits_bytes(settings, shape, 2)
    assert saved == scored * 64 * 2
    backward = 1000 * 64 * 2 + scored * 64 * 4 + 64 * 1000 * (4 + 2)
    assert transient == max(64 * 1000 * 8, backward, 1000 * 64 * 2 + scored * 64 * 6)


def test_ddp_replicates_and_fsdp1_shard_grad_op_keeps_weights(empty_hub_cache):
    params = SHIPPED_SHAPES[LLAMA].num_params()
    ddp = {"class_path": "lightning.pytorch.strategies.DDPStrategy"}
    parts, _ = parts_of(config_for(LLAMA, trainer={"devices": 8, "strategy": ddp}))
    assert parts["weights"] == parts["gradients"] == params * 4
    assert parts["DDP gradient buckets"] == params * 4  # gradient_as_bucket_view: false
    ddp["init_args"] = {"gradient_as_bucket_view": True}
    parts, _ = parts_of(config_for(LLAMA, trainer={"devices": 8, "strategy": ddp}))
    assert "DDP gradient buckets" not in parts
    fsdp1 = {
        "class_path": "lightning.pytorch.strategies.FSDPStrategy",
        "init_args": {"sharding_strategy": "SHARD_GRAD_OP"},
    }
    parts, _ = parts_of(config_for(LLAMA, trainer={"devices": 8, "strategy": fsdp1}))
    assert parts["weights"] == params * 4 and parts["gradients"] == params * 4 / 8


def test_reference_live_cached_and_lora(empty_hub_cache):
    params = SHIPPED_SHAPES[LLAMA].num_params()
    dpo = {"loss": {"class_path": "treg_lightning.losses.DPOLoss"}}
    parts, _ = parts_of(config_for(LLAMA, model={**dpo, "live_reference": True}))
    assert parts["reference"] == params * 4
    contrastive = {"class_path": "treg_lightning.rewards.ContrastiveRewards", "init_args": {}}
    cached = config_for(LLAMA, model=dpo, data={"rewards": contrastive})
    parts, plan = parts_of(cached)
    assert not plan.estimate.settings.live_reference  # auto: the annotate pass caches them
    assert parts["reference"] == 2 * 2 * 128 * 4  # [batch, seq] float32, chosen and rejected
    lora = {"peft": {"class_path": "peft.LoraConfig", "init_args": {"r": 16}}}
    parts, plan = parts_of(config_for(LLAMA, model={**dpo, **lora, "live_reference": True}))
    adapters = LoraSpec(r=16).params(SHIPPED_SHAPES[LLAMA])
    assert parts["reference"] == 0  # adapters off: no second copy
    assert parts["weights"] == params * 4 + adapters * 4
    assert parts["gradients"] == adapters * 4 and parts["optimizer states"] == 2 * adapters * 4


def test_checkpointing_keeps_one_input_per_layer(empty_hub_cache):
    shape = SHIPPED_SHAPES[LLAMA]
    tokens = 2 * 2 * 128
    per_layer = layer_activation_bytes(shape, 128, 4, KERNELS["sdpa"])
    off, plan_off = parts_of(config_for(LLAMA))
    on, plan_on = parts_of(config_for(LLAMA, model={"gradient_checkpointing": True}))
    assert off["activations"] - on["activations"] == (
        shape.num_layers * tokens * per_layer - shape.num_layers * tokens * 4 * 4096
    )
    # The layer being recomputed in the backward pass holds its activations meanwhile.
    assert on["layer backward"] - off["layer backward"] == tokens * per_layer
    assert plan_off.estimate.activations_checkpointed == on["activations"]


def test_max_micro_batch_is_the_largest_that_fits(empty_hub_cache):
    config = config_for(
        LLAMA,
        trainer={
            "devices": 8,
            "strategy": {
                "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                "init_args": {"data_parallel_size": 8, "tensor_parallel_size": 1},
            },
        },
        model={"gradient_checkpointing": True},
        data={"max_length": 2048},
    )
    shape = resolve_shape(LLAMA)
    settings = settings_from_config(config, shape.model_type)
    peaks = [estimate(settings, shape, None, batch).peak for batch in range(1, 80)]
    assert peaks == sorted(peaks)  # the search relies on the peak growing with the batch
    for budget in [gib * 2**30 for gib in range(18, 120, 3)]:
        brute = sum(1 for peak in peaks if peak <= budget)
        assert max_micro_batch(settings, shape, budget) == brute
    assert max_micro_batch(settings, shape, 1e9) == 0


# ---- offline shapes -----------------------------------------------------------------------


def test_hf_cache_config_preferred_over_shipped_shape(empty_hub_cache):
    snapshot = empty_hub_cache / "models--meta-llama--Meta-Llama-3-8B-Instruct" / "snapshots"
    (snapshot / "abc").mkdir(parents=True)
    (empty_hub_cache / "models--meta-llama--Meta-Llama-3-8B-Instruct" / "refs").mkdir()
    (empty_hub_cache / "models--meta-llama--Meta-Llama-3-8B-Instruct" / "refs" / "main").write_text(
        "abc"
    )
    config = tiny_config("llama").to_dict()
    (snapshot / "abc" / "config.json").write_text(json.dumps(config))
    shape = resolve_shape(LLAMA)
    assert shape.hidden_size == 64 and "HF cache" in shape.source


def test_unknown_hub_id_offline_is_a_clear_error(empty_hub_cache):
    with pytest.raises(PlanError, match="Pass a local folder"):
        resolve_shape("someone/unknown-model")
    assert resolve_shape(LLAMA).source == "shipped shape"
    assert resolve_shape("google/gemma-2-9b-it").final_logit_softcapping == 30.0


def test_parse_size():
    assert parse_size("80GB") == 80e9
    assert parse_size("79.6GiB") == 79.6 * 2**30
    assert parse_size("81559MiB") == 81559 * 2**20
    with pytest.raises(PlanError, match="80GB"):
        parse_size("80")


# ---- the CLI ------------------------------------------------------------------------------


@pytest.fixture
def no_weights(monkeypatch, empty_hub_cache):
    """`treg plan` must not load weights nor convert the SmolLM2 GGUF."""
    import transformers

    import treg_lightning.models.loading as models

    def refuse(*args, **kwargs):
        raise AssertionError("treg plan loaded model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)
    monkeypatch.setattr(models, "ensure_smollm2", refuse)
    monkeypatch.setattr(models, "load_causal_lm", refuse)


def run_cli(args: list[str]) -> None:
    from treg_lightning.cli.main import cli_main

    with mock.patch.object(sys, "argv", ["treg"]):
        cli_main(args)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_treg_plan_runs_on_every_shipped_config(config, no_weights, capsys):
    run_cli(["plan", "--config", str(config)])
    out = capsys.readouterr().out
    assert "treg plan:" in out and "weights" in out and "largest micro-batch" in out


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda p: p.stem)
def test_treg_plan_composes_strategy_configs(strategy, no_weights, capsys):
    run_cli(
        [
            "plan",
            "--config",
            str(ROOT / "configs/llama3_dpo_treg.yaml"),
            "--config",
            str(strategy),
            "--plan.devices",
            "8",
            "--plan.gpu_memory",
            "80GB",
        ]
    )
    out = capsys.readouterr().out
    assert {"ddp": "DDPStrategy", "fsdp1": "FSDPStrategy", "fsdp2": "FSDP2"}[strategy.stem] in out


def test_treg_plan_overrides_and_suggestions(no_weights, capsys):
    args = [
        "plan",
        "--config",
        str(ROOT / "configs/llama3_simpo_treg.yaml"),
        "--plan.devices=2",
        "--plan.gpu_memory=40GB",
        "--data.batch_size",
        "4",
        "--model.gradient_checkpointing",
        "false",
    ]
    run_cli(args)
    out = capsys.readouterr().out
    assert "micro-batch 4 pairs" in out and "does NOT fit" in out
    assert "activation checkpointing" in out and "--model.gradient_checkpointing true" in out
    assert "devices with FSDP2" in out and "micro-batch" in out


def test_treg_plan_unknown_model_exits_2(no_weights, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            [
                "plan",
                "--config",
                str(ROOT / "configs/demo.yaml"),
                "--model.model",
                "someone/unknown-model",
            ]
        )
    assert exit_info.value.code == 2
    assert "Pass a local folder" in capsys.readouterr().err


def test_fit_logs_the_plan(tiny_model_dir, tmp_path, caplog):
    import logging

    from treg_lightning.cli.main import TRegCLI

    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No."}) + "\n"
            for i in range(4)
        )
    )
    args = [
        "fit",
        f"--model.model={tiny_model_dir}",
        f"--data.source={data}",
        "--data.rewards=null",
        "--model.regularizer.alpha=0",  # plain loss: no token rewards in the data
        "--data.max_length=32",
        "--data.max_prompt_length=16",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=1",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    with caplog.at_level(logging.INFO), mock.patch.object(sys, "argv", ["treg"]):
        TRegCLI(args=args)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "memory plan (treg plan), per device" in logged and "weights" in logged
    assert format_plan  # the same table as `treg plan` prints


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--plan.devices", "0"],
            "error: --plan.devices 0: the number of devices per node must be >= 1.",
        ),
        (
            ["--plan.devices", "-1"],
            "error: --plan.devices -1: the number of devices per node must be >= 1.",
        ),
        (
            ["--plan.num_nodes", "0"],
            "error: --plan.num_nodes 0: the number of machines must be >= 1.",
        ),
        (["--trainer.devices", "0"], "error: trainer.devices '0': a run needs at least one device"),
        (["--trainer.num_nodes", "0"], "error: trainer.num_nodes 0: the number of machines"),
        (
            ["--model.peft", "peft.LoraConfig", "--model.peft.r", "0"],
            "error: model.peft r 0: the LoRA rank must be >= 1",
        ),
        (
            ["--plan.gpu_memory", "1GB"],
            "error: --plan.gpu_memory 1GB leaves nothing after --plan.reserve 1GiB",
        ),
    ],
    ids=[
        "devices-0",
        "devices-minus-1",
        "num-nodes-0",
        "trainer-devices-0",
        "trainer-nodes-0",
        "lora-r-0",
        "memory-below-reserve",
    ],  # fmt: skip
)
def test_treg_plan_refuses_counts_a_run_cannot_have(extra, message, no_weights, capsys):
    """Out-of-range counts end the plan at once with `error:` and status 2 (no "-111 GiB
    fits", no ZeroDivisionError); a count is refused before the model's config is looked up."""
    from treg_lightning.plan import report

    lookup = (
        report.resolve_shape if extra[0] == "--plan.gpu_memory" else mock.Mock(side_effect=OSError)
    )
    with mock.patch.object(report, "resolve_shape", lookup), pytest.raises(SystemExit) as exit_info:
        run_cli(["plan", "--config", str(ROOT / "configs/demo.yaml"), *extra])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(message), captured.err
    assert "GiB" not in captured.out  # no plan printed


def test_treg_plan_errors_start_with_error(no_weights, capsys):
    with pytest.raises(SystemExit):
        run_cli(["plan", "--config", str(ROOT / "configs/demo.yaml"), "--model.model", "x/y"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "Pass a local" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ")
