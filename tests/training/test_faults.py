"""Faults during a run: SIGKILL mid-epoch then resume, NaN steps, unwritable folders, full disk.

Each test asserts what the user gets: the resumed run equals the one that never stopped, the
error names the step / rows / folder / file and what to do, and nothing already finished (the
last checkpoint, finished annotation chunks) is lost.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from builders import checkout_env, imported_from_checkout, no_model_load, tiny_fit_args, write_pairs
from treg_lightning.cli.main import TRegCLI
from treg_lightning.module import PreferenceModule
from treg_lightning.outputs import OutputFolderError
from treg_lightning.training.guards import NonFiniteError, NonFiniteGuard

PAIRS = 12  # 6 batches of 2 per epoch

# Callbacks for the `treg fit` subprocesses (the module is written beside the run, on PYTHONPATH).
FAULTKIT = '''
import json, time
import lightning as L
import treg_lightning

class LossLog(L.Callback):
    """Append {"step", "loss"} per training step to a JSON lines file, flushed at once; the
    first line says which treg_lightning the process imported."""
    def __init__(self, path: str):
        self.path = path
    def on_train_start(self, trainer, pl_module):
        with open(self.path, "a") as f:
            f.write(json.dumps({"treg_lightning": treg_lightning.__file__}) + "\\n")
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = {"step": trainer.global_step, "loss": float(outputs["loss"])}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\\n")

class PauseAt(L.Callback):
    """Before step `step` + 1 (so step `step`'s checkpoint is on disk): mark, then hang."""
    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            open(self.marker, "w").close()
            time.sleep(600)
'''


def base_args(model_dir: Path, data: Path, root: Path) -> list[str]:
    """Plain SimPO at lr 0.01, no validation; each test sets its own trainer.max_steps."""
    return tiny_fit_args(
        model_dir, data, root, "--trainer.limit_val_batches=0", lr=0.01, max_steps=None
    )


def cli(args: list[str], **kwargs) -> TRegCLI:
    with mock.patch.object(sys, "argv", ["treg"]):
        return TRegCLI(args=args, **kwargs)


# --- SIGKILL mid-epoch, then `treg fit --ckpt_path last.ckpt` --------------------------------


def _fit_subprocess(
    tmp_path, model_dir, data, name, max_steps, extra_callbacks=(), ckpt=None, log="losses"
):
    """`treg fit` in a subprocess, run folder `name`, per-step losses in `{name}/{log}.jsonl`."""
    run = tmp_path / name
    callbacks = [
        {"class_path": "faultkit.LossLog", "init_args": {"path": str(run / f"{log}.jsonl")}},
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(run / "ckpt"),
                "every_n_train_steps": 1,
                "save_last": True,
            },
        },
        *extra_callbacks,
    ]
    config = tmp_path / f"{name}-{log}.yaml"
    config.write_text(json.dumps({"trainer": {"callbacks": callbacks}}))  # JSON is YAML
    args = [
        sys.executable,
        "-m",
        "treg_lightning.cli.main",
        "fit",
        f"--config={config}",
        *base_args(model_dir, data, run),
        f"--trainer.max_steps={max_steps}",
    ]
    if ckpt is not None:
        args.append(f"--ckpt_path={ckpt}")
    # The checkout under test first (never an installed copy), then faultkit.py.
    env = checkout_env(tmp_path, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _losses(path: Path) -> list[tuple[int, float]]:
    """(step, loss) per logged step, in the order logged, of one run's own log."""
    header, *rows = [json.loads(line) for line in path.read_text().splitlines()]
    # The run imported the checkout under test, not an installed copy.
    assert imported_from_checkout(header["treg_lightning"]), header
    return [(row["step"], row["loss"]) for row in rows]


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    """`kill -9` a `treg fit` once step 4's checkpoint is on disk (mid-epoch: 4 of 6 batches),
    resume with --ckpt_path last.ckpt to 9 steps: the resumed run's own log holds steps 5-9,
    each once, with the losses of an uninterrupted run (within 1e-6). A resume that restarted
    from step 1, or from any other step, shows as other steps in that log."""
    (tmp_path / "faultkit.py").write_text(FAULTKIT)
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    total, kill_after = 9, 4
    straight = _fit_subprocess(tmp_path, tiny_model_dir, data, "straight", total)
    marker = tmp_path / "paused"
    pause = {
        "class_path": "faultkit.PauseAt",
        "init_args": {"step": kill_after, "marker": str(marker)},
    }
    killed = _fit_subprocess(tmp_path, tiny_model_dir, data, "run", total, [pause], log="killed")
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert killed.poll() is None, killed.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run never reached the pause"
        time.sleep(0.2)
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == kill_after
    resumed = _fit_subprocess(
        tmp_path, tiny_model_dir, data, "run", total, ckpt=last, log="resumed"
    )
    out = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert straight.wait(timeout=240) == 0, straight.communicate()[0][-3000:]

    expected = dict(_losses(tmp_path / "straight" / "losses.jsonl"))
    before = _losses(tmp_path / "run" / "killed.jsonl")
    after = _losses(tmp_path / "run" / "resumed.jsonl")
    assert sorted(expected) == list(range(1, total + 1))
    assert len(set(expected.values())) == total  # the loss moved every step
    assert [step for step, _ in before] == list(range(1, kill_after + 1))
    # The resumed run starts right after the checkpoint's step and logs each later step once.
    assert [step for step, _ in after] == list(range(kill_after + 1, total + 1))
    for step, loss in before + after:
        assert loss == pytest.approx(expected[step], abs=1e-6), step


# --- NonFiniteGuard, on by default in the CLI ------------------------------------------------


class NaNAtStep(PreferenceModule):
    """A policy whose loss turns NaN at global step 2 (0-based: the third step)."""

    def compute_loss(self, batch, stage="train"):
        loss, outputs = super().compute_loss(batch, stage)
        if stage == "train" and self.trainer.global_step == 2:
            loss = loss * float("nan")
        return loss, outputs


def test_guard_on_by_default_stops_at_nan_and_keeps_last_checkpoint(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    ckpt_dir = tmp_path / "ckpt"
    args = [
        "fit",
        *base_args(tiny_model_dir, data, tmp_path),
        "--trainer.max_steps=5",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={ckpt_dir}",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_last=true",
    ]
    with pytest.raises(NonFiniteError) as info:
        cli(args, model_class=NaNAtStep)
    message = str(info.value)
    # Names the step and the dataset rows of the batch, and says the weights are intact.
    assert "non-finite loss at global step 2 (epoch 0, batch 2, dataset rows [" in message
    assert "last checkpoint are intact" in message
    checkpoint = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    weights = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("policy.")}
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    # Loadable: `treg validate --ckpt_path` on it runs and gives a finite loss.
    validate = cli(
        [
            "validate",
            *base_args(tiny_model_dir, data, tmp_path),
            "--trainer.limit_val_batches=2",
            "--data.val_fraction=0.25",
            f"--ckpt_path={ckpt_dir / 'last.ckpt'}",
        ]
    )
    assert math.isfinite(float(validate.trainer.callback_metrics["val/loss"]))


def test_guard_is_configurable_and_can_be_disabled(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    common = [*base_args(tiny_model_dir, data, tmp_path), "--trainer.max_steps=1"]
    default = cli(common, run=False)
    skip = cli([*common, "--guard.action=skip", "--guard.max_skips=3"], run=False)
    off = cli([*common, "--guard=null"], run=False)
    guards = [c for c in default.trainer.callbacks if isinstance(c, NonFiniteGuard)]
    assert len(guards) == 1 and guards[0].action == "stop"
    (guard,) = [c for c in skip.trainer.callbacks if isinstance(c, NonFiniteGuard)]
    assert (guard.action, guard.max_skips) == ("skip", 3)
    assert not any(isinstance(c, NonFiniteGuard) for c in off.trainer.callbacks)


# --- unwritable folders and full disks --------------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    ["--trainer.default_root_dir", "--data.rewards.cache_dir"],
)
def test_unwritable_output_folder_fails_at_start_up(tiny_model_dir, tmp_path, setting):
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = blocker / "out"  # cannot be created, whatever the user's rights (tests run as root)
    args = [
        "fit",
        *base_args(tiny_model_dir, data, tmp_path),
        "--trainer.max_steps=1",
        "--data.rewards=treg_lightning.rewards.ContrastiveRewards",
        f"{setting}={bad}",
    ]
    with no_model_load(), pytest.raises(OutputFolderError) as info:  # noqa: PT012
        cli(args)
    message = str(info.value)
    assert f"cannot write to {bad} ({setting.removeprefix('--')})" in message
    assert f"set {setting.removeprefix('--')} to a folder you can write" in message


def test_export_to_unwritable_folder_fails_before_loading(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    (tmp_path / "a-file").write_text("")
    bad = tmp_path / "a-file" / "policy"
    # A checkpoint that passes the start-up checkpoint checks, so the folder check is reached.
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    torch.save({"state_dict": {f"policy.{k}": v for k, v in policy.items()}}, tmp_path / "x.ckpt")
    args = [
        "export",
        *base_args(tiny_model_dir, data, tmp_path),
        f"--ckpt_path={tmp_path / 'x.ckpt'}",
        f"--output.path={bad}",
    ]
    with no_model_load(), pytest.raises(OutputFolderError, match=f"cannot write to {bad}"):
        cli(args)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _tiny_rows(model_dir: Path, n: int):
    from treg_lightning.data.tokenize import PairTokenizer
    from treg_lightning.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    pairs = PairTokenizer(tokenizer, max_length=48, max_prompt_length=24)
    rows = []
    for i in range(n):
        messages = [{"role": "user", "content": f"Add {i} and {i}."}]
        row = {"index": i, "prompt": messages, "chosen": f"{2 * i}.", "rejected": "No."}
        row["prompt_ids"] = pairs.prompt_ids(messages)
        for side in ("chosen", "rejected"):
            ids = tokenizer(row[side], add_special_tokens=False)["input_ids"]
            row[f"{side}_ids"] = [*ids, tokenizer.eos_token_id]
        rows.append(row)
    return load_causal_lm(model_dir), tokenizer, rows


def test_disk_full_while_writing_a_chunk_keeps_finished_chunks(tiny_model_dir, tmp_path):
    from builders import Annotator
    from treg_lightning.rewards.cache import chunks

    rw_model, rw_tokenizer, rows = _tiny_rows(tiny_model_dir, 4)
    real_save = chunks.save_file
    calls = []

    def second_write_fails(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            _enospc()
        real_save(tensors, path, metadata=metadata)

    annotator = Annotator(batch_size=4, chunk_pairs=2)
    with mock.patch.object(chunks, "save_file", second_write_fails):
        with pytest.raises(OSError) as info:
            annotator(rw_model, rw_tokenizer, rows, tmp_path / "work")
    chunk = tmp_path / "work" / "chunk-000001.safetensors"
    assert info.value.errno == errno.ENOSPC
    assert str(info.value) == (
        f"no space left on device while writing {chunk}: free space or point cache_dir "
        "elsewhere; finished chunks are kept"
    )
    # The finished chunk stays, the failed one left no partial file.
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["chunk-000000.safetensors"]


def test_disk_full_while_saving_the_arrow_cache(tiny_model_dir, tmp_path):
    import datasets

    from treg_lightning.rewards.cache import load_or_build

    _, _, rows = _tiny_rows(tiny_model_dir, 2)

    def score_chunk(chunk_rows):
        return {"chosen_token_rewards": [np.zeros(len(r["chosen_ids"])) for r in chunk_rows]}

    with mock.patch.object(datasets.Dataset, "save_to_disk", _enospc):
        with pytest.raises(OSError) as info:
            load_or_build(rows, tmp_path / "cache", "f" * 64, score_chunk)
    assert info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert message.startswith(f"no space left on device while writing {tmp_path / 'cache'}/.data")
    assert message.endswith(
        "free space or point cache_dir elsewhere; finished chunks are kept in work/"
    )
    assert (tmp_path / "cache" / "work" / "fingerprint.json").is_file()  # resumable
    assert not list((tmp_path / "cache").glob(".data.tmp-*"))


def test_disk_full_while_writing_a_checkpoint(tiny_model_dir, tmp_path):
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    ckpt_dir = tmp_path / "ckpt"
    args = [
        "fit",
        *base_args(tiny_model_dir, data, tmp_path),
        "--trainer.max_steps=2",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={ckpt_dir}",
        "--trainer.callbacks.every_n_train_steps=1",
    ]
    with mock.patch.object(TorchCheckpointIO, "save_checkpoint", _enospc):
        with pytest.raises(OSError) as info:
            cli(args)
    assert info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert message.startswith(f"no space left on device while writing {ckpt_dir}/epoch=0-step=1")
    assert "free space or point the checkpoint folder" in message
