"""The models of the model-based token-reward sources are checked at start-up, before any pair
is tokenized or any weight read: ModelContrastRewards' positive and negative (two models, each
a causal LM of the data tokenizer's vocabulary) and ContrastiveRewards' evaluator, through
`treg fit`, `treg annotate` and `treg audit --second`, each refusal one paragraph, exit 2,
nothing trained, annotated or cached."""

from __future__ import annotations

import sys
from unittest import mock

import pytest

from builders import (
    REACHED,
    byte_tokenizer,
    no_model_load,
    save_model_folder,
    tiny_fit_args,
    write_pairs,
)
from treg_lightning.cli.main import cli_main

CONTRAST = "treg_lightning.rewards.ModelContrastRewards"
CONTRASTIVE = "treg_lightning.rewards.ContrastiveRewards"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Folders of every kind beside the session's tiny model (same byte-level tokenizer)."""
    root = tmp_path_factory.mktemp("source-models")
    tokenizer = byte_tokenizer()
    made = {kind: save_model_folder(root / kind, kind, tokenizer)
            for kind in ("causal", "classifier", "adapter")}  # fmt: skip
    made["other_vocab"] = save_model_folder(
        root / "other_vocab", tokenizer=byte_tokenizer(eos="<|eot|>")
    )
    return made


def run_args(tmp_path, model_dir, rewards: str, *extra: str) -> list[str]:
    data = write_pairs(tmp_path / "pairs.jsonl", 4)
    args = tiny_fit_args(model_dir, data, tmp_path / "run", alpha=0.1, rewards=rewards)
    return [*args, f"--data.rewards.cache_dir={tmp_path / 'cache'}", *extra]


def refused(verb: str, args: list[str], tmp_path, capsys) -> str:
    """`treg VERB ARGS` exits 2, one paragraph, before tokenizing (and so before annotating)
    and before any model loads (the policy's build included: nothing can train); the cache
    folder holds nothing."""
    with (
        no_model_load(
            "treg_lightning.rewards.model_contrast.load_causal_lm",
            "treg_lightning.data.datamodule.tokenize_pairs",
            "treg_lightning.module.PreferenceModule.build_policy",
        ),
        mock.patch.object(sys, "argv", ["treg"]),
        pytest.raises(SystemExit) as info,
    ):
        cli_main([verb, *args])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err and REACHED.args[0] not in err, err
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir())
    assert not list((tmp_path / "run").rglob("*.ckpt"))
    return " ".join(err.split())


def test_positive_naming_the_model_that_negative_defaults_to(tmp_path, tiny_model_dir, capsys):
    """`positive` spelled another way (trailing slash) than model.model, `negative` unset: both
    are model.model, so every r_hat would be exactly 0."""
    args = run_args(
        tmp_path, tiny_model_dir, CONTRAST, f"--data.rewards.positive={tiny_model_dir}/"
    )
    err = refused("fit", args, tmp_path, capsys)
    assert "ModelContrastRewards: data.rewards.positive" in err
    assert "data.rewards.negative (unset: data.tokenizer, which follows model.model)" in err
    assert "are the same model" in err and "every r_hat would be 0" in err


def test_same_model_every_spelling(tmp_path, tiny_model_dir, capsys):
    link = tmp_path / "link"
    link.symlink_to(tiny_model_dir)
    for extra in (
        (f"--data.rewards.positive={link}", f"--data.rewards.negative={tiny_model_dir}"),
        (),  # both unset: model.model twice
    ):
        err = refused("annotate", run_args(tmp_path, tiny_model_dir, CONTRAST, *extra), tmp_path,
                      capsys)  # fmt: skip
        assert "are the same model" in err, err


@pytest.mark.parametrize(
    ("role", "kind", "expected"),
    [
        ("positive", None, "data.rewards.positive: the model path"),
        ("positive", "adapter", "is a LoRA adapter folder"),
        ("negative", "classifier", "is a sequence classifier (LlamaForSequenceClassification"),
        ("positive", "other_vocab", "its tokenizer differs from the data tokenizer"),
    ],
)
def test_a_missing_or_mismatched_model_is_refused_before_tokenizing(
    tmp_path, tiny_model_dir, folders, capsys, role, kind, expected
):
    name = tmp_path / "missing" if kind is None else folders[kind]
    other = "negative" if role == "positive" else "positive"
    args = run_args(tmp_path, tiny_model_dir, CONTRAST, f"--data.rewards.{role}={name}",
                    f"--data.rewards.{other}={folders['causal']}")  # fmt: skip
    err = refused("annotate", args, tmp_path, capsys)
    assert expected in err, err
    assert f"data.rewards.{role}" in err


def test_an_unreachable_hub_model(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    args = run_args(tmp_path, tiny_model_dir, CONTRAST, "--data.rewards.positive=no-org/no-model")
    err = refused("fit", args, tmp_path, capsys)
    assert "data.rewards.positive 'no-org/no-model': no local folder or file" in err, err


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (None, "data.rewards.evaluator: the model path"),
        ("adapter", "data.rewards.evaluator '{}' is a LoRA adapter folder"),
        ("classifier", "is a sequence classifier"),
        ("other_vocab", "its tokenizer differs from the data tokenizer"),
    ],
)
def test_the_contrastive_evaluator_is_checked_at_start_up(
    tmp_path, tiny_model_dir, folders, capsys, kind, expected
):
    name = tmp_path / "missing" if kind is None else folders[kind]
    args = run_args(tmp_path, tiny_model_dir, CONTRASTIVE, f"--data.rewards.evaluator={name}")
    err = refused("fit", args, tmp_path, capsys)
    assert expected.format(name) in err, err


def test_audit_second_source_checked_before_the_annotate_pass(tmp_path, tiny_model_dir, capsys):
    args = run_args(
        tmp_path, tiny_model_dir, "treg_lightning.rewards.SpanRewards",
        f"--second={CONTRAST}", f"--second.positive={tiny_model_dir}",
        f"--output.path={tmp_path / 'report'}",
    )  # fmt: skip
    args = [a for a in args if not a.startswith("--trainer.max_steps")]
    err = refused("audit", args, tmp_path, capsys)
    assert "ModelContrastRewards: --second.positive" in err and "are the same model" in err, err
    assert not (tmp_path / "report" / "audit.json").exists()
