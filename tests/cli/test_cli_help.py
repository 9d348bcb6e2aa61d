"""`treg fit --help` lists the preference losses and every `data.*` argument; a normal run is
quiet (known third-party noise filtered, no empty-validation warning); `data_parallel_size`
follows devices x nodes."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

from treg_lightning.cli.main import TRegCLI, cli_main
from treg_lightning.cli.noise import KNOWN_LOG_LINES, KNOWN_WARNINGS, known_noise_hidden
from treg_lightning.losses.base import LossOutput, PreferenceLossModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class ListedLoss(PreferenceLossModule):
    """A user loss deriving from the base: listed by --help."""

    needs_reference = False

    def forward(self, *args, **kwargs) -> LossOutput:
        raise NotImplementedError


class PlainLoss(torch.nn.Module):
    """A user loss following the protocol without the base: accepted by class_path."""

    needs_reference = False

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale


def help_text(subcommand: str = "fit") -> str:
    out = io.StringIO()
    with (
        mock.patch.object(sys, "argv", ["treg"]),
        contextlib.redirect_stdout(out),
        pytest.raises(SystemExit),
    ):
        cli_main([subcommand, "--help"])
    return out.getvalue()


def test_loss_help_lists_the_preference_losses_only():
    text = help_text()
    section = text[text.index("  --model.loss LOSS") : text.index("  --model.regularizer.help")]
    listed = section[section.index("known subclasses:") :].replace("\n", " ")
    names = sorted(name.strip(" ,)") for name in listed.split(":", 1)[1].split())
    ours = [name for name in names if name.startswith(("treg_lightning.", f"{__name__}."))]
    assert ours == [
        f"{__name__}.ListedLoss",
        "treg_lightning.losses.DPOLoss",
        "treg_lightning.losses.IPOLoss",
        "treg_lightning.losses.SimPOLoss",
    ]
    # Losses other test modules define are listed too when pytest has imported them: each
    # listed name must still be a preference loss.
    for name in set(names) - set(ours):
        module, _, cls = name.rpartition(".")
        assert issubclass(getattr(sys.modules[module], cls), PreferenceLossModule), name
    assert "torch.nn.Linear" not in text


def test_a_user_loss_by_class_path_without_the_base(tiny_model_dir):
    with mock.patch.object(sys, "argv", ["treg"]):
        cli = TRegCLI(
            args=[
                f"--model.model={tiny_model_dir}",
                f"--model.loss={__name__}.PlainLoss",
                "--model.loss.scale=2.5",
                "--trainer.accelerator=cpu",
            ],
            run=False,
        )
    assert type(cli.model.loss) is PlainLoss and cli.model.loss.scale == 2.5


def test_every_data_argument_is_documented():
    from treg_lightning.data.datamodule import PreferenceDataModule

    text = help_text()
    names = [n for n in inspect.signature(PreferenceDataModule.__init__).parameters if n != "self"]
    missing = [name for name in names if f"  --data.{name} " not in text]
    assert not missing
    # The linked one says where its value comes from.
    entry = text[text.index("  --data.tokenizer TOKENIZER") : text.index("  --data.split")]
    assert "Set from --model.model: change that one" in " ".join(entry.split())


# --- a quiet run --------------------------------------------------------------------------------


def test_known_noise_filter_is_narrow():
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # as if nothing else filtered
        with known_noise_hidden():
            for category, start, _ in KNOWN_WARNINGS:
                warnings.warn(start + " ...", category, stacklevel=1)
            warnings.warn("No seed found, seed set to 3", DeprecationWarning, stacklevel=1)
            warnings.warn("A new Lightning warning", UserWarning, stacklevel=1)
        warnings.warn(KNOWN_WARNINGS[0][1], KNOWN_WARNINGS[0][0], stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "No seed found, seed set to 3",  # same text, other category: shown
        "A new Lightning warning",
        KNOWN_WARNINGS[0][1],  # outside the CLI nothing is filtered
    ]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        with known_noise_hidden():
            for _, start, _ in KNOWN_LOG_LINES:
                logger.info(start + " try our cloud")
            logger.info("GPU available: False, used: False")
        logger.info("💡 Tip: outside the CLI nothing is filtered")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "GPU available: False, used: False",
        "💡 Tip: outside the CLI nothing is filtered",
    ]


def test_a_normal_run_prints_no_known_noise(tiny_model_dir, tmp_path, capsys, caplog):
    rows = [
        {"prompt": f"Add {i}.", "chosen": f"{i}.", "rejected": "No" * (i + 1)} for i in range(4)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = [
        "fit",
        f"--model.model={tiny_model_dir}",
        f"--data.source={data}",
        "--data.rewards=null",
        "--model.regularizer.alpha=0",  # plain loss: the data carries no token rewards
        "--data.max_length=48",
        "--data.max_prompt_length=24",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught, mock.patch.object(sys, "argv", ["treg"]):
        warnings.simplefilter("always")
        cli_main(args)
    captured = capsys.readouterr()
    shown = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    shown += [captured.out, captured.err]
    noise = [start for _, start, _ in KNOWN_WARNINGS + KNOWN_LOG_LINES]
    noise.append("Total length of `")  # our empty validation loader, avoided
    assert not [text for text in shown for start in noise if start in text]
    assert any("Seed set to" in text for text in shown)  # Lightning's own lines still show


# --- data_parallel_size -----------------------------------------------------------------------


def strategy_of(*args: str, model_dir: Path):
    with mock.patch.object(sys, "argv", ["treg"]):
        cli = TRegCLI(
            args=[
                f"--config={CONFIGS / 'strategy' / 'fsdp2.yaml'}",
                f"--model.model={model_dir}",
                "--model.fsdp_param_dtype=null",
                "--trainer.accelerator=cpu",
                *args,
            ],
            run=False,
        )
    return cli.trainer.strategy


def test_data_parallel_size_follows_devices_and_nodes(tiny_model_dir):
    for devices, nodes in ((2, 1), (1, 3)):
        strategy = strategy_of(
            f"--trainer.devices={devices}", f"--trainer.num_nodes={nodes}", model_dir=tiny_model_dir
        )
        assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (
            devices * nodes,
            1,
        )
    given = strategy_of(
        "--trainer.devices=2",
        "--trainer.strategy.data_parallel_size=1",
        "--trainer.strategy.tensor_parallel_size=2",
        model_dir=tiny_model_dir,
    )
    assert (given._data_parallel_size, given._tensor_parallel_size) == (1, 2)  # set: kept


def test_devices_not_divisible_by_tensor_parallel_size(tiny_model_dir, capsys):
    args = [
        "fit",
        f"--config={CONFIGS / 'strategy' / 'fsdp2.yaml'}",
        f"--model.model={tiny_model_dir}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=3",
        "--trainer.strategy.tensor_parallel_size=2",
    ]
    with mock.patch.object(sys, "argv", ["treg"]), pytest.raises(SystemExit) as info:
        cli_main(args)
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: ModelParallelStrategy: 3 devices (trainer.devices x trainer.num_nodes) cannot be "
        "split into groups of tensor_parallel_size=2; choose a divisor of 3, or set "
        "data_parallel_size yourself."
    )
