"""`treg evaluate`'s inputs and outputs checked at start-up: a user's PNGs are never replaced
without --output.overwrite, two runs of one name are refused, and a missing reward-model folder, an
empty or non-JSON predictions file, a pairs file given as predictions, a missing reference file
or a truncated checkpoint is refused with a message; nothing is loaded or written."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest

from builders import no_model_load, write_pairs
from treg_lightning.answers import plots
from treg_lightning.cli.main import cli_main


def answers(path: Path, n: int = 2) -> Path:
    rows = [{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def evaluate_args(model_dir: Path, root: Path, runs: list[dict], *extra: str) -> list[str]:
    data = write_pairs(root / "pairs.jsonl", n=6)
    return [
        "evaluate",
        f"--model.model={model_dir}",
        f"--data.source={data}",
        "--data.rewards=null",
        "--model.regularizer.alpha=0",
        "--data.max_length=48",
        "--data.max_prompt_length=24",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={root}",
        f"--runs={json.dumps(runs)}",
        f"--output.path={root / 'report'}",
        *extra,
    ]


def refused(args: list[str], capsys) -> str:
    """Exit 2, no traceback, no model (policy or reward model) loaded; the message."""
    with (
        no_model_load(
            "treg_lightning.module.PreferenceModule.build_policy",
            "treg_lightning.answers.reward_model.RewardModelScorer.__init__",
        ),
        mock.patch.object(sys, "argv", ["treg"]),
        pytest.raises(SystemExit) as info,
    ):
        cli_main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1].removeprefix("error: ")


@pytest.mark.parametrize("png", ["curves.png", "evaluation.png"])
def test_a_users_png_is_not_replaced(png, tiny_model_dir, tmp_path, capsys):
    report = tmp_path / "report"
    report.mkdir()
    (report / png).write_bytes(b"my own figure")
    (tmp_path / "logs").mkdir()
    runs = [{"name": "a", "predictions": str(answers(tmp_path / "a.jsonl")),
             "log_dir": str(tmp_path / "logs")}]  # fmt: skip
    message = refused(evaluate_args(tiny_model_dir, tmp_path, runs), capsys)
    assert message == (
        f"{report / png} exists: evaluate never writes over a report or a file of that name. "
        "Choose another --output.path or pass --output.overwrite true."
    )
    assert sorted(p.name for p in report.iterdir()) == [png]
    assert (report / png).read_bytes() == b"my own figure"


def test_two_runs_of_one_name_are_refused(tiny_model_dir, tmp_path, capsys):
    runs = [
        {"name": "a", "predictions": str(answers(tmp_path / "a.jsonl"))},
        {"name": "a", "predictions": str(answers(tmp_path / "b.jsonl"))},
    ]
    message = refused(evaluate_args(tiny_model_dir, tmp_path, runs), capsys)
    assert message == (
        "--runs: runs 1 and 2 are both named 'a'; each run is one row of the table, found by "
        "its name, so the second would replace the first's answers. Give every run its own name."
    )
    assert not (tmp_path / "report").exists()


def test_a_run_named_reference_beside_reference_answers(tiny_model_dir, tmp_path, capsys):
    runs = [{"name": "reference", "predictions": str(answers(tmp_path / "a.jsonl"))}]
    extra = f"--evaluate.reference={answers(tmp_path / 'ref.jsonl')}"
    message = refused(evaluate_args(tiny_model_dir, tmp_path, runs, extra), capsys)
    assert message.startswith("--runs: run 1 is named 'reference', the name of the row")


def _predictions_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    path = tmp_path / "a.jsonl"
    if case == "empty":
        path.write_text("")
        return path, f"run 'a': predictions {path} is empty: it holds no answers."
    if case == "not json":
        path.write_text('{"instruction": "x", "output": "y"}\nnot json\n')
        return path, f"run 'a': predictions {path} line 2 is not JSON (Expecting value)"
    if case == "pairs":
        write_pairs(path, n=2)
        return path, f"run 'a': predictions {path} is a file of preference pairs (line 1 has"
    return tmp_path / "missing.jsonl", f"run 'a': predictions {tmp_path / 'missing.jsonl'} does "
    "not exist: give the answers file written by treg predict"


@pytest.mark.parametrize("case", ["empty", "not json", "pairs", "missing"])
def test_bad_predictions_file(case, tiny_model_dir, tmp_path, capsys):
    path, start = _predictions_case(tmp_path, case)
    runs = [{"name": "a", "predictions": str(path)}]
    message = refused(evaluate_args(tiny_model_dir, tmp_path, runs), capsys)
    assert message.startswith(start)
    assert not (tmp_path / "report").exists()


def test_missing_reference_file(tiny_model_dir, tmp_path, capsys):
    runs = [{"name": "a", "predictions": str(answers(tmp_path / "a.jsonl"))}]
    missing = tmp_path / "reference.jsonl"
    extra = f"--evaluate.reference={missing}"
    message = refused(evaluate_args(tiny_model_dir, tmp_path, runs, extra), capsys)
    assert message.startswith(
        f"--evaluate.reference {missing} does not exist: give the answers file"
    )


def test_missing_reward_model_folder(tiny_model_dir, tmp_path, capsys):
    runs = [{"name": "a", "predictions": str(answers(tmp_path / "a.jsonl"))}]
    missing = tmp_path / "rm"
    extra = f"--evaluate.reward_model={missing}"
    message = refused(evaluate_args(tiny_model_dir, tmp_path, runs, extra), capsys)
    assert message == (
        f"--evaluate.reward_model {missing} does not exist (or is not a folder): give the folder "
        "of a sequence-classification reward model written by save_pretrained, or a Hugging Face "
        "hub id."
    )


def test_truncated_checkpoint(tiny_model_dir, tmp_path, capsys):
    import torch

    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {"policy.w": torch.zeros(64, 64)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    runs = [{"name": "a", "ckpt_path": str(ckpt)}]
    message = refused(evaluate_args(tiny_model_dir, tmp_path, runs), capsys)
    assert message.startswith(f"run 'a': ckpt_path {ckpt} is truncated (")


def test_plots_out_refuses_an_existing_file(tmp_path, capsys):
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,train/loss_step\n0,0,0.7\n0,1,0.6\n")
    out = tmp_path / "mine.png"
    out.write_bytes(b"my own figure")
    with pytest.raises(SystemExit) as info:
        plots.main([str(log), "--out", str(out)])
    assert info.value.code == 2
    assert f"error: {out} (--out) exists; the plot would replace it." in capsys.readouterr().err
    assert out.read_bytes() == b"my own figure"
    plots.main([str(log), "--out", str(out), "--overwrite"])
    assert out.read_bytes()[:4] == b"\x89PNG"
