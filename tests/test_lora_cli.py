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

from treg_lightning.cli import TRegCLI, cli_main  # noqa: E402

LORA_ARGS = [
    "--model.peft=peft.LoraConfig",
    "--model.peft.r=4",
    "--model.peft.lora_alpha=8",
    "--model.peft.target_modules=[q_proj,v_proj]",
]


def write_pairs(path: Path, n: int = 8) -> Path:
    with path.open("w") as f:
        for i in range(n):
            row = {"prompt": f"Add {i} and {i}.", "chosen": f"{2 * i}.", "rejected": "No" * (i + 1)}
            f.write(json.dumps(row) + "\n")
    return path


def base_args(model_dir: Path, root: Path) -> list[str]:
    return [
        f"--model.model={model_dir}",
        "--model.loss=treg_lightning.losses.DPOLoss",
        "--model.loss.beta=0.5",
        "--model.regularizer.alpha=0.5",
        "--model.optimizer=torch.optim.AdamW",
        "--model.optimizer.lr=0.02",
        f"--data.source={write_pairs(root / 'pairs.jsonl')}",
        "--data.max_length=48",
        "--data.max_prompt_length=24",
        "--data.batch_size=2",
        "--data.rewards=treg_lightning.rewards.ContrastiveRewards",
        f"--data.rewards.cache_dir={root / 'cache'}",
        "--data.rewards.progress=false",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={root / 'run'}",
        "--seed_everything=0",
    ]


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
        ["export", *args, f"--ckpt_path={ckpt}", f"--output_dir={merged}"], capsys
    )
    assert status == 0, err
    assert f"policy written to {merged.resolve()}" in out
    export = ["export", *args, f"--ckpt_path={ckpt}", f"--output_dir={adapter}"]
    status, err, out = treg([*export, "--adapter_only=true"], capsys)
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
    from treg_lightning.checkpoints import check_checkpoint_fits
    from treg_lightning.errors import CheckpointError
    from treg_lightning.module import PreferenceModule

    with pytest.raises(CheckpointError, match="holds LoRA adapters but model.peft is not set"):
        check_checkpoint_fits(ckpt, PreferenceModule(str(tiny_model_dir)))
    other_rank = PreferenceModule(str(tiny_model_dir), peft=peft.LoraConfig(r=8))
    with pytest.raises(CheckpointError, match=r"has shape \[4, 32\] in the checkpoint"):
        check_checkpoint_fits(ckpt, other_rank)


REACHED = AssertionError("reached a model load that the refusal should have preceded")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param(
            [*LORA_ARGS, "--model.quantization=treg_lightning.adapters.QLoRA"],
            "QLoRA (a 4-bit base model through bitsandbytes) needs a CUDA device; this run is "
            "on 'cpu'. Train plain LoRA instead",
            id="qlora_on_cpu",
        ),
        pytest.param(
            ["--model.quantization=treg_lightning.adapters.QLoRA"],
            "model.quantization loads the base model in 4 bits, which cannot be trained itself",
            id="qlora_without_adapters",
        ),
    ],
)
def test_qlora_refused_before_loading(tiny_model_dir, tmp_path, capsys, extra, expected):
    with (
        mock.patch("treg_lightning.models.load_causal_lm", side_effect=REACHED),
        mock.patch("treg_lightning.rewards.contrastive.load_causal_lm", side_effect=REACHED),
        mock.patch("transformers.AutoModelForCausalLM.from_pretrained", side_effect=REACHED),
    ):
        status, err, _ = treg(["fit", *base_args(tiny_model_dir, tmp_path), *extra], capsys)
    assert status == 2, err
    assert "Traceback" not in err
    assert err[err.rindex("error: ") :].removeprefix("error: ").startswith(expected)
    assert not (tmp_path / "cache").exists()  # the annotate pass did not start
