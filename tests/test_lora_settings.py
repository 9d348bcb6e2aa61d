"""LoRA settings peft would reject only after the model loaded (r: 0, lora_dropout out of
[0, 1), unknown target modules) and AdaLoRA (its rank allocation is not run by our loop): each
refused at start-up with `error:` and exit 2, before any weights load or a step trains."""

from __future__ import annotations

import pytest

from builders import refused_before_training, tiny_fit_args, write_pairs

pytest.importorskip("peft", reason="LoRA tests need peft (the `lora`/`dev` extra)")


def refused(model_dir, root, capsys, *peft: str) -> str:
    data = write_pairs(root / "pairs.jsonl", n=4)
    args = ["fit", *tiny_fit_args(model_dir, data, root, *peft)]
    err = refused_before_training(args, capsys)
    assert not (root / "lightning_logs").exists()
    return err.strip().splitlines()[-1]


LORA = ("--model.peft=peft.LoraConfig",)


def test_rank_zero(tiny_model_dir, tmp_path, capsys):
    message = refused(tiny_model_dir, tmp_path, capsys, *LORA, "--model.peft.r=0")
    assert message == (
        "error: model.peft.r must be a positive integer (the adapters' rank, e.g. 8), got 0."
    )


@pytest.mark.parametrize("dropout", ["1.0", "1.5", "-0.1"])
def test_dropout_out_of_range(dropout, tiny_model_dir, tmp_path, capsys):
    extra = f"--model.peft.lora_dropout={dropout}"
    message = refused(tiny_model_dir, tmp_path, capsys, *LORA, extra)
    assert message == (
        "error: model.peft.lora_dropout must be in [0, 1) (the share of the adapters' inputs "
        f"dropped, e.g. 0.05), got {float(dropout)}."
    )


LINEAR = "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"


def test_unknown_target_module_beside_a_known_one(tiny_model_dir, tmp_path, capsys):
    """peft itself accepts it (one target matched) and puts no adapter on the other."""
    extra = "--model.peft.target_modules=[q_proj,qkv_proj]"
    message = refused(tiny_model_dir, tmp_path, capsys, *LORA, extra)
    assert message == (
        f"error: model.peft.target_modules names ['qkv_proj'], which {tiny_model_dir} has no "
        "layer of (peft would put no adapter there, without a word). Its linear layers are "
        f"named {LINEAR} (or use target_modules: all-linear)."
    )


def test_only_unknown_target_modules(tiny_model_dir, tmp_path, capsys):
    extra = "--model.peft.target_modules=[qkv_proj]"
    message = refused(tiny_model_dir, tmp_path, capsys, *LORA, extra)
    assert message.startswith("error: peft.LoraConfig(target_modules=")
    assert "not found in the base model" in message and LINEAR in message


def test_adalora_is_refused(tiny_model_dir, tmp_path, capsys):
    message = refused(
        tiny_model_dir, tmp_path, capsys, "--model.peft=peft.AdaLoraConfig",
        "--model.peft.total_step=10",
    )  # fmt: skip
    assert message.startswith("error: model.peft is a peft.AdaLoraConfig: AdaLoRA reallocates")
    assert message.endswith("Use class_path: peft.LoraConfig (a fixed rank r).")
