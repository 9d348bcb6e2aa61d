"""`treg` with LoRA: fit with model.peft, export merged and adapter-only from the checkpoint,
checkpoints checked against the adapters at start-up, QLoRA refused on CPU before any load."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

peft = pytest.importorskip("peft", reason="LoRA tests need peft (the `lora`/`dev` extra)")

from builders import annotate_args, no_model_load, tiny_fit_args, write_pairs  # noqa: E402
from treg_lightning.cli.main import TRegCLI, cli_main  # noqa: E402

LORA_ARGS = [
    "--model.peft=peft.LoraConfig",
    "--model.peft.r=4",
    "--model.peft.lora_alpha=8",
    "--model.peft.target_modules=[q_proj,v_proj]",
]


def base_args(model_dir: Path, root: Path) -> list[str]:
    """DPO and T-REG on contrastive token rewards, 2 steps at lr 0.02."""
    return tiny_fit_args(
        model_dir,
        write_pairs(root / "pairs.jsonl"),
        root / "run",
        "--model.loss.beta=0.5",
        *annotate_args(root),
        "--data.rewards.progress=false",
        loss="treg_lightning.losses.DPOLoss",
        alpha=0.5,
        lr=0.02,
        rewards=None,
        max_steps=2,
    )


def treg(args: list[str], capsys) -> tuple[int | None, str, str]:
    """`treg ARGS` in-process: (exit status, stderr, stdout)."""
    status = 0
    with mock.patch.object(sys, "argv", ["treg"]):
        try:
            cli_main(args)
        except SystemExit as exit_:
            status = exit_.code
    captured = capsys.readouterr()
    return status, captured.err, captured.out


def test_fit_and_export_merged_and_adapter_only(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    args = base_args(tiny_model_dir, tmp_path)
    with mock.patch.object(sys, "argv", ["treg"]):
        fit = TRegCLI(args=["fit", *args, *LORA_ARGS])
    policy = fit.model.policy.eval()
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 2 * 2  # q_proj, v_proj x 2 layers x (A, B)
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert set(state) == {f"policy.{n}" for n in trainable}

    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    # The run's settings (model.peft included) come from the checkpoint.
    status, err, out = treg(
        ["export", *args, f"--ckpt_path={ckpt}", f"--output.path={merged}"], capsys
    )
    assert status == 0, err
    assert f"policy written to {merged.resolve()}" in out
    export = ["export", *args, f"--ckpt_path={ckpt}", f"--output.path={adapter}"]
    status, err, out = treg([*export, "--export.adapter_only=true"], capsys)
    assert status == 0, err
    assert f"LoRA adapter written to {adapter.resolve()}" in out
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        live = policy(input_ids=ids).logits
        exported = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        with_adapter = peft.PeftModel.from_pretrained(base, adapter)(input_ids=ids).logits
    torch.testing.assert_close(exported, live, atol=1e-5, rtol=0)
    assert torch.equal(with_adapter, live)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4

    # A plain (non-LoRA) module and this checkpoint: refused at start-up, naming the cause.
    from treg_lightning.errors import CheckpointError
    from treg_lightning.models.checkpoints import check_checkpoint_fits
    from treg_lightning.module import PreferenceModule

    with pytest.raises(CheckpointError, match="holds LoRA adapters but model.peft is not set"):
        check_checkpoint_fits(ckpt, PreferenceModule(str(tiny_model_dir)))
    other_rank = PreferenceModule(str(tiny_model_dir), peft=peft.LoraConfig(r=8))
    with pytest.raises(CheckpointError, match=r"has shape \[4, 32\] in the checkpoint"):
        check_checkpoint_fits(ckpt, other_rank)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param(
            [*LORA_ARGS, "--model.quantization=treg_lightning.models.adapters.QLoRA"],
            "QLoRA (a 4-bit base model through bitsandbytes) needs a CUDA device; this run is "
            "on 'cpu'. Train plain LoRA instead",
            id="qlora_on_cpu",
        ),
        pytest.param(
            ["--model.quantization=treg_lightning.models.adapters.QLoRA"],
            "model.quantization loads the base model in 4 bits, which cannot be trained itself",
            id="qlora_without_adapters",
        ),
    ],
)
def test_qlora_refused_before_loading(tiny_model_dir, tmp_path, capsys, extra, expected):
    with no_model_load("transformers.AutoModelForCausalLM.from_pretrained"):
        status, err, _ = treg(["fit", *base_args(tiny_model_dir, tmp_path), *extra], capsys)
    assert status == 2, err
    assert "Traceback" not in err
    assert err[err.rindex("error: ") :].removeprefix("error: ").startswith(expected)
    assert not (tmp_path / "cache").exists()  # the annotate pass did not start
