"""A catalogue of bad inputs: each gives a clear error naming what and where, at start-up.

Configs go through ``TRegCLI`` (the ``treg`` command) with YAML written in tmp; "at start-up"
is checked by patching the model loaders (or the forward passes) to fail if they are reached,
so an error that came only after loading a model, or after annotating, fails the test.
Rows and data files are catalogued in tests/data/, caches in tests/rewards/test_cache.py.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest

from builders import annotate_args, no_model_load, tiny_fit_args, write_pairs
from treg_lightning.cli.main import TRegCLI
from treg_lightning.rewards.cache import CacheError

REACHED = AssertionError("reached a forward that the check should have preceded")


@contextlib.contextmanager
def no_forward():
    """Models may load, but no annotate or training forward may run."""
    with (
        mock.patch("treg_lightning.rewards.annotate._score_batch", side_effect=REACHED),
        mock.patch("treg_lightning.module.PreferenceModule.forward_logps", side_effect=REACHED),
    ):
        yield


def cli(args: list[str]) -> TRegCLI:
    with mock.patch.object(sys, "argv", ["treg"]):
        return TRegCLI(args=args)


def parse_error(args: list[str], capsys) -> str:
    """The message of a config the parser refuses (exit status 2, message on stderr)."""
    with no_model_load(), pytest.raises(SystemExit) as info:
        cli(args)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture
def setup(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 6)

    def make(*extra: str, model_dir: Path = tiny_model_dir) -> list[str]:
        return ["fit", *tiny_fit_args(model_dir, data, tmp_path, *extra, devices=None, seed=None)]

    make.tmp = tmp_path
    make.data = data
    make.annotate = annotate_args(tmp_path)
    return make


def yaml_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return f"--config={path}"


# --- configs the parser refuses ----------------------------------------------------------------


def test_unknown_key_in_yaml_suggests_the_close_one(setup, capsys):
    config = yaml_config(setup.tmp, "data:\n  max_lenght: 64\n")
    message = parse_error(setup(config), capsys)
    assert message == (
        "error: Subcommand 'fit' does not accept option 'data.max_lenght'. "
        "Did you mean 'data.max_length'?"
    )


@pytest.mark.parametrize(
    ("config", "error", "hint"),
    [
        pytest.param(
            "data:\n  rewards: annotate\n",
            'error: Parser key "data.rewards": Expected a dot import path string: annotate',
            "hint: `data.rewards: annotate` is the previous config schema; write `data.rewards: "
            "{class_path: treg_lightning.rewards.ContrastiveRewards}` (its settings under "
            "init_args).",
            id="rewards-annotate",
        ),
        pytest.param(
            "data:\n  rewards: none\n",
            'error: Parser key "data.rewards": Expected a dot import path string: none',
            "hint: `data.rewards: none` is the previous config schema; write `data.rewards: "
            "null` (no token rewards).",
            id="rewards-none",
        ),
        pytest.param(
            "data:\n  annotate_batch_size: 8\n",
            "error: Subcommand 'fit' does not accept option 'data.annotate_batch_size'",
            "hint: `data.annotate_batch_size` is the previous config schema; it is now a setting "
            "of the reward source: `data.rewards: {class_path: "
            "treg_lightning.rewards.ContrastiveRewards, init_args: {batch_size: ...}}`.",
            id="annotate-batch-size",
        ),
        pytest.param(
            "model:\n  regularizer:\n    class_path: treg_lightning.losses.TokenRewardRegularizer"
            "\n    init_args:\n      token_rewards: sft\n",
            "Option 'token_rewards' is not accepted",
            "hint: `token_rewards` is the previous config schema; write `targets: {class_path: "
            "treg_lightning.losses.SelfGeneratedRewards}` in the regularizer's init_args (self "
            "-> SelfGeneratedRewards, sft -> ChosenSFT, implicit -> ImplicitRewards).",
            id="token-rewards",
        ),
    ],
)
def test_previous_schema_gets_a_one_line_hint_with_the_new_form(setup, capsys, config, error, hint):
    from treg_lightning.cli.main import cli_main

    with (
        no_model_load(),
        mock.patch.object(sys, "argv", ["treg"]),
        pytest.raises(SystemExit) as info,
    ):
        cli_main(setup(yaml_config(setup.tmp, config)))
    assert info.value.code == 2
    lines = [line.strip() for line in capsys.readouterr().err.strip().splitlines()]
    assert error in "\n".join(lines)
    assert lines.count(hint) == 1 and lines[-1] == hint


def test_unknown_key_far_from_any_is_named_without_a_guess(setup, capsys):
    config = yaml_config(setup.tmp, "model:\n  frobnicate: 3\n")
    message = parse_error(setup(config), capsys)
    assert message == "error: Subcommand 'fit' does not accept option 'model.frobnicate'"


def test_wrong_type_in_yaml_names_the_key_and_type(setup, capsys):
    config = yaml_config(setup.tmp, "data:\n  batch_size: two\n")
    with no_model_load(), pytest.raises(SystemExit):
        cli(setup(config))
    err = capsys.readouterr().err
    assert (
        'Parser key "data.batch_size"' in err and "Expected a <class 'int'>. Got value: two" in err
    )


def test_rewards_outside_its_choices(setup, capsys):
    with no_model_load(), pytest.raises(SystemExit):
        cli(setup("--data.rewards=maybe"))
    err = capsys.readouterr().err
    assert 'Parser key "data.rewards"' in err and "maybe" in err


def test_guard_action_outside_its_choices(setup, capsys):
    with no_model_load(), pytest.raises(SystemExit):
        cli(setup("--guard.action=halt"))
    err = capsys.readouterr().err
    assert "guard" in err and "halt" in err


# --- values refused when the classes are built (before any model load) ------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param(
            "data:\n  max_length: 32\n  max_prompt_length: 32\n",
            "max_prompt_length (32) must be positive and smaller than max_length (32)",
            id="max_prompt_length_not_below_max_length",
        ),
        pytest.param(
            "model:\n  regularizer:\n    class_path: treg_lightning.losses.TokenRewardRegularizer"
            "\n    init_args:\n      alpha: -0.5\n",
            "TokenRewardRegularizer: alpha must be >= 0, got -0.5.",
            id="alpha_negative",
        ),
        pytest.param(
            "model:\n  loss:\n    class_path: treg_lightning.losses.DPOLoss\n"
            "    init_args:\n      beta: 0.0\n",
            "DPOLoss: beta must be > 0, got 0.0.",
            id="dpo_beta_zero",
        ),
        pytest.param(
            "model:\n  loss:\n    class_path: treg_lightning.losses.SimPOLoss\n"
            "    init_args:\n      beta: -2.0\n",
            "SimPOLoss: beta must be > 0, got -2.0.",
            id="simpo_beta_negative",
        ),
        pytest.param(
            "model:\n  loss:\n    class_path: treg_lightning.losses.IPOLoss\n"
            "    init_args:\n      tau: 0.0\n",
            "IPOLoss: tau must be > 0, got 0.0.",
            id="ipo_tau_zero",
        ),
        pytest.param(
            "data:\n  rewards:\n    class_path: treg_lightning.rewards.ContrastiveRewards\n"
            "    init_args:\n      template: contrastive\n",
            "Unknown contrastive template preset 'contrastive'; choose one of ['instruct', "
            "'revise']",
            id="unknown_template_preset",
        ),
        pytest.param(
            "model:\n  attn_implementation: spda\n",
            "attn_implementation 'spda' is not an attention kernel transformers knows",
            id="unknown_attention_implementation",
        ),
        pytest.param(
            "model:\n  torch_dtype: float12\n",
            "Unknown torch_dtype 'float12'",
            id="unknown_torch_dtype",
        ),
        pytest.param(
            "data:\n  val_fraction: 1.5\n",
            "val_fraction must be in [0, 1), got 1.5.",
            id="val_fraction_out_of_range",
        ),
    ],
)
def test_invalid_values_fail_before_any_model_load(setup, config, expected):
    with no_model_load(), pytest.raises(ValueError) as info:
        cli(setup(yaml_config(setup.tmp, config)))
    assert expected in str(info.value)


def test_unknown_attention_implementation_suggests_the_close_one(setup):
    with no_model_load(), pytest.raises(ValueError, match="Did you mean 'sdpa'"):
        cli(setup("--model.attn_implementation=spda"))


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(("--data.rewards=null",), id="rewards_none"),
        pytest.param(
            ("ANNOTATE", "--data.rewards.store_reference_logps=false"),
            id="annotate_without_reference_logps",
        ),
    ],
)
def test_loss_needing_a_reference_with_none_available(setup, extra):
    if extra[0] == "ANNOTATE":
        extra = (*setup.annotate, *extra[1:])
    args = setup(
        "--model.loss=treg_lightning.losses.DPOLoss", "--model.live_reference=false", *extra
    )
    with no_model_load(), pytest.raises(ValueError) as info:
        cli(args)
    message = str(info.value)
    assert message.startswith("DPOLoss needs reference log-probabilities, but model.live_reference")
    assert "store_reference_logps: true" in message


# --- files and folders that are not there ------------------------------------------------------


def test_nonexistent_data_file(setup):
    missing = setup.tmp / "missing.jsonl"
    with no_model_load(), pytest.raises(FileNotFoundError) as info:
        cli(setup(f"--data.source={missing}"))
    assert str(info.value).startswith(f"{missing}: no such file or folder.")


def test_nonexistent_model_path(setup):
    missing = setup.tmp / "no-model"
    with no_model_load(), pytest.raises(FileNotFoundError) as info:
        cli(setup(model_dir=missing))
    assert str(info.value).startswith(f"Model path {missing} does not exist")


def test_nonexistent_ckpt_path(setup):
    missing = setup.tmp / "last.ckpt"
    with no_model_load(), pytest.raises(FileNotFoundError) as info:
        cli(setup(f"--ckpt_path={missing}"))
    assert str(info.value).startswith(f"--ckpt_path {missing} does not exist")


# --- models and tokenizers that do not fit -----------------------------------------------------


def copy_model(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    return dest


def test_tokenizer_without_chat_template(setup, tiny_model_dir):
    base = copy_model(tiny_model_dir, setup.tmp / "base-model")
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    with no_model_load(), pytest.raises(ValueError) as info:
        cli(setup(model_dir=base))
    assert f"the tokenizer '{base}' has no chat template" in str(info.value)
    assert "set `chat_template`" in str(info.value)


@pytest.fixture
def small_vocab_model(setup, tiny_model_dir):
    """The tiny model's tokenizer beside a model whose embedding has 16 rows fewer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = copy_model(tiny_model_dir, setup.tmp / "small-vocab")
    config = AutoConfig.from_pretrained(folder)
    config.vocab_size -= 16
    config.pad_token_id = 0  # the embedding's padding row must lie inside it
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("rewards", ["none", "annotate"])
def test_tokenizer_larger_than_the_model_embedding(setup, small_vocab_model, rewards):
    """Caught by the module (rewards none) or the start-up check of the evaluator (annotate,
    from its config.json, before any pair is tokenized), before any forward."""
    extra = setup.annotate if rewards == "annotate" else ()
    with no_forward(), pytest.raises(ValueError) as info:
        cli(setup(*extra, model_dir=small_vocab_model))
    message = str(info.value)
    if rewards == "annotate":
        assert "evaluator (unset: data.tokenizer, which follows model.model) " in message
        assert f"'{small_vocab_model}' embeds 243 tokens, but the data tokenizer" in message
        assert "would reach past the model's embedding table" in message
    else:
        assert f"tokens but the model '{small_vocab_model}' embeds only" in message
        assert "do not belong together" in message


def test_evaluator_with_another_tokenizer(setup, tiny_model_dir):
    from transformers import AutoTokenizer

    other = copy_model(tiny_model_dir, setup.tmp / "other-evaluator")
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra_0>", "<extra_1>"], special_tokens=True)
    tokenizer.save_pretrained(other)
    args = setup(*setup.annotate, f"--data.rewards.evaluator={other}")
    with no_model_load(), pytest.raises(ValueError) as info:
        cli(args)
    message = str(info.value)
    assert message.startswith(
        f"data.rewards.evaluator '{other}': its tokenizer differs from the data tokenizer"
    )
    assert f": {len(tokenizer)} vs {len(tokenizer) - 2} tokens" in message
    assert "Give a model of the same family (the same vocabulary)" in message


# --- token-reward caches damaged or foreign, met by `treg fit` ----------------------------------


@pytest.fixture(scope="module")
def built_cache(tiny_model_dir, tmp_path_factory):
    """`treg annotate` once: the train cache folder, to copy and damage per test."""
    root = tmp_path_factory.mktemp("built-cache")
    data = write_pairs(root / "pairs.jsonl", 6)
    args = tiny_fit_args(tiny_model_dir, data, root, *annotate_args(root), devices=None, seed=None)
    cli(["annotate", *args])
    (folder,) = (root / "cache").glob("train-*")
    return folder


def damaged_cache_run(setup, built_cache, damage) -> str:
    cache = setup.tmp / "cache" / built_cache.name
    shutil.copytree(built_cache, cache)
    damage(cache)
    with no_forward(), pytest.raises(CacheError) as info:
        cli(setup(*setup.annotate))
    message = str(info.value)
    assert str(cache) in message
    return message


def test_truncated_arrow_file_in_the_cache(setup, built_cache):
    def truncate(cache):
        for arrow in (cache / "data").glob("*.arrow"):
            arrow.write_bytes(arrow.read_bytes()[:64])

    message = damaged_cache_run(setup, built_cache, truncate)
    assert "is damaged: its Arrow data" in message and "Delete the folder and rerun" in message


def test_stale_fingerprint_in_the_cache(setup, built_cache):
    def stale(cache):
        meta = json.loads((cache / "meta.json").read_text())
        meta["fingerprint"] = "0" * 64
        meta["parts"]["model"] = "0" * 64
        (cache / "meta.json").write_text(json.dumps(meta))

    message = damaged_cache_run(setup, built_cache, stale)
    assert "differing inputs: model" in message and "point cache_dir elsewhere" in message


def test_foreign_folder_in_place_of_the_cache(setup, built_cache):
    def foreign(cache):
        (cache / "meta.json").write_text(json.dumps({"format": "someone-elses"}))

    message = damaged_cache_run(setup, built_cache, foreign)
    assert "is not a treg-lightning token-reward cache" in message


def test_regularizer_without_token_rewards_fails_before_any_model_load(setup):
    """data.rewards: null with alpha > 0 would train the plain loss while claiming T-REG: the
    start-up check refuses it before any model (policy or evaluator) loads."""
    with no_model_load(), pytest.raises(ValueError) as info:
        cli(setup("--model.regularizer.alpha=0.25"))
    message = str(info.value)
    assert message.startswith(
        "model.regularizer (alpha 0.25, targets SelfGeneratedRewards) needs token rewards in the "
        "data, but data.rewards is null"
    )
    assert "model.regularizer.alpha: 0" in message
