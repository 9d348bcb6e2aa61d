"""LoRA settings peft would reject only after the model loaded (r: 0, lora_dropout out of
[0, 1), unknown target modules), the output projection as an adapter target or a trained copy
(modules_to_save), and AdaLoRA in any form (its rank allocation is not run by our loop; without
total_step peft's own constructor fails first): each refused at start-up with `error:` and
exit 2, before any weights load or a step trains."""

from __future__ import annotations

import pytest

# Lightning binds its log handler to the sys.stderr of the moment it is first imported: import it
# now, not under the first test's capsys (whose stream is closed before the next test logs).
import treg_lightning.cli.main  # noqa: F401
from builders import refused_before_training, tiny_fit_args, write_pairs

peft = pytest.importorskip("peft", reason="LoRA tests need peft (the `lora`/`dev` extra)")


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


ADALORA = (
    "error: model.peft is a peft.AdaLoraConfig: AdaLoRA is not supported. It reallocates its "
    "ranks in an update_and_allocate call after every optimizer step, which treg's training loop "
    "does not make (its ranks would never be allocated). Use class_path: peft.LoraConfig (a "
    "fixed rank r)."
)


@pytest.mark.parametrize(
    "settings",
    [
        [],  # no total_step: peft's constructor would fail with its own words first
        ["--model.peft.total_step=10"],
        ["--model.peft.total_step=10", "--model.peft.init_r=4", "--model.peft.target_r=2"],
    ],
)
def test_adalora_is_refused(settings, tiny_model_dir, tmp_path, capsys):
    message = refused(
        tiny_model_dir, tmp_path, capsys, "--model.peft=peft.AdaLoraConfig", *settings
    )
    assert message == ADALORA


def test_adalora_in_a_config_file_is_refused(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "adalora.yaml"
    config.write_text("model:\n  peft:\n    class_path: peft.AdaLoraConfig\n")
    assert refused(tiny_model_dir, tmp_path, capsys, f"--config={config}") == ADALORA


def test_adalora_in_python_is_refused(tiny_model_dir):
    from treg_lightning.errors import ConfigError
    from treg_lightning.module import PreferenceModule

    with pytest.raises(ConfigError) as info:
        PreferenceModule(str(tiny_model_dir), peft=peft.AdaLoraConfig(total_step=10))
    assert f"error: {info.value}" == ADALORA


def test_lm_head_in_modules_to_save_is_refused(tiny_model_dir, tmp_path, capsys):
    extra = "--model.peft.modules_to_save=[lm_head]"
    message = refused(tiny_model_dir, tmp_path, capsys, *LORA, extra)
    assert message == (
        "error: model.peft.modules_to_save names the output projection (lm_head), which is not "
        "supported with LoRA: it would train a full copy of lm_head (vocab x hidden weights, "
        "with their gradients and optimizer states: not an adapter, and not counted by treg "
        "plan), and where it is tied to the input embedding (SmolLM2, Gemma, ...) FSDP2 cannot "
        "shard the two apart. Leave lm_head out of modules_to_save (the adapters of the decoder "
        "layers train the policy); to train the output projection too, train without LoRA "
        "(model.peft: null)."
    )


def test_lm_head_as_a_target_module_is_refused(tiny_model_dir, tmp_path, capsys):
    extra = "--model.peft.target_modules=[q_proj,lm_head]"
    message = refused(tiny_model_dir, tmp_path, capsys, *LORA, extra)
    assert message == (
        "error: model.peft.target_modules puts an adapter on the output projection (lm_head), "
        "which is not supported: the log-probs are computed in chunks from lm_head.weight, the "
        "frozen base weight, so that adapter would take no part in training. Leave lm_head out "
        "of target_modules (all-linear leaves it out by itself)."
    )
