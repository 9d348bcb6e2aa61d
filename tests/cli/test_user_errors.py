"""How `treg` ends: one paragraph and status 2 for each class of user error (no traceback, and
nothing loaded, trained or written), the traceback for a bug, 130/143 and what was kept for an
interrupted run.

Runs go through `cli_main` in-process (fast); one runs as a real `python -m treg_lightning.cli.main`
subprocess. "Nothing loaded" is checked by patching the model loaders to fail if reached.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from builders import annotate_args, no_model_load, tiny_fit_args, write_pairs
from treg_lightning.cli.main import cli_main

SRC = Path(__file__).resolve().parents[2] / "src"


def treg(args: list[str], capsys) -> tuple[int, str]:
    """`treg ARGS` in-process: (exit status, stderr)."""
    with mock.patch.object(sys, "argv", ["treg"]), pytest.raises(SystemExit) as info:
        cli_main(args)
    return info.value.code, capsys.readouterr().err


def error_paragraph(err: str) -> str:
    """The `error: ...` paragraph at the end of stderr (checked to be one paragraph)."""
    assert "Traceback" not in err, err
    text = err[err.rindex("error: ") :].strip()
    assert "\n\n" not in text and text.count("\n") <= 2, text
    return text.removeprefix("error: ")


@pytest.fixture
def setup(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")

    def make(*extra: str, subcommand: str = "fit") -> list[str]:
        base = tiny_fit_args(tiny_model_dir, data, tmp_path / "run", lr=0.01, max_steps=2)
        return [subcommand, *base, *extra]

    make.tmp = tmp_path
    make.model = tiny_model_dir
    return make


def assert_nothing_written(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert not list(run.rglob("*.ckpt")) and not (run / "lightning_logs").exists()


# --- bad config values: refused at start-up, the constructor's own message -------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param(
            ("--model.regularizer.alpha=-0.5",),
            "TokenRewardRegularizer: alpha must be >= 0, got -0.5.",
            id="alpha_negative_flag",  # was a 71-line jsonargparse dump
        ),
        pytest.param(
            ("--model.loss=treg_lightning.losses.DPOLoss", "--model.loss.beta=0"),
            "DPOLoss: beta must be > 0, got 0.0.",
            id="dpo_beta_zero",
        ),
        pytest.param(
            ("--data.val_fraction=1.5",),
            "val_fraction must be in [0, 1), got 1.5.",
            id="val_fraction_out_of_range",  # a plain ValueError in the datamodule constructor
        ),
        pytest.param(
            ("--data.max_prompt_length=48",),
            "max_prompt_length (48) must be positive and smaller than max_length (48), so that "
            "every response keeps at least one token.",
            id="prompt_not_shorter_than_max_length",
        ),
        pytest.param(
            (
                "--data.rewards=treg_lightning.rewards.ContrastiveRewards",
                "--data.rewards.template=contrastive",
            ),
            "Unknown contrastive template preset 'contrastive'; choose one of ['instruct', "
            "'revise'] or pass a ContrastiveTemplate(better=..., worse=..., mode=...).",
            id="unknown_template",
        ),
        pytest.param(
            ("--model.torch_dtype=float12",),
            "Unknown torch_dtype 'float12'; use one of ",
            id="unknown_dtype",
        ),
        pytest.param(
            ("--trainer.devices=0",),
            "`Trainer(devices='0')` value is not a valid input using cpu accelerator.",
            id="lightning_misconfiguration",
        ),
        pytest.param(
            ("--model.loss=treg_lightning.losses.DPOLoss", "--model.live_reference=false"),
            "DPOLoss needs reference log-probabilities, but model.live_reference",
            id="reference_needed_but_none",
        ),
    ],
)
def test_bad_config_value_is_one_paragraph_and_status_2(setup, capsys, extra, expected):
    with no_model_load():
        status, err = treg(setup(*extra), capsys)
    assert status == 2
    assert error_paragraph(err).startswith(expected)
    assert_nothing_written(setup.tmp)


def test_annotate_without_token_rewards(setup, capsys):
    with no_model_load():
        status, err = treg(setup(subcommand="annotate"), capsys)  # base args: rewards null
    assert status == 2
    assert error_paragraph(err).startswith(
        "treg annotate builds the token-reward cache, but data.rewards is null"
    )


def test_parse_errors_are_short_and_suggest_the_key(setup, capsys):
    status, err = treg(setup("--data.max_lenght=64"), capsys)
    assert status == 2
    # The error and the --help tip, not the ~80-line usage of every option.
    assert err.strip().splitlines() == [
        "tip: For details of accepted options run: treg fit --help",
        "error: unrecognized arguments: --data.max_lenght=64. Did you mean '--data.max_length'?",
    ]
    status, err = treg(setup("--data.batch_size=two"), capsys)
    assert status == 2 and len(err.strip().splitlines()) == 3
    assert "Parser key \"data.batch_size\":\n  Expected a <class 'int'>. Got value: two" in err


def test_choice_error_of_an_optional_class_is_the_class_error(setup, capsys):
    status, err = treg(setup("--guard.action=halt"), capsys)
    assert status == 2
    # Not jsonargparse's dump of every Union subtype tried and the value's repr.
    assert err[err.index("error: ") :].strip() == (
        'error: Parser key "guard": Problem with given class_path '
        "'treg_lightning.training.guards.NonFiniteGuard':\n"
        '    Parser key "action":\n'
        "      Expected a typing.Literal['stop', 'skip']. Got value: halt"
    )


# --- bad data, missing and broken files, folders ---------------------------------------------


def test_missing_data_file(setup, capsys):
    missing = setup.tmp / "missing.jsonl"
    with no_model_load():
        status, err = treg(setup(f"--data.source={missing}"), capsys)
    assert status == 2
    assert error_paragraph(err).startswith(f"{missing}: no such file or folder. Pass an existing")


def test_truncated_jsonl(setup, capsys):
    data = setup.tmp / "cut.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "cho')
    with no_model_load():
        status, err = treg(setup(f"--data.source={data}"), capsys)
    assert status == 2
    assert error_paragraph(err) == (
        "cut.jsonl line 2: invalid JSON (Unterminated string starting at, column 17); the "
        "file may be truncated. Each line of a .jsonl file must be one complete JSON object."
    )


# A pandas CSV of message lists whose cells were cut (no closing bracket in the prompt).
CUT_CELL = "\"[{'role': 'user', 'content': 'Hi'}\""
ANSWER_CELL = "\"[{'role': 'assistant', 'content': 'A'}]\""


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        pytest.param(
            "qa.csv",
            "question,chosen,rejected\nWhat is 2+2?,4,5\nName a color.,Blue.,Nine.\n",
            "qa.csv row 0, field 'prompt': no 'prompt' column; the file has columns ['question', "
            "'chosen', 'rejected']. Rename 'question' to 'prompt'",
            id="prompt_column_under_another_name",
        ),
        pytest.param(
            "flat.csv",
            ",prompt,chosen,rejected\n"
            + "".join(f"{i},{CUT_CELL},{ANSWER_CELL},{ANSWER_CELL}\n" for i in range(3)),
            "flat.csv: no usable pairs left: skipped 3 of 3 rows: 3 message list stored as "
            "unreadable text (rows 0, 1, 2).",
            id="flattened_message_lists_that_cannot_be_read_back",  # every row refused
        ),
    ],
)
def test_unusable_csv(setup, capsys, name, text, expected):
    data = setup.tmp / name
    data.write_text(text)
    with no_model_load():
        status, err = treg(setup(f"--data.source={data}"), capsys)
    assert status == 2
    assert error_paragraph(err).startswith(expected)


def test_missing_model_path(setup, capsys):
    missing = setup.tmp / "no-model"
    args = [f"--model.model={missing}" if "--model.model=" in a else a for a in setup()]
    with no_model_load():
        status, err = treg(args, capsys)
    assert status == 2
    assert error_paragraph(err).startswith(f"Model path {missing} does not exist")


def test_unwritable_output_folder(setup, capsys):
    (setup.tmp / "a-file").write_text("")
    bad = setup.tmp / "a-file" / "out"
    with no_model_load():
        status, err = treg(setup(f"--trainer.default_root_dir={bad}"), capsys)
    assert status == 2
    assert error_paragraph(err).startswith(f"cannot write to {bad} (trainer.default_root_dir)")


def test_cache_error(setup, capsys):
    from treg_lightning.rewards.cache import CacheError

    message = "The token-reward cache /x is not a treg-lightning token-reward cache."
    with mock.patch(
        "treg_lightning.rewards.contrastive.load_or_build", side_effect=CacheError(message)
    ):
        status, err = treg(setup(*annotate_args(setup.tmp)), capsys)
    assert status == 2 and error_paragraph(err) == message


def test_non_finite_guard_stop(setup, capsys):
    with mock.patch("treg_lightning.training.guards.grads_are_finite", return_value=False):
        status, err = treg(setup(), capsys)
    assert status == 2
    assert error_paragraph(err).startswith(
        "non-finite gradients at global step 0 (epoch 0, batch 0, dataset rows ["
    )


# --- bugs keep their traceback; TREG_DEBUG / --debug show it for user errors too ---------------


def _torch_value_error(*args, **kwargs):
    import torch

    # A ValueError raised deep inside torch: a bug, not a user error.
    return torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(5).long())


def test_a_bug_keeps_its_traceback(setup, capsys):
    with (
        mock.patch.object(sys, "argv", ["treg"]),
        mock.patch("treg_lightning.module.PreferenceModule.forward_logps", _torch_value_error),
        pytest.raises(ValueError, match=r"Expected input batch_size \(2\) to match target"),
    ):
        cli_main(setup())
    assert "error: " not in capsys.readouterr().err


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_shows_the_traceback_of_a_user_error(setup, capsys, monkeypatch, how):
    args = setup("--model.regularizer.alpha=-0.5")
    if how == "env":
        monkeypatch.setenv("TREG_DEBUG", "1")
    else:
        args.append("--debug")
    with no_model_load():
        status, err = treg(args, capsys)
    assert status == 2
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().endswith("error: TokenRewardRegularizer: alpha must be >= 0, got -0.5.")


# --- Ctrl-C and SIGTERM: what was kept, how to resume ----------------------------------------


def _interrupt_at_step(step: int, how):
    """A forward pass that interrupts the run at global step `step`."""
    from treg_lightning.module import PreferenceModule

    real = PreferenceModule.forward_logps

    def forward(self, batch):
        if self.trainer.global_step == step:
            how()
        return real(self, batch)

    return forward


def _ctrl_c():
    raise KeyboardInterrupt


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize(("how", "status"), [(_ctrl_c, 130), (_sigterm, 143)], ids=["int", "term"])
def test_interrupted_fit_names_the_checkpoint_to_resume_from(setup, capsys, how, status):
    ckpt_dir = setup.tmp / "ckpt"
    args = setup(
        "--trainer.max_steps=6",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={ckpt_dir}",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_last=true",
    )
    forward = _interrupt_at_step(2, how)
    with mock.patch("treg_lightning.module.PreferenceModule.forward_logps", forward):
        code, err = treg(args, capsys)
    last = ckpt_dir / "last.ckpt"
    assert code == status and last.is_file()
    assert "Traceback" not in err
    tail = err[err.index("Interrupted: ") :].strip().splitlines()
    assert tail == [
        "Interrupted: `treg fit` stopped at global step 2.",
        f"Kept: the last checkpoint {last}. Resume with the same command plus --ckpt_path {last}.",
    ]
    import torch

    assert torch.load(last, weights_only=True)["global_step"] == 2


def test_interrupted_annotate_names_the_finished_chunks(setup, capsys):
    from treg_lightning.rewards import annotate

    real_score, calls = annotate._score_batch, []

    def score(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_score(*args, **kwargs)

    args = setup(*annotate_args(setup.tmp), "--data.rewards.chunk_pairs=1", subcommand="annotate")
    with mock.patch.object(annotate, "_score_batch", score):
        code, err = treg(args, capsys)
    (work,) = (setup.tmp / "cache").glob("*/work")
    chunks = sorted(work.glob("chunk-*.safetensors"))
    assert code == 130 and chunks
    assert err[err.index("Interrupted: ") :].strip().splitlines() == [
        "Interrupted: `treg annotate` stopped.",
        f"Kept: {len(chunks)} finished annotation chunk(s) in {work}; rerun the same command "
        "(or `treg annotate`) and only the missing chunks are computed.",
    ]


# --- the real command --------------------------------------------------------------------------


def test_subprocess_user_error_exits_2_without_traceback(setup):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    env.pop("TREG_DEBUG", None)
    args = setup("--model.regularizer.alpha=-0.5")
    result = subprocess.run(
        [sys.executable, "-m", "treg_lightning.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: TokenRewardRegularizer: alpha must be >= 0, got -0.5."
    )
    assert_nothing_written(setup.tmp)
