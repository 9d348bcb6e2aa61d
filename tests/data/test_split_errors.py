"""Data that cannot give an honest run is refused early: one paragraph, exit status 2, before any
model or evaluator loads, nothing trained or written.

- loader settings out of range (batch sizes, workers, limit, megabatch, chunk sizes);
- empty sources, a ``val_fraction`` that leaves nothing to train on, a split emptied by skips;
- ``treg validate`` / ``treg test`` with no such data configured;
- validation or test pairs that are also training (or validation) pairs, however the sources
  are spelled, unless ``data.allow_overlap`` (then a warning with the count);
- duplicates inside the training file and a ``limit`` larger than the file: reported, not refused.

Runs go through ``cli_main`` in-process; "nothing loaded" is checked by patching the model
loaders to fail if reached.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest

from builders import REACHED, addition_pairs, no_model_load, tiny_fit_args, write_pairs
from treg_lightning.cli.main import cli_main

PAIRS = addition_pairs(8)


def treg(args: list[str], capsys) -> tuple[int | None, str]:
    """`treg ARGS` in-process: (exit status, None when it returned; stderr)."""
    with mock.patch.object(sys, "argv", ["treg"]):
        try:
            cli_main(args)
        except SystemExit as stop:
            return stop.code, capsys.readouterr().err
    return None, capsys.readouterr().err


def refused(args: list[str], capsys, tmp: Path) -> str:
    """The one-paragraph message of a run refused with status 2 before any model load."""
    with no_model_load():
        status, err = treg(args, capsys)
    assert status == 2, err[-3000:]
    assert "Traceback" not in err, err
    text = err[err.rindex("error: ") :].strip()
    assert "\n" not in text, text
    run = tmp / "run"
    assert not list(run.rglob("*.ckpt")) and not (run / "lightning_logs").exists()
    return text.removeprefix("error: ")


@pytest.fixture
def setup(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")

    def make(*extra: str, subcommand: str = "fit") -> list[str]:
        base = tiny_fit_args(
            tiny_model_dir, data, tmp_path / "run", max_length=96, max_prompt_length=64, seed=None
        )
        return [subcommand, *base, *extra]

    make.tmp = tmp_path
    make.data = data
    return make


# --- settings out of range: refused when the classes are built --------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param(
            ("--data.limit=-3",),
            "data.limit must be >= 1 (the first N rows of each source; null: all rows), got -3.",
            id="limit_negative",  # rows[:-3] silently dropped the last 3 rows
        ),
        pytest.param(("--data.limit=0",), "data.limit must be >= 1", id="limit_zero"),
        pytest.param(
            ("--data.batch_size=0",),
            "data.batch_size must be >= 1 (pairs per training batch and device), got 0.",
            id="batch_size_zero",  # was a raw torch error after the model load
        ),
        pytest.param(
            ("--data.eval_batch_size=0",),
            "data.eval_batch_size must be >= 1 (pairs per validation/test batch; null: "
            "batch_size), got 0.",
            id="eval_batch_size_zero",  # silently fell back to batch_size
        ),
        pytest.param(
            ("--data.num_workers=-1",),
            "data.num_workers must be >= 0 (DataLoader worker processes; 0: the main process), "
            "got -1.",
            id="num_workers_negative",
        ),
        pytest.param(
            ("--data.megabatch_size=0",),
            "data.megabatch_size must be >= 1 (global batches per length-sorted group), got 0.",
            id="megabatch_size_zero",
        ),
        pytest.param(
            ("--model.logp_chunk_size=0",),
            "model.logp_chunk_size must be >= 1 (tokens per chunk of logits in the log-prob "
            "pass), got 0.",
            id="logp_chunk_size_zero",  # a ValueError in the first forward
        ),
        pytest.param(
            ("--model.packing=true", "--model.attn_implementation=flex_attention"),
            "model.packing: true runs packed rows with flash-attention (varlen), sdpa or eager "
            "attention, but model.attn_implementation is 'flex_attention'",
            id="packing_with_another_kernel",
        ),
        pytest.param(
            (
                "--data.rewards=treg_lightning.rewards.ContrastiveRewards",
                "--data.rewards.max_context_length=0",
            ),
            "ContrastiveRewards: max_context_length must be >= 1",
            id="max_context_length_zero",
        ),
    ],
)
def test_setting_out_of_range(setup, capsys, extra, expected):
    assert refused(setup(*extra), capsys, setup.tmp).startswith(expected)


def test_context_limit_below_the_instruction_is_refused_before_the_evaluator_loads(setup, capsys):
    args = setup(
        "--data.rewards=treg_lightning.rewards.ContrastiveRewards",
        f"--data.rewards.cache_dir={setup.tmp / 'cache'}",
        "--data.rewards.max_context_length=8",
    )
    assert refused(args, capsys, setup.tmp).startswith(
        "data.rewards.max_context_length is smaller than the contrastive instruction alone"
    )
    assert not list((setup.tmp / "cache").glob("*"))  # no split cache begun


# --- empty and too-small data ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text"),
    [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("header.csv", "prompt,chosen,rejected\n")],
)
def test_empty_data_file(setup, capsys, name, text):
    """Was "setup() has not run" after the model loaded."""
    empty = setup.tmp / name
    empty.write_text(text)
    message = refused(setup(f"--data.source={empty}"), capsys, setup.tmp)
    assert message == (
        f"{name}: the file (or split) holds no rows, so there are no training pairs "
        f"(data.source '{empty}'). Point that setting at a file (or split) of preference pairs."
    )


def test_empty_validation_file(setup, capsys):
    empty = setup.tmp / "val.jsonl"
    empty.write_text("")
    message = refused(setup(f"--data.val_source={empty}"), capsys, setup.tmp)
    assert message.startswith(
        "val.jsonl: the file (or split) holds no rows, so there are no validation pairs "
        f"(data.val_source '{empty}')."
    )


def test_val_fraction_that_leaves_no_training_pair(setup, capsys):
    one = write_pairs(setup.tmp / "one.jsonl", rows=PAIRS[:1])
    message = refused(setup(f"--data.source={one}", "--data.val_fraction=0.5"), capsys, setup.tmp)
    assert message == (
        "data.val_fraction 0.5 holds out 1 of the 1 rows of one.jsonl, which leaves no "
        "training pair: use more rows, a smaller val_fraction, or a validation file of its own "
        "(data.val_source)."
    )


@pytest.mark.filterwarnings("ignore:val data from val.jsonl")
def test_validation_split_emptied_by_skipped_rows(setup, capsys):
    bad = setup.tmp / "val.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "same", "rejected": "same"}) + "\n")
    message = refused(setup(f"--data.val_source={bad}"), capsys, setup.tmp)
    assert message.startswith(
        "val.jsonl: no usable validation pairs left: skipped 1 of 1 rows: 1 chosen identical to "
        "rejected (row 0)."
    )


# --- validate / test with no data -------------------------------------------------------------


@pytest.mark.parametrize(
    ("subcommand", "expected"),
    [
        pytest.param(
            "validate",
            "treg validate needs validation pairs, but none are configured: set data.val_source "
            "(a file, folder or hub id), data.val_split (another split of data.source) or "
            "data.val_fraction (hold out part of data.source).",
            id="validate",  # was exit 0 with nothing reported
        ),
        pytest.param(
            "test",
            "treg test needs test pairs, but none are configured: set data.test_source (a file, "
            "folder or hub id) or data.test_split (another split of data.source, e.g. test).",
            id="test",  # was "`test_dataloader` must be implemented" after annotate and load
        ),
    ],
)
def test_evaluation_without_its_data(setup, capsys, subcommand, expected):
    message = refused(setup(subcommand=subcommand), capsys, setup.tmp)
    assert message == expected


# --- evaluation data that is training data ----------------------------------------------------


def test_val_split_of_a_single_file_is_the_training_file(setup, capsys):
    message = refused(setup("--data.val_split=test"), capsys, setup.tmp)
    assert message == (
        f"the validation data (data.val_split 'test' of data.source '{setup.data}') reads the "
        f"same rows as the training data (data.source '{setup.data}'): pairs.jsonl is a single "
        "file (or saved Dataset) without splits, so data.split and the split settings all read "
        "the whole of it; 8 of 8 validation pairs are training pairs, so val/* would measure "
        "the training rows. Evaluate on other rows: give them a file of their own "
        "(data.val_source), or hold some out of data.source with data.val_fraction; or set "
        "data.allow_overlap: true to run anyway."
    )


@pytest.mark.parametrize("spelling", ["relative", "symlink", "dot-dot"])
def test_the_training_file_under_another_spelling(setup, capsys, monkeypatch, spelling):
    monkeypatch.chdir(setup.tmp)
    if spelling == "relative":
        other = "pairs.jsonl"
    elif spelling == "symlink":
        os.symlink(setup.data, setup.tmp / "link.jsonl")
        other = str(setup.tmp / "link.jsonl")
    else:
        (setup.tmp / "sub").mkdir()
        other = str(setup.tmp / "sub" / ".." / "pairs.jsonl")
    message = refused(setup(f"--data.val_source={other}"), capsys, setup.tmp)
    assert message.startswith(
        f"the validation data (data.val_source '{other}') reads the same rows as the training "
        f"data (data.source '{setup.data}'): both read pairs.jsonl; 8 of 8 validation pairs are "
        "training pairs"
    )


def test_a_copy_of_some_training_pairs(setup, capsys):
    """Another file, another format: found by the pairs' content, counted, one example named."""
    import csv

    copy = setup.tmp / "val.csv"
    with copy.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "chosen", "rejected"])
        writer.writerows([PAIRS[5], ("New question?", "Yes.", "No."), PAIRS[2]])
    message = refused(setup(f"--data.val_source={copy}"), capsys, setup.tmp)
    assert message == (
        f"2 of 3 validation pairs (data.val_source '{copy}') are also training pairs (data.source "
        f"'{setup.data}'): same prompt, chosen and rejected (e.g. validation row 0 = training row "
        "5), so val/* would partly measure the training rows. Remove the shared pairs from one "
        "of the two sources; or set data.allow_overlap: true to run anyway."
    )


def test_test_split_of_a_single_file(setup, capsys):
    message = refused(setup("--data.test_split=test", subcommand="test"), capsys, setup.tmp)
    assert message.startswith(
        f"the test data (data.test_split 'test' of data.source '{setup.data}') reads the same "
        f"rows as the training data (data.source '{setup.data}')"
    )
    assert message.endswith(
        "so test/* would measure the training rows. Evaluate on other rows: give them a file of "
        "their own (data.test_source); or set data.allow_overlap: true to run anyway."
    )


def test_test_data_that_is_validation_data(setup, capsys):
    val = write_pairs(setup.tmp / "val.jsonl", rows=[("Q?", "A.", "B."), ("R?", "C.", "D.")])
    test = setup.tmp / "test.jsonl"
    shutil.copy(val, test)
    args = setup(f"--data.val_source={val}", f"--data.test_source={test}", subcommand="test")
    assert refused(args, capsys, setup.tmp).startswith(
        f"2 of 2 test pairs (data.test_source '{test}') are also validation pairs "
        f"(data.val_source '{val}'): same prompt, chosen and rejected (e.g. test row 0 = "
        "validation row 0), so test/* would partly measure the validation rows."
    )


def test_one_split_of_a_data_folder_for_both(setup, capsys):
    """A folder of data files (as a hub dataset): the same split for training and validation
    reads the same rows."""
    folder = setup.tmp / "hubish"
    folder.mkdir()
    write_pairs(folder / "train.jsonl")
    message = refused(
        setup(f"--data.source={folder}", f"--data.val_source={folder}"), capsys, setup.tmp
    )
    assert message.startswith(
        f"the validation data (data.val_source '{folder}') reads the same rows as the training "
        f"data (data.source '{folder}'): both read split 'train' of '{folder}'; 8 of 8 "
        "validation pairs are training pairs"
    )


def test_hub_ids_are_the_same_rows_only_for_the_same_split():
    from treg_lightning.data.splits import rows_identity

    assert rows_identity("org/pairs", "train") == rows_identity("org/pairs", "train")
    assert rows_identity("org/pairs", "train") != rows_identity("org/pairs", "test")
    assert rows_identity("demo", "train") == rows_identity("demo", "test")  # one file


def test_allowed_overlap_duplicates_and_a_large_limit_are_reported(setup, capsys, caplog):
    """Trained, with the counts: overlap allowed by the flag, duplicates within the training file
    (each copy trained on), a limit larger than the file."""
    data = write_pairs(setup.tmp / "dups.jsonl", rows=PAIRS + [PAIRS[1], PAIRS[1], PAIRS[4]])
    val = write_pairs(setup.tmp / "val.jsonl", rows=[PAIRS[0], ("Q?", "A.", "B.")])
    args = setup(
        f"--data.source={data}",
        f"--data.val_source={val}",
        "--data.allow_overlap=true",
        "--data.limit=100",
    )
    with caplog.at_level("INFO"), pytest.warns(UserWarning) as warned:
        status, _ = treg(args, capsys)
    assert status is None
    warnings = [str(w.message) for w in warned]
    assert (
        f"data.allow_overlap is true: 1 of 2 validation pairs (data.val_source '{val}') are also "
        f"training pairs (data.source '{data}'): same prompt, chosen and rejected (e.g. "
        "validation row 0 = training row 0), so val/* would partly measure the training rows."
    ) in warnings
    assert (
        "train data from dups.jsonl: 11 pairs; skipped 0 of 11 rows; 3 duplicate pairs (rows 8, "
        "9, 10 repeat an earlier row's prompt, chosen and rejected; each copy is used)"
    ) in warnings
    assert "data.limit 100: dups.jsonl has only 11 rows." in caplog.text
    assert list((setup.tmp / "run").rglob("*.ckpt"))  # trained


def test_val_fraction_keeps_copies_of_a_pair_together(tiny_model_dir, tmp_path):
    """A duplicated pair is held out whole, never trained on and validated on at once."""
    from treg_lightning.data.datamodule import PreferenceDataModule

    pairs = [(f"Q{i}?", f"A{i}.", f"B{i}.") for i in range(20)]
    data = write_pairs(tmp_path / "pairs.jsonl", rows=pairs + pairs[:10])
    module = PreferenceDataModule(
        str(data), tokenizer=str(tiny_model_dir), rewards=None, val_fraction=0.1, seed=3,
        max_length=64, max_prompt_length=32,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="duplicate pairs"):
        module.setup("fit")
    val = {row["prompt"][0]["content"] for row in module.datasets["val"]}
    train = {row["prompt"][0]["content"] for row in module.datasets["train"]}
    assert val and not val & train
    assert len(module.datasets["val"]) + len(module.datasets["train"]) == 30


# --- errors.py: a ValueError raised by our code is a bug ---------------------------------------


def test_a_value_error_of_our_own_constructor_keeps_its_traceback(setup, capsys):
    """No rule makes a plain ValueError a user error, not even one raised in the body of a
    treg_lightning ``__init__`` (the rule that did so was temporary)."""
    import treg_lightning.data.collate as collate

    # Code compiled under a package file, named __init__: what that rule recognized.
    namespace: dict = {}
    source = (
        "def __init__(self, *args, **kwargs):\n    raise ValueError('a bug in a constructor')\n"
    )
    exec(compile(source, collate.__file__, "exec"), namespace)
    with (
        mock.patch.object(sys, "argv", ["treg"]),
        mock.patch.object(collate.PreferenceCollator, "__init__", namespace["__init__"]),
        pytest.raises(ValueError, match="a bug in a constructor") as info,
    ):
        cli_main(setup())
    last = info.traceback[-1]
    assert last.name == "__init__" and Path(str(last.path)) == Path(collate.__file__)
    assert "error: " not in capsys.readouterr().err


# --- the same checks under a plain Trainer (the datamodule's own setup) ------------------------


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ("validate", "validate needs validation pairs, but none are configured: set "),
        ("test", "test needs test pairs, but none are configured: set data.test_source"),
    ],
)
def test_datamodule_setup_without_the_stage_data(tiny_model_dir, tmp_path, stage, expected):
    from treg_lightning.data.datamodule import PreferenceDataModule
    from treg_lightning.errors import ConfigError

    data = PreferenceDataModule(
        str(write_pairs(tmp_path / "pairs.jsonl")), tokenizer=str(tiny_model_dir), rewards=None
    )
    with mock.patch.object(PreferenceDataModule, "tokenized_rows", side_effect=REACHED):
        with pytest.raises(ConfigError, match=f"^{expected}"):
            data.setup(stage)
