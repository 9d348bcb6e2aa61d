"""The start-up check of a model argument (treg_lightning.models.preflight): every kind of
folder a user may point at, named as what it is, the vocabulary compared with the tokenizer it
will be fed, one spelling per model; and the causal-LM loader naming an adapter folder or a
reward model instead of failing on "no config.json" or loading it under a random head."""

from __future__ import annotations

import re
from unittest import mock

import pytest

from builders import REACHED, byte_tokenizer, save_model_folder, word_tokenizer
from treg_lightning.errors import ConfigError, MissingFileError, UserError
from treg_lightning.models.kinds import CAUSAL_LM, OTHER, SEQUENCE_CLASSIFIER, config_kind
from treg_lightning.models.loading import load_causal_lm, load_tokenizer
from treg_lightning.models.preflight import check_model, inspect_model, model_location

SETTING = "data.rewards.positive"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    tokenizer = byte_tokenizer()
    made = {kind: save_model_folder(root / kind, kind, tokenizer)
            for kind in ("causal", "classifier", "bare", "adapter")}  # fmt: skip
    made["no_tokenizer"] = save_model_folder(root / "no_tokenizer", with_tokenizer=False)
    other = byte_tokenizer(eos="<|eot|>")  # same size, one id means another token
    made["other_vocab"] = save_model_folder(root / "other_vocab", tokenizer=other)
    made["small_vocab"] = save_model_folder(root / "small_vocab", vocab_size=100)
    return made


def refused(kind: type[UserError], name, text: str, **kwargs) -> str:
    with pytest.raises(kind) as info:
        check_model(str(name), SETTING, **kwargs)
    message = str(info.value)
    assert text in message, message
    assert "\n" not in message  # one paragraph
    return message


def test_a_causal_lm_with_its_tokenizer_passes(folders):
    tokenizer = load_tokenizer(folders["causal"])
    facts = check_model(str(folders["causal"]), SETTING, tokenizer=tokenizer)
    assert facts.kind == CAUSAL_LM and facts.architecture == "LlamaForCausalLM"
    assert facts.vocab_size == len(tokenizer) and facts.location == str(folders["causal"])
    # fed another folder's tokenizer of the same vocabulary: compared, and equal
    check_model(str(folders["no_tokenizer"]), SETTING, tokenizer=tokenizer)
    base = folders["adapter"].parent / "base"
    check_model(str(folders["causal"]), SETTING, tokenizer=load_tokenizer(base))


def test_missing_paths_and_files(folders, tmp_path):
    refused(MissingFileError, tmp_path / "nowhere", f"{SETTING}: the model path")
    refused(MissingFileError, "./nowhere/model", "does not exist")
    refused(MissingFileError, tmp_path / "nowhere.gguf", "the GGUF file")
    weights = folders["causal"] / "model.safetensors"
    refused(MissingFileError, weights, "is a file, not a model folder")


def test_folders_that_hold_no_model(folders, tmp_path):
    tokenizer_only = tmp_path / "tok"
    byte_tokenizer().save_pretrained(tokenizer_only)
    message = refused(MissingFileError, tokenizer_only, "is a folder but holds no config.json")
    assert "tokenizer.json" in message  # says what it holds
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(MissingFileError, empty, "(it holds nothing)")
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text((folders["causal"] / "config.json").read_text())
    refused(MissingFileError, config_only, "holds config.json but no weights")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folders["causal"] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"")
    refused(MissingFileError, pickled, "holds no safetensors weights, only pytorch_model.bin")
    assert check_model(str(pickled), "scorer", safetensors_only=False).kind == CAUSAL_LM
    (config_only / "model.safetensors").write_bytes(b"")
    (config_only / "config.json").write_text("{not json")
    refused(ConfigError, config_only, "cannot be read as a model config")


def test_an_adapter_folder_is_named_as_such(folders):
    message = refused(ConfigError, folders["adapter"], "is a LoRA adapter folder")
    assert f"on the base model {str(folders['adapter'].parent / 'base')!r}" in message
    assert "not a whole model" in message and "without --export.adapter_only" in message
    assert "merge_and_unload" in message and "holds no config.json" not in message


def test_kinds_named_in_both_directions(folders):
    message = refused(ConfigError, folders["classifier"], "is a sequence classifier")
    assert "(LlamaForSequenceClassification, 1 output: a reward model), not a causal LM" in message
    refused(ConfigError, folders["bare"], "a model of another kind (LlamaModel), not a causal LM")
    message = refused(
        ConfigError, folders["causal"], "is a causal LM (LlamaForCausalLM), not a reward model",
        expected=SEQUENCE_CLASSIFIER,
    )  # fmt: skip
    assert "output" not in message.split("not a reward model")[0]  # no "with 2 outputs"
    facts = check_model(str(folders["classifier"]), "scorer", expected=SEQUENCE_CLASSIFIER)
    assert facts.kind == SEQUENCE_CLASSIFIER and facts.num_labels == 1


def test_config_kind_without_architectures():
    from transformers import BertConfig, LlamaConfig, T5Config

    assert config_kind(LlamaConfig()) == CAUSAL_LM  # a bare config: loadable as a causal LM
    assert config_kind(LlamaConfig(architectures=["LlamaForTokenClassification"])) == OTHER
    assert config_kind(T5Config(architectures=["T5ForConditionalGeneration"])) == OTHER
    assert config_kind(BertConfig(architectures=["MyBertForSequenceClassification"])) == (
        SEQUENCE_CLASSIFIER
    )


def test_vocabulary_compared_with_the_tokenizer_it_will_be_fed(folders):
    tokenizer = byte_tokenizer()
    message = refused(
        ConfigError, folders["small_vocab"], "embeds 100 tokens, but the data tokenizer",
        tokenizer=tokenizer,
    )  # fmt: skip
    assert f"has {len(tokenizer)}" in message
    message = refused(
        ConfigError, folders["other_vocab"], "its tokenizer differs from the policy's tokenizer",
        tokenizer=tokenizer, fed="the policy's tokenizer",
    )  # fmt: skip
    assert re.search(r"\d+ vs \d+ tokens, e\.g\. \[", message)
    # a model without tokenizer files: its embedding table is all there is to compare
    refused(
        ConfigError, folders["no_tokenizer"], "embeds 259 tokens, but the data tokenizer",
        tokenizer=word_tokenizer(300),
    )  # fmt: skip


def test_an_unreachable_hub_id(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = refused(MissingFileError, "no-such-org/no-such-model", "no local folder or file")
    assert "Hugging Face hub could be read" in message and "hf download" in message


def test_one_spelling_per_model(folders, tmp_path, monkeypatch):
    folder = folders["causal"]
    link = tmp_path / "link"
    link.symlink_to(folder)
    monkeypatch.chdir(folder.parent)
    spellings = [str(folder), f"./{folder.name}", str(link), f"{folder}/"]
    assert {model_location(name) for name in spellings} == {str(folder.resolve())}
    assert model_location("org/model") == "org/model"  # a hub id as given
    assert model_location(folder.name) == str(folder.resolve())  # relative, existing
    assert inspect_model(str(link), SETTING).location == str(folder.resolve())


def test_the_loader_names_an_adapter_folder_and_a_reward_model(folders):
    with pytest.raises(ConfigError, match="is a LoRA adapter folder") as info:
        load_causal_lm(folders["adapter"])
    assert "holds no config.json" not in str(info.value)
    with pytest.raises(ConfigError, match="is a LoRA adapter folder"):
        load_tokenizer(folders["adapter"])
    # refused from config.json, before AutoModelForCausalLM would put a random head on it
    target = "treg_lightning.models.loading.AutoModelForCausalLM.from_pretrained"
    with mock.patch(target, side_effect=REACHED):
        for kind, expected in [("classifier", "is a sequence classifier"),
                               ("bare", "is a model of another kind (LlamaModel)")]:  # fmt: skip
            with pytest.raises(ConfigError, match=re.escape(expected)):
                load_causal_lm(folders[kind])
    assert load_causal_lm(folders["causal"]).config.architectures == ["LlamaForCausalLM"]
