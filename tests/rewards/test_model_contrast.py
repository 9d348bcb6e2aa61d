"""ModelContrastRewards: sigmoid(scale * (log p_pos - log p_neg)) - 0.5 per response token;
exactly zero for two copies of one model, sign flipped by swapping them, the vocabulary checked,
the cache reused."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

from builders import save_tiny_model
from treg_lightning.errors import ConfigError
from treg_lightning.rewards import AnnotationContext, ModelContrastRewards, read_meta
from treg_lightning.rewards.annotate import score_sequences

EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def folders(rw_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("contrast")
    return {
        "a": save_tiny_model(root / "a", rw_tokenizer, seed=1),
        "a_copy": save_tiny_model(root / "a_copy", rw_tokenizer, seed=1),
        "b": save_tiny_model(root / "b", rw_tokenizer, seed=2),
    }


def serve(folders, rw_tokenizer, rows, positive, negative, tmp_path, **kwargs):
    source = ModelContrastRewards(
        str(folders[positive]), str(folders[negative]), cache_dir=str(tmp_path), **kwargs
    )
    context = AnnotationContext(rw_tokenizer, str(folders["a"]))
    return source, source.annotate(rows, "train", context)


def test_same_model_gives_exactly_zero(folders, rw_tokenizer, rw_rows, tmp_path):
    _, ds = serve(folders, rw_tokenizer, rw_rows, "a", "a_copy", tmp_path, scale=3.0)
    for side in ("chosen", "rejected"):
        for row, values in zip(rw_rows, ds[f"{side}_token_rewards"], strict=True):
            assert len(values) == len(row[f"{side}_ids"])
            assert np.array_equal(values, np.zeros(len(values)))


def test_values_and_swapping_flips_the_sign(folders, rw_tokenizer, rw_rows, tmp_path):
    source, ds = serve(folders, rw_tokenizer, rw_rows, "a", "b", tmp_path / "ab", scale=2.0)
    _, swapped = serve(folders, rw_tokenizer, rw_rows, "b", "a", tmp_path / "ba", scale=2.0)
    context = AnnotationContext(rw_tokenizer, str(folders["a"]))
    row = rw_rows[1]  # the multi-turn prompt
    seq = [(row["prompt_ids"], row["rejected_ids"])]
    pos = score_sequences(source.model("positive", context), seq, 1)[0]
    neg = score_sequences(source.model("negative", context), seq, 1)[0]
    expected = torch.sigmoid(2.0 * torch.tensor(pos - neg)) - 0.5
    torch.testing.assert_close(torch.tensor(ds[1]["rejected_token_rewards"]), expected)
    for side in ("chosen", "rejected"):
        a = np.concatenate(ds[f"{side}_token_rewards"])
        b = np.concatenate(swapped[f"{side}_token_rewards"])
        assert np.abs(a).max() > 1e3 * EPS  # the two models do differ
        np.testing.assert_allclose(a, -b, rtol=0, atol=4 * EPS)


def test_reference_logps_from_the_negative_model(folders, rw_tokenizer, rw_rows, tmp_path):
    source, ds = serve(
        folders, rw_tokenizer, rw_rows, "b", "a", tmp_path, store_reference_logps=True
    )
    assert source.provides_reference_logps
    row = rw_rows[0]
    context = AnnotationContext(rw_tokenizer, str(folders["a"]))
    neg = score_sequences(
        source.model("negative", context), [(row["prompt_ids"], row["chosen_ids"])], 1
    )
    np.testing.assert_allclose(ds[0]["chosen_ref_token_logps"], neg[0], rtol=0, atol=8 * EPS)


def test_cache_is_reused_without_scoring(folders, rw_tokenizer, rw_rows, tmp_path):
    _, ds = serve(folders, rw_tokenizer, rw_rows, "a", "b", tmp_path)
    (cache,) = tmp_path.glob("train-*")
    settings = read_meta(cache)["description"]["settings"]
    assert settings["scale"] == 1.0 and settings["negative"] == str(folders["b"])
    with mock.patch(
        "treg_lightning.rewards.model_contrast.score_sequences", side_effect=AssertionError
    ):
        _, again = serve(folders, rw_tokenizer, rw_rows, "a", "b", tmp_path)
    assert again.data.table.equals(ds.data.table)
    serve(folders, rw_tokenizer, rw_rows, "a", "b", tmp_path, scale=2.0)  # other settings
    assert len(list(tmp_path.glob("train-*"))) == 2


def test_other_vocabulary_is_refused(folders, rw_helpers, rw_rows, tmp_path):
    other = rw_helpers.build_tokenizer(eos="<end_of_turn>")
    other.add_tokens(["<extra>"])
    folder = save_tiny_model(tmp_path / "other", other)
    source = ModelContrastRewards(str(folder), None, cache_dir=str(tmp_path / "c"))
    context = AnnotationContext(rw_helpers.build_tokenizer(), str(folders["a"]))
    with pytest.raises(ConfigError, match=r"positive .*tokenizer differs from the data tokenizer"):
        source.annotate(rw_rows, "train", context)


def test_config_errors():
    with pytest.raises(ConfigError, match="scale must be > 0"):
        ModelContrastRewards(scale=0.0)
    with pytest.raises(ConfigError, match="Unknown torch_dtype"):
        ModelContrastRewards(dtype="float13")


@pytest.mark.parametrize("name", ["spans.yaml", "model_contrast.yaml"])
def test_reward_configs_compose_with_a_run_config(name, monkeypatch):
    import contextlib
    import io
    import sys
    from pathlib import Path

    import yaml

    from treg_lightning.cli.main import cli_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    configs = Path(__file__).resolve().parents[2] / "configs"
    out = io.StringIO()
    with (
        mock.patch.object(sys, "argv", ["treg"]),
        contextlib.redirect_stdout(out),
        pytest.raises(SystemExit) as info,
    ):
        args = ["--config", str(configs / "demo.yaml"), "--config", str(configs / "rewards" / name)]
        cli_main(["fit", *args, "--print_config"])
    assert info.value.code in (0, None)
    rewards = yaml.safe_load(out.getvalue())["data"]["rewards"]
    expected = {"spans.yaml": "SpanRewards", "model_contrast.yaml": "ModelContrastRewards"}[name]
    assert rewards["class_path"] == f"treg_lightning.rewards.{expected}"


def test_same_model_twice_is_refused_before_any_load(folders, rw_tokenizer, rw_rows, tmp_path):
    """Positive named by path, negative unset (the data tokenizer's model, spelled another
    way): one model twice would give r_hat = 0 on every token."""
    context = AnnotationContext(rw_tokenizer, f"{folders['a']}/")
    target = "treg_lightning.rewards.model_contrast.load_causal_lm"
    for positive, negative in [(str(folders["a"]), None), (None, None),
                               (str(folders["b"]), f"{folders['b']}/.")]:  # fmt: skip
        source = ModelContrastRewards(positive, negative, cache_dir=str(tmp_path))
        with (
            mock.patch(target, side_effect=AssertionError("loaded")),
            pytest.raises(ConfigError, match="are the same model .*every r_hat would be 0"),
        ):
            source.annotate(rw_rows, "train", context)
    assert not any(tmp_path.iterdir())
    # two folders holding equal weights are two models as far as the settings go
    ModelContrastRewards(str(folders["a"]), str(folders["a_copy"])).check_models(context)
