"""`python -m treg_lightning.answers.plots` on logs it cannot draw: a folder without metrics, a
path that does not exist, a file of another kind, an empty metrics.csv, one with no column a panel
draws or a value that is not a number, two runs of the same name, an --out that is a folder. Each
ends with `error:` naming the log and what was expected, exit status 2, no traceback and no PNG
written; a path with `=` in it and a TensorBoard event file given directly are read."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest

from treg_lightning.answers import plots

LOG = "epoch,step,train/loss_step,val/loss\n0,0,0.7,\n0,1,0.6,0.65\n"


def refused(capsys, *argv: str) -> str:
    """main(argv) exits 2 with no traceback; returns the message after `error: `."""
    with pytest.raises(SystemExit) as info:
        plots.main(list(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    prefix = "python -m treg_lightning.answers.plots: error: "
    assert last.startswith(prefix)
    return last[len(prefix) :]


@pytest.fixture
def out(tmp_path) -> Path:
    yield tmp_path / "curves.png"
    assert not (tmp_path / "curves.png").exists()  # nothing drawn for a refused log


def test_folder_without_metrics(tmp_path, out, capsys):
    folder = tmp_path / "logs"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"PK")
    assert refused(capsys, str(folder), "--out", str(out)) == (
        f"{folder} holds no metrics.csv (CSVLogger) and no TensorBoard event file "
        "(events.out.tfevents.*), in it or in its subfolders: give the run's log folder "
        "(trainer.logger save_dir) or its metrics.csv."
    )


def test_path_that_does_not_exist(tmp_path, out, capsys):
    missing = tmp_path / "runs" / "version_9"
    assert refused(capsys, str(missing), "--out", str(out)) == (
        f"{missing} does not exist: give the run's log folder (trainer.logger save_dir, e.g. "
        "outputs/demo/logs/version_0) or its metrics.csv."
    )


def test_file_of_another_kind(tmp_path, out, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("model: {}\n")
    assert refused(capsys, str(config), "--out", str(out)) == (
        f"{config} is neither a metrics.csv (CSVLogger) nor a TensorBoard event file "
        "(events.out.tfevents.*): give the run's log folder (trainer.logger save_dir) or its "
        "metrics.csv."
    )


@pytest.mark.parametrize("text", ["", "epoch,step,train/loss_step\n", "epoch,step,lr\n0,0,\n"])
def test_empty_metrics_csv(text, tmp_path, out, capsys):
    log = tmp_path / "metrics.csv"
    log.write_text(text)
    assert refused(capsys, str(tmp_path), "--out", str(out)) == (
        f"run '{tmp_path.name}': {tmp_path} holds no metric values (an empty file, or a run "
        "stopped before its first log). Each panel draws train/<metric>_step (or "
        "train/<metric>) and val/<metric> for <metric> in loss, reward_accuracy, margin, treg, "
        "token_reward_pearson, as PreferenceModule logs them: give the log of a `treg fit` run "
        "that logged at least one step (trainer.log_every_n_steps)."
    )


def test_metrics_with_no_column_a_panel_draws(tmp_path, out, capsys):
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,lr-AdamW,train/accuracy\n0,0,0.1,0.5\n")
    message = refused(capsys, f"mine={log}", "--out", str(out))
    assert message.startswith(
        f"run 'mine': {log} holds none of the metrics the plot draws (it has ['lr-AdamW', "
        "'train/accuracy']). Each panel draws train/<metric>_step (or train/<metric>)"
    )


def test_value_that_is_not_a_number(tmp_path, out, capsys):
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,train/loss_step\n0,0,0.7\n0,1,nan?\n")
    assert refused(capsys, str(log), "--out", str(out)) == (
        f"{log} line 3, column 'train/loss_step': 'nan?' is not a number, and a CSVLogger "
        "metrics.csv holds numbers only: give the run's metrics.csv (or its log folder)."
    )


def test_two_runs_of_the_same_name(tmp_path, out, capsys):
    """Both named after their folder `logs`: one would silently replace the other."""
    first, second = tmp_path / "dpo" / "logs", tmp_path / "treg" / "logs"
    for folder in (first, second):
        folder.mkdir(parents=True)
        (folder / "metrics.csv").write_text(LOG)
    assert refused(capsys, str(first), str(second), "--out", str(out)) == (
        f"{first} and {second} are both named 'logs' (a run is named after its folder or file): "
        f"name them, e.g. a={first} b={second}."
    )


def test_out_that_is_a_folder(tmp_path, capsys):
    log = tmp_path / "metrics.csv"
    log.write_text(LOG)
    folder = tmp_path / "figures"
    folder.mkdir()
    assert refused(capsys, str(log), "--out", str(folder), "--overwrite") == (
        f"{folder} (--out) is a folder: give the PNG file to write, e.g. {folder / 'curves.png'}."
    )
    assert list(folder.iterdir()) == []


def test_runs_named_and_a_path_with_an_equals_sign_are_drawn(tmp_path):
    odd = tmp_path / "lr=1e-4" / "logs"  # exists: read as a path, not as NAME=PATH
    odd.mkdir(parents=True)
    (odd / "metrics.csv").write_text(LOG)
    other = tmp_path / "other.csv"
    other.write_text(LOG)
    seen = {}
    real = plots.plot_curves

    def spy(runs, path, title=None):
        seen.update(runs)
        return real(runs, path, title)

    with mock.patch.object(plots, "plot_curves", side_effect=spy):
        path = plots.main([str(odd), f"dpo={other}", "--out", str(tmp_path / "c.png")])
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert seen == {
        "logs": {"train/loss_step": [(0, 0.7), (1, 0.6)], "val/loss": [(1, 0.65)]},
        "dpo": {"train/loss_step": [(0, 0.7), (1, 0.6)], "val/loss": [(1, 0.65)]},
    }


def test_tensorboard_event_file_given_directly(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    for step, value in enumerate((0.7, 0.6, 0.5)):
        writer.add_scalar("train/loss_step", value, step)
    writer.close()
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    series = plots.read_metrics(events)
    assert [s for s, _ in series["train/loss_step"]] == [0, 1, 2]
    values = [v for _, v in series["train/loss_step"]]
    assert values == pytest.approx([0.7, 0.6, 0.5], abs=1e-7)  # stored as float32
    assert plots.main([str(events), "--out", str(tmp_path / "c.png")]).is_file()


def test_tensorboard_events_without_tensorboard_installed(tmp_path, out, capsys):
    folder = tmp_path / "tb"
    folder.mkdir()
    (folder / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    with mock.patch("importlib.util.find_spec", return_value=None):
        message = refused(capsys, str(folder), "--out", str(out))
    assert message == (
        f"{folder} holds TensorBoard event files, and reading them needs the tensorboard "
        "package: pip install 'treg-lightning[tensorboard]'."
    )


def test_module_entry_point_exits_2_without_a_traceback(tmp_path):
    """`python -m treg_lightning.answers.plots <folder without metrics>` as a user runs it."""
    import subprocess
    import sys

    from builders import checkout_env

    folder = tmp_path / "empty"
    folder.mkdir()
    command = [sys.executable, "-m", "treg_lightning.answers.plots", str(folder)]
    done = subprocess.run(
        command, cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"error: {folder} holds no metrics.csv (CSVLogger)" in done.stderr
    assert not (tmp_path / "curves.png").exists()
