"""Every model `treg pairs`, `treg predict` and `treg evaluate` will load is checked at start-up
(existence, kind, vocabulary against the tokenizer it is fed) and the counts they take are
checked before any prompt is read: each refusal exits 2 with one paragraph naming the setting,
no traceback, no model loaded, nothing sampled or written."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest

from builders import (
    MODEL_LOADERS,
    REACHED,
    byte_tokenizer,
    save_model_folder,
    write_pairs,
)
from treg_lightning.cli.main import cli_main as treg_main

SCORER_LOADERS = (
    "transformers.AutoModelForSequenceClassification.from_pretrained",
    "transformers.AutoModelForCausalLM.from_pretrained",
    "treg_lightning.answers.reward_model.RewardModelScorer.__init__",  # checks itself, too late
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The policy (a causal LM with the byte-level tokenizer) and its neighbours: a reward
    model, a LoRA adapter folder, models of another vocabulary (same size with one token moved,
    and a smaller embedding table), data and prompts files."""
    root = tmp_path_factory.mktemp("answer-models")
    tokenizer = byte_tokenizer()
    made = {
        "policy": save_model_folder(root / "policy", "causal", tokenizer),
        "judge": save_model_folder(root / "judge", "causal", tokenizer, seed=1),
        "rm": save_model_folder(root / "rm", "classifier", tokenizer),
        "adapter": save_model_folder(root / "adapter", "adapter", tokenizer),
        "other_vocab": save_model_folder(
            root / "other_vocab", tokenizer=byte_tokenizer(eos="<|eot|>")
        ),  # fmt: skip
        "small_vocab": save_model_folder(root / "small_vocab", vocab_size=100),
    }
    made["data"] = write_pairs(root / "data.jsonl", 6)
    made["prompts"] = root / "prompts.jsonl"
    made["prompts"].write_text('"Say hi."\n"Name a color."\n')
    made["root"] = root
    return made


def refused(args: list[str], capsys) -> str:
    """`treg ARGS` exits 2 with one paragraph and no traceback, and loads no model."""
    patches = [mock.patch(target, side_effect=REACHED) for target in (*MODEL_LOADERS,
               *SCORER_LOADERS)]  # fmt: skip
    with mock.patch.object(sys, "argv", ["treg"]), pytest.raises(SystemExit) as info:
        for patch in patches:
            patch.start()
        try:
            treg_main(args)
        finally:
            for patch in patches:
                patch.stop()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err[-3000:]
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: "), err[-3000:]
    return message


def common(folders, out: Path, model=None) -> list[str]:
    return [
        f"--model.model={model or folders['policy']}",
        f"--data.source={folders['data']}",
        "--data.max_length=64",
        "--data.max_prompt_length=32",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        f"--prompts.file={folders['prompts']}",
        f"--output.path={out}",
        "--sampling.max_new_tokens=4",
        "--generation.progress=false",
    ]


def pairs(folders, out: Path, *extra: str, model=None, reference=None) -> list[str]:
    return [
        "pairs",
        *common(folders, out, model),
        "--sampling.temperature=1.0",
        "--scorer=treg_lightning.answers.scorers.ImplicitRewardScorer",
        f"--scorer.policy={folders['judge']}",
        f"--scorer.reference={reference or folders['policy']}",
        *extra,
    ]


def nothing_written(out: Path) -> None:
    assert not out.exists() and not Path(f"{out}.parts").exists()
    assert not list(out.parent.glob(f"{out.stem}.*"))


# --- counts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [-1, 0, 1])
def test_pairs_k_below_two_is_refused(folders, tmp_path, capsys, k):
    """-1 used to cut the default seeds to [13, 21, 42, 79] (4 samples, exit 0); 0 and 1 leave no
    second sample to pair with."""
    out = tmp_path / "pairs.jsonl"
    message = refused(pairs(folders, out, f"--pairs.k={k}"), capsys)
    assert message == (
        f"error: --pairs.k {k}: pairs needs k >= 2 samples per prompt, since chosen and rejected "
        "are two different samples of one prompt (with fewer, no pair can be formed). Set "
        "--pairs.k 5, SimPO's setting (or list --pairs.seeds)."
    )
    nothing_written(out)


@pytest.mark.parametrize("verb", ["pairs", "predict"])
@pytest.mark.parametrize("limit", [-1, 0])
def test_limit_below_one_is_refused_by_both_verbs(folders, tmp_path, capsys, verb, limit):
    """--limit -1 used to drop the last prompt (a [:-1] slice) and exit 0."""
    out = tmp_path / "out.jsonl"
    args = pairs(folders, out) if verb == "pairs" else ["predict", *common(folders, out)]
    with mock.patch("treg_lightning.answers.prompt_sets.load_prompt_set", side_effect=REACHED):
        message = refused([*args, f"--prompts.limit={limit}"], capsys)
    assert message == (
        f"error: --prompts.limit {limit}: {verb} needs at least one prompt (--prompts.limit N "
        "with N >= 1), or drop --prompts.limit to take every prompt."
    )
    nothing_written(out)


# --- the implicit-reward scorer's models ---------------------------------------------------------


def test_reference_of_another_vocabulary_is_refused_before_sampling(folders, tmp_path, capsys):
    """It used to score the policy tokenizer's ids with the reference's embedding table and pick
    chosen / rejected from meaningless scores (exit 0)."""
    out = tmp_path / "pairs.jsonl"
    message = refused(pairs(folders, out, reference=folders["other_vocab"]), capsys)
    assert message.startswith(
        f"error: scorer.reference '{folders['other_vocab']}': its tokenizer differs from the "
        f"tokenizer of scorer.policy '{folders['judge']}'"
    )
    assert "Give a model of the same family (the same vocabulary)." in message
    message = refused(pairs(folders, out, reference=folders["small_vocab"]), capsys)
    assert f"scorer.reference '{folders['small_vocab']}' embeds 100 tokens, but" in message
    assert "its ids would reach past the model's embedding table" in message
    nothing_written(out)


def test_missing_adapter_and_same_scorer_models_are_refused(folders, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    missing = tmp_path / "no-such-model"
    message = refused(pairs(folders, out, reference=missing), capsys)
    assert message.startswith(f"error: scorer.reference: the model path {missing} does not exist")
    message = refused(pairs(folders, out, f"--scorer.policy={folders['adapter']}"), capsys)
    assert message.startswith(
        f"error: scorer.policy '{folders['adapter']}' is a LoRA adapter folder "
        "(adapter_config.json on the base model"
    )
    message = refused(pairs(folders, out, f"--scorer.policy={folders['rm']}"), capsys)
    assert message.startswith(
        f"error: scorer.policy '{folders['rm']}' is a sequence classifier "
        "(LlamaForSequenceClassification, 1 output: a reward model), not a causal LM"
    )
    # The same model twice: every implicit reward 0, every prompt dropped as tied.
    same = pairs(folders, out, f"--scorer.policy={folders['policy']}")
    message = refused(same, capsys)
    assert message.startswith(
        f"error: scorer.policy '{folders['policy']}' and scorer.reference '{folders['policy']}' "
        "are the same model"
    )
    nothing_written(out)


# --- the sequence-classifier scorer ------------------------------------------------------------


def classifier(folders, out: Path, name) -> list[str]:
    args = pairs(folders, out)[:-3]  # without the implicit-reward scorer
    return [*args, "--scorer=treg_lightning.answers.scorers.SequenceClassifierScorer",
            f"--scorer.name_or_path={name}"]  # fmt: skip


def test_reward_model_scorer_kind_and_existence(folders, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    message = refused(classifier(folders, out, folders["policy"]), capsys)
    assert message.startswith(
        f"error: scorer.name_or_path '{folders['policy']}' is a causal LM (LlamaForCausalLM), "
        "not a reward model (a sequence classifier with one output, num_labels=1)"
    )
    message = refused(classifier(folders, out, folders["adapter"]), capsys)
    assert "is a LoRA adapter folder" in message
    message = refused(classifier(folders, out, tmp_path / "nowhere"), capsys)
    assert message == (
        f"error: scorer.name_or_path {tmp_path / 'nowhere'} does not exist (or is not a folder): "
        "give the folder of a sequence-classification reward model written by save_pretrained, "
        "or a Hugging Face hub id."
    )
    nothing_written(out)


# --- the policy of pairs and predict -------------------------------------------------------------


@pytest.mark.parametrize("verb", ["pairs", "predict"])
def test_policy_kind_adapter_and_vocabulary(folders, tmp_path, capsys, verb):
    out = tmp_path / "out.jsonl"

    def args(model, *extra):
        if verb == "pairs":
            return [*pairs(folders, out, model=model), *extra]
        return ["predict", *common(folders, out, model), *extra]

    message = refused(args(folders["adapter"]), capsys)
    assert message.startswith(
        f"error: model.model '{folders['adapter']}' is a LoRA adapter folder (adapter_config.json "
        f"on the base model '{folders['adapter'].parent / 'base'}'), not a whole model"
    )
    assert "holds no config.json" not in message
    message = refused(args(folders["rm"]), capsys)
    assert message.startswith(f"error: model.model '{folders['rm']}' is a sequence classifier")
    # The policy reads the ids of the data tokenizer (data.tokenizer follows model.model), which
    # writes the prompts: a tokenizer grown past the embedding table is refused.
    message = refused(args(folders["small_vocab"]), capsys)
    assert message.startswith(
        f"error: model.model '{folders['small_vocab']}' embeds 100 tokens, but the data "
        f"tokenizer (data.tokenizer) ('{folders['small_vocab']}') has 259"
    )
    nothing_written(out)


# --- evaluate ------------------------------------------------------------------------------------


def evaluate(folders, out: Path, *extra: str) -> list[str]:
    answers = folders["root"] / "answers.jsonl"
    answers.write_text(json.dumps({"instruction": "Hi", "output": "Hello", "messages": []}) + "\n")
    return [
        "evaluate",
        f"--model.model={folders['policy']}",
        f"--data.source={folders['data']}",
        "--data.val_fraction=0.5",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        f"--output.path={out}",
        f"--runs=[{{name: a, predictions: {answers}}}]",
        *extra,
    ]


def test_evaluate_reward_model_is_named_by_its_kind(folders, tmp_path, capsys):
    """A causal LM given as --reward_model used to be loaded under a random two-output head and
    called a model "with 2 outputs"."""
    out = tmp_path / "report"
    message = refused(
        evaluate(folders, out, f"--evaluate.reward_model={folders['policy']}"), capsys
    )
    assert message.startswith(
        f"error: --evaluate.reward_model '{folders['policy']}' is a causal LM "
        "(LlamaForCausalLM), not a "
        "reward model"
    )
    assert "2 outputs" not in message
    message = refused(
        evaluate(folders, out, f"--evaluate.reward_model={folders['adapter']}"), capsys
    )
    assert f"--evaluate.reward_model '{folders['adapter']}' is a LoRA adapter folder" in message
    message = refused(evaluate(folders, out, f"--evaluate.reward_model={folders['data']}"), capsys)
    assert message.startswith(f"error: --evaluate.reward_model {folders['data']} does not exist "
                              "(or is "
                              "not a folder)")  # fmt: skip
    assert not out.exists()


def test_evaluate_run_policy_kind_and_vocabulary(folders, tmp_path, capsys):
    out = tmp_path / "report"
    runs = f"--runs=[{{name: b, policy: {folders['rm']}}}]"
    message = refused(evaluate(folders, out, runs), capsys)
    assert message.startswith(f"error: run 'b': policy '{folders['rm']}' is a sequence classifier")
    runs = f"--runs=[{{name: b, policy: {folders['small_vocab']}}}]"
    message = refused(evaluate(folders, out, runs), capsys)
    assert message.startswith(
        f"error: run 'b': policy '{folders['small_vocab']}' embeds 100 tokens, but the data "
        "tokenizer (data.tokenizer)"
    )
    assert not out.exists()
