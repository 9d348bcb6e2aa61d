"""Every shipped config parses (`--print_config`) without network access, and the paper configs
carry the hyperparameters of docs/method.md section 4."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from treg_lightning.cli.main import cli_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# Configs of `treg pairs` hold its own settings; tests/answers/test_pairs_build.py parses them.
PAIRS_CONFIGS = {"onpolicy_demo.yaml"}
RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in PAIRS_CONFIGS)
STRATEGY_CONFIGS = sorted((CONFIGS / "strategy").glob("*.yaml"))


def print_config(*args: str, subcommand: str = "fit") -> dict:
    """`treg SUBCOMMAND ARGS --print_config` -> the printed config as a dict."""
    out = io.StringIO()
    with (
        mock.patch.object(sys, "argv", ["treg"]),
        contextlib.redirect_stdout(out),
        pytest.raises(SystemExit) as exit_info,
    ):
        cli_main([subcommand, *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Parsing must not touch the hub: any download attempt fails loudly.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_configs_exist():
    names = {p.name for p in RUN_CONFIGS}
    assert {
        "demo.yaml",
        "demo_lora.yaml",
        "llama3_simpo_treg.yaml",
        "llama3_dpo_treg.yaml",
        "llama3_ipo_treg.yaml",
        "gemma2_simpo_treg.yaml",
    } <= names
    assert {p.name for p in STRATEGY_CONFIGS} == {"ddp.yaml", "fsdp1.yaml", "fsdp2.yaml"}


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("subcommand", ["fit", "annotate"])
def test_run_config_parses(config, subcommand):
    printed = print_config("--config", str(config), subcommand=subcommand)
    assert printed["model"]["model"]
    assert "tokenizer" not in printed["data"]  # a link target: always model.model


@pytest.mark.parametrize("strategy", STRATEGY_CONFIGS, ids=lambda p: p.name)
def test_strategy_config_composes(strategy):
    printed = print_config("--config", str(CONFIGS / "demo.yaml"), "--config", str(strategy))
    assert printed["trainer"]["strategy"]["class_path"].startswith("lightning.pytorch.strategies")


def test_fsdp1_wrap_policy_instantiates():
    import torch
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision

    from treg_lightning.models.parallel import DecoderLayerWrapPolicy

    strategy = yaml.safe_load((CONFIGS / "strategy" / "fsdp1.yaml").read_text())["trainer"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    init = parser.instantiate(parser.parse_object({"strategy": strategy["strategy"]}))
    policy = init.strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, DecoderLayerWrapPolicy)
    checkpointing = init.strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert isinstance(checkpointing, DecoderLayerWrapPolicy)
    # bf16 compute over fp32 masters, fp32 gradient reduction, the batch's floats left fp32
    # (Lightning's bf16-mixed alone gives bf16 for all three).
    assert init.strategy.mixed_precision_config == MixedPrecision(
        param_dtype=torch.bfloat16,
        reduce_dtype=torch.float32,
        buffer_dtype=torch.float32,
        cast_root_forward_inputs=False,
    )
    assert strategy["precision"] == "bf16-mixed"


PAPER = {
    # config: (model, dataset, loss class, loss args, lr)
    "llama3_simpo_treg.yaml": (
        "meta-llama/Meta-Llama-3-8B-Instruct",
        "princeton-nlp/llama3-ultrafeedback-armorm",
        "SimPOLoss",
        {"beta": 10.0, "gamma_beta_ratio": 0.3},
        1e-6,
    ),
    "llama3_dpo_treg.yaml": (
        "meta-llama/Meta-Llama-3-8B-Instruct",
        "princeton-nlp/llama3-ultrafeedback-armorm",
        "DPOLoss",
        {"beta": 0.01},
        5e-7,
    ),
    "llama3_ipo_treg.yaml": (
        "meta-llama/Meta-Llama-3-8B-Instruct",
        "princeton-nlp/llama3-ultrafeedback-armorm",
        "IPOLoss",
        {"tau": 0.1},
        5e-7,
    ),
    "gemma2_simpo_treg.yaml": (
        "google/gemma-2-9b-it",
        "princeton-nlp/gemma2-ultrafeedback-armorm",
        "SimPOLoss",
        {"beta": 10.0, "gamma_beta_ratio": 0.5},
        8e-7,
    ),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_hyperparameters(name):
    model, dataset, loss, loss_args, lr = PAPER[name]
    c = print_config("--config", str(CONFIGS / name))
    trainer, m, data = c["trainer"], c["model"], c["data"]
    assert c["seed_everything"] == 42
    assert m["model"] == model and data["source"] == dataset
    assert m["loss"]["class_path"].endswith(loss)
    assert {k: m["loss"]["init_args"][k] for k in loss_args} == loss_args
    assert m["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert m["optimizer"]["init_args"]["lr"] == pytest.approx(lr)
    assert m["scheduler"]["class_path"].endswith("WarmupCosineLR")
    assert m["scheduler"]["init_args"]["warmup_ratio"] == 0.1
    assert m["regularizer"]["init_args"]["alpha"] in (0.1, 0.25, 0.5)
    # effective batch 128 = 2 per device x 8 accumulation x 8 GPUs, 1 epoch, FSDP2
    assert data["batch_size"] * trainer["accumulate_grad_batches"] * trainer["devices"] == 128
    assert trainer["max_epochs"] == 1
    assert trainer["strategy"]["class_path"].endswith("ModelParallelStrategy")
    # data_parallel_size is left to follow devices x num_nodes (tests/cli/test_user_errors.py)
    assert trainer["strategy"]["init_args"]["data_parallel_size"] == "auto"
    assert trainer["strategy"]["init_args"]["tensor_parallel_size"] == 1
    assert m["fsdp_param_dtype"] == "bfloat16"
    assert (data["max_length"], data["max_prompt_length"]) == (2048, 1800)
    if name.startswith("gemma2"):
        # Gemma-2: soft-capping from the config (auto) and never sdpa attention.
        assert m["softcap"] is None and m["attn_implementation"] in (None, "eager")


def test_demo_config_is_cpu_sized():
    c = print_config("--config", str(CONFIGS / "demo.yaml"))
    assert c["trainer"]["accelerator"] == "cpu"
    assert c["model"]["model"] == "smollm2" and c["model"]["torch_dtype"] == "float32"
    assert c["data"]["source"] == "demo" and c["data"]["max_length"] <= 256
    # 40 pairs and 15 steps, then the answers to 10 prompts, took 2 min 15 s with `time make demo`
    # on 2 CPU cores (docs/quickstart.md); the budget of `make demo` is 5 minutes, so the demo
    # stays within these bounds.
    assert c["trainer"]["max_steps"] <= 20 and c["data"]["limit"] <= 48


def _differences(a, b, path=""):
    """Dotted keys where two parsed configs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return sorted(d for k in keys for d in _differences(a.get(k), b.get(k), f"{path}{k}."))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return sorted(d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, path))
    return [] if a == b else [path.rstrip(".")]


def test_demo_lora_is_the_demo_with_adapters():
    """demo_lora.yaml is demo.yaml plus the adapters, their learning rate and its own output
    folder: the side-by-side run in docs/lora.md compares LoRA with full training, nothing else."""
    full = print_config("--config", str(CONFIGS / "demo.yaml"))
    lora = print_config("--config", str(CONFIGS / "demo_lora.yaml"))
    differences = _differences(full, lora)
    assert [d for d in differences if not d.startswith("model.peft")] == [
        "model.optimizer.init_args.lr",
        "trainer.default_root_dir",
        "trainer.logger.init_args.save_dir",
    ]
    peft = lora["model"]["peft"]
    assert peft["class_path"] == "peft.LoraConfig"
    assert {k: peft["init_args"][k] for k in ("r", "lora_alpha", "target_modules")} == {
        "r": 16,
        "lora_alpha": 32,
        "target_modules": "all-linear",
    }
    assert lora["model"]["optimizer"]["init_args"]["lr"] == pytest.approx(2e-4)
