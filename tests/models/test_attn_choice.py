"""The automatic attention kernel follows the dtype each model computes in: flash-attention
(fp16 / bf16 only) never for float32 compute. "CUDA with flash-attn installed" is simulated
(CUDA device count, the flash-attn probe); every load stops at ``from_pretrained``, whose
arguments are recorded, so no weights load and no kernel runs."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from builders import byte_tokenizer, save_tiny_model, tiny_gemma2
from treg_lightning.errors import ConfigError
from treg_lightning.models.loading import choose_attn_implementation

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RUN_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "onpolicy_demo.yaml")
PAPER = {"llama3_dpo_treg.yaml", "llama3_ipo_treg.yaml", "llama3_simpo_treg.yaml",
         "gemma2_simpo_treg.yaml"}  # fmt: skip
STRATEGIES = [None, "ddp.yaml", "fsdp1.yaml", "fsdp2.yaml"]
DTYPES = ["float32", "bfloat16", "float16"]
FLASH = "flash_attention_2"


@pytest.mark.parametrize(
    ("device", "dtype", "installed", "model_type", "expected"),
    [
        ("cuda", "bfloat16", True, "llama", FLASH),
        ("cuda", "float16", True, "llama", FLASH),
        ("cuda", "float32", True, "llama", "sdpa"),
        ("cuda", "float32", True, "gemma2", "eager"),  # soft-capping: never sdpa
        ("cuda", "bfloat16", True, "gemma2", FLASH),
        ("cuda", "bfloat16", False, "llama", "sdpa"),
        ("cuda", "bfloat16", False, "gemma2", "eager"),
        ("cpu", "bfloat16", True, "llama", "sdpa"),
        ("cpu", "float32", False, "gemma2", "eager"),
    ],
)
def test_automatic_choice(device, dtype, installed, model_type, expected):
    with mock.patch("treg_lightning.models.loading.flash_attn_available", return_value=installed):
        assert choose_attn_implementation(None, device, model_type, dtype) == expected
        assert choose_attn_implementation("auto", device, model_type, dtype) == expected


def test_requested_flash_needs_half_compute():
    with mock.patch("treg_lightning.models.loading.flash_attn_available", return_value=True):
        assert choose_attn_implementation(FLASH, "cuda", "llama", torch.bfloat16) == FLASH
        with pytest.raises(ConfigError, match="float16 or bfloat16 only.*torch.float32"):
            choose_attn_implementation(FLASH, "cuda", "llama", "float32")
        assert choose_attn_implementation("sdpa", "cuda", "llama", "float32") == "sdpa"


class Loaded(Exception):
    """Raised by the stand-in ``from_pretrained`` once it has recorded its arguments."""


@contextlib.contextmanager
def cuda_with_flash():
    """8 CUDA devices and flash-attn, as far as Lightning and treg_lightning can tell; every
    causal-LM load records ``(attn_implementation, dtype)`` and raises :class:`Loaded`."""
    from transformers import AutoModelForCausalLM

    loads = []

    def record(*args, **kwargs):
        loads.append((kwargs.get("attn_implementation"), kwargs.get("dtype")))
        raise Loaded

    with (
        mock.patch.object(sys, "argv", ["treg"]),
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.device_count", return_value=8),
        mock.patch("treg_lightning.models.loading.flash_attn_available", return_value=True),
        mock.patch.object(AutoModelForCausalLM, "from_pretrained", side_effect=record),
    ):
        yield loads


def loaded_attention(loads, call) -> str:
    """The attention kernel of the one load ``call()`` makes."""
    before = len(loads)
    with pytest.raises(Loaded):
        call()
    assert len(loads) == before + 1
    return loads[-1][0]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny Llama and a tiny Gemma-2 folder (model_type decides eager vs sdpa)."""
    root = tmp_path_factory.mktemp("attn")
    tokenizer = byte_tokenizer()
    gemma = tiny_gemma2(len(tokenizer))
    gemma.save_pretrained(root / "gemma2")
    tokenizer.save_pretrained(root / "gemma2")
    return {
        "llama": save_tiny_model(root / "llama", tokenizer),
        "llama-negative": save_tiny_model(root / "llama-negative", tokenizer),
        "gemma2": root / "gemma2",
    }


def kernel(half: bool, config: str) -> str:
    return FLASH if half else ("eager" if config.startswith("gemma2") else "sdpa")


@pytest.mark.gpu_emulation
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s or "as-shipped")
@pytest.mark.parametrize("config", RUN_CONFIGS)
def test_run_config_attention_on_a_gpu_box(config, strategy, tiny_dirs, tmp_path):
    """Each run config with each strategy file on 8 simulated GPUs: the policy computes in
    bf16 under FSDP1 (bf16-mixed), FSDP2 (fsdp_param_dtype) and the paper configs as shipped
    (FSDP2), so it gets flash-attention; under DDP and the demo configs as shipped it computes
    in float32 (torch_dtype, 32-true), so it gets sdpa (eager for Gemma-2). The evaluator
    computes in its evaluator_dtype (bf16 in the paper configs, float32 in the demos); predict
    loads the policy outside training, in torch_dtype (float32 in every config)."""
    from treg_lightning.answers.predictions import PolicySource
    from treg_lightning.cli.main import TRegCLI
    from treg_lightning.rewards.source import AnnotationContext

    model_dir = tiny_dirs["gemma2" if config.startswith("gemma2") else "llama"]
    args = ["--config", str(CONFIGS / config)]
    if strategy is not None:
        args += ["--config", str(CONFIGS / "strategy" / strategy)]
    args += [f"--model.model={model_dir}", "--trainer.accelerator=gpu",
             f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    with cuda_with_flash() as loads:
        cli = TRegCLI(args=args, run=False)
        module, rewards = cli.model, cli.datamodule.rewards
        module.trainer = cli.trainer
        half = strategy in ("fsdp1.yaml", "fsdp2.yaml") or (strategy is None and config in PAPER)
        assert loaded_attention(loads, lambda: module.load_model(module.model_name)) == kernel(
            half, config
        )
        context = AnnotationContext(
            tokenizer=None, model_name=str(model_dir), device=torch.device("cuda"),
            trust_remote_code=False, settings={},
        )  # fmt: skip
        evaluator_half = config in PAPER
        assert rewards.evaluator_dtype == ("bfloat16" if evaluator_half else "float32")
        assert loaded_attention(loads, lambda: rewards.evaluator_model(context)) == kernel(
            evaluator_half, config
        )
        module.trainer = None  # predict: no training precision around generation
        assert loaded_attention(loads, PolicySource(module).load) == kernel(False, config)


@pytest.mark.gpu_emulation
def test_requested_flash_with_float32_compute_refused_at_startup(tiny_dirs, tmp_path):
    """--model.attn_implementation flash_attention_2 with DDP's float32 compute is refused by
    the start-up check (before the annotate pass and any model load); under FSDP1's bf16 it
    passes."""
    from treg_lightning.cli.main import TRegCLI

    def module_for(strategy):
        args = ["--config", str(CONFIGS / "llama3_simpo_treg.yaml"),
                "--config", str(CONFIGS / "strategy" / strategy),
                f"--model.model={tiny_dirs['llama']}", f"--model.attn_implementation={FLASH}",
                f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
        cli = TRegCLI(args=args, run=False)
        cli.model.trainer = cli.trainer
        return cli.model

    with cuda_with_flash():
        with pytest.raises(ConfigError, match="bf16-mixed"):
            module_for("ddp.yaml").check_inputs()
        module_for("fsdp1.yaml").check_inputs()


@pytest.mark.gpu_emulation
@pytest.mark.parametrize("dtype", DTYPES)
def test_evaluators_and_scorers_follow_their_dtype(dtype, tiny_dirs, tmp_path):
    """ContrastiveRewards (evaluator_dtype), ModelContrastRewards (dtype, both models) and the
    implicit-reward scorer of `treg pairs` (torch_dtype, policy and reference) on CUDA."""
    from treg_lightning.answers.scorers import ImplicitRewardScorer
    from treg_lightning.rewards import ContrastiveRewards, ModelContrastRewards
    from treg_lightning.rewards.source import AnnotationContext

    model_dir = str(tiny_dirs["llama"])
    expected = kernel(dtype != "float32", "llama")
    context = AnnotationContext(
        tokenizer=None, model_name=model_dir, device=torch.device("cuda"),
        trust_remote_code=False, settings={},
    )  # fmt: skip
    contrastive = ContrastiveRewards(evaluator_dtype=dtype, cache_dir=str(tmp_path))
    # Two folders: the same model twice is refused (every r_hat would be 0).
    negative = str(tiny_dirs["llama-negative"])
    contrast = ModelContrastRewards(negative=negative, dtype=dtype, cache_dir=str(tmp_path))
    scorer = ImplicitRewardScorer(model_dir, model_dir, torch_dtype=dtype)
    with cuda_with_flash() as loads:
        assert loaded_attention(loads, lambda: contrastive.evaluator_model(context)) == expected
        assert loaded_attention(loads, lambda: contrast.model("positive", context)) == expected
        assert loaded_attention(loads, lambda: scorer.setup(torch.device("cuda"))) == expected
    assert {dtype_ for _, dtype_ in loads} == {getattr(torch, dtype)}


@pytest.mark.gpu_emulation
def test_onpolicy_demo_scorer_and_policy(tiny_dirs):
    """configs/onpolicy_demo.yaml on a GPU box: its implicit-reward scorer and the sampling
    policy both compute in float32 (torch_dtype): sdpa, not flash-attention."""
    from jsonargparse import ArgumentParser

    from treg_lightning.answers.predictions import PolicySource
    from treg_lightning.answers.scorers import Scorer
    from treg_lightning.module import PreferenceModule

    config = yaml.safe_load((CONFIGS / "onpolicy_demo.yaml").read_text())
    scorer_config = config["scorer"]
    model_dir = str(tiny_dirs["llama"])
    scorer_config["init_args"].update(policy=model_dir, reference=model_dir)
    parser = ArgumentParser()
    parser.add_argument("--scorer", type=Scorer)
    scorer = parser.instantiate(parser.parse_object({"scorer": scorer_config})).scorer
    module = PreferenceModule(model_dir, torch_dtype=config["model"]["torch_dtype"])
    with cuda_with_flash() as loads:
        assert loaded_attention(loads, lambda: scorer.setup(torch.device("cuda"))) == "sdpa"
        assert loaded_attention(loads, PolicySource(module).load) == "sdpa"


def _merged(*names: str) -> dict:
    """The YAML files merged as ``--config a --config b`` merges them (later keys win)."""

    def merge(base: dict, update: dict) -> dict:
        out = dict(base)
        for key, value in update.items():
            both = isinstance(value, dict) and isinstance(base.get(key), dict)
            out[key] = merge(base[key], value) if both else value
        return out

    config: dict = {}
    for name in names:
        config = merge(config, yaml.safe_load((CONFIGS / name).read_text()))
    return config


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        (None, FLASH),
        ("strategy/fsdp1.yaml", FLASH),
        ("strategy/fsdp2.yaml", FLASH),
        ("strategy/ddp.yaml", "sdpa"),
    ],  # fmt: skip
)
def test_plan_reports_the_attention_of_the_compute_dtype(strategy, expected):
    """`treg plan` on a GPU box with flash-attn plans the kernel the run will pick."""
    from treg_lightning.plan.settings import settings_from_config

    names = ["llama3_simpo_treg.yaml", *([strategy] if strategy else [])]
    with mock.patch("treg_lightning.models.loading.flash_attn_available", return_value=True):
        settings = settings_from_config(_merged(*names), "llama")
    assert settings.attn_implementation == expected
    if expected == "sdpa":
        assert settings.compute_dtype == "float32"
        assert "float32" in settings.attn_note
