"""Every verb reads checkpoints through one reader (treg_lightning.models.checkpoints): `treg
predict` and `treg evaluate` take a LoRA checkpoint (adapters only) like `validate` does, and a
checkpoint in an older format (regularizer.token_rewards, old module paths) like `fit` does."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

pytest.importorskip("peft", reason="the LoRA checkpoint needs peft (the `lora`/`dev` extra)")

from builders import CLI_PAIRS, tiny_fit_args, write_pairs  # noqa: E402
from treg_lightning.cli.main import TRegCLI, cli_main  # noqa: E402

LORA_ARGS = [
    "--model.peft=peft.LoraConfig",
    "--model.peft.r=4",
    "--model.peft.lora_alpha=8",
    "--model.peft.target_modules=[q_proj,v_proj]",
]
DATA = ["--data.max_length=96", "--data.max_prompt_length=64", "--data.val_fraction=0.3"]


def treg(args: list[str]) -> TRegCLI | None:
    with mock.patch.object(sys, "argv", ["treg"]):
        return TRegCLI(args=args) if args[0] == "fit" else cli_main(args)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """A LoRA run (its checkpoint holds the adapters only) and a full run, each exported as a
    Hugging Face folder, and the full run's checkpoint rewritten in the older format."""
    root = tmp_path_factory.mktemp("reader")
    data = write_pairs(root / "pairs.jsonl", rows=CLI_PAIRS)
    out = {"root": root, "data": data}
    for name, extra in (("lora", LORA_ARGS), ("full", [])):
        args = tiny_fit_args(tiny_model_dir, data, root / name, *DATA, *extra, lr=0.05,
                             max_steps=2)  # fmt: skip
        fit = treg(["fit", *args])
        ckpt = Path(fit.trainer.checkpoint_callback.best_model_path)
        folder = root / f"{name}-export"
        treg(["export", *args, f"--ckpt_path={ckpt}", f"--output.path={folder}"])
        out[name] = {"args": args, "ckpt": ckpt, "export": folder}
    old = torch.load(out["full"]["ckpt"], weights_only=True)
    hparams = old["hyper_parameters"]
    init = dict(hparams["regularizer"]["init_args"])
    init.pop("targets", None)
    hparams["regularizer"] = {
        "class_path": "treg_lightning.losses.TokenRewardRegularizer",
        "init_args": {**init, "token_rewards": "self"},  # before targets were classes
    }
    hparams["scheduler"] = {"class_path": "treg_lightning.schedulers.WarmupCosineLR"}
    out["old"] = root / "old.ckpt"
    torch.save(old, out["old"])
    return out


def predict(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    treg([
        "predict", f"--model.model={model}", f"--data.source={data}", *DATA,
        "--trainer.accelerator=cpu", "--trainer.logger=false", f"--output.path={output}",
        "--sampling.max_new_tokens=6", "--generation.batch_size=2", "--generation.progress=false",
        *extra,
    ])  # fmt: skip
    return [json.loads(line)["output"] for line in output.read_text().splitlines()]


@pytest.mark.parametrize("run", ["lora", "full"])
def test_predict_from_a_checkpoint_equals_its_export(runs, tiny_model_dir, run):
    root, data = runs["root"], runs["data"]
    from_ckpt = predict(
        tiny_model_dir, data, root / f"{run}-ckpt.jsonl", f"--ckpt_path={runs[run]['ckpt']}",
        *(LORA_ARGS if run == "lora" else []),
    )  # fmt: skip
    exported = predict(runs[run]["export"], data, root / f"{run}-folder.jsonl")
    assert len(from_ckpt) == 3 and from_ckpt == exported


def test_predict_from_an_older_checkpoint(runs, tiny_model_dir):
    root, data = runs["root"], runs["data"]
    old = predict(tiny_model_dir, data, root / "old.jsonl", f"--ckpt_path={runs['old']}")
    assert old == predict(runs["full"]["export"], data, root / "old-folder.jsonl")


def evaluate(args: list[str], runs_setting: list[dict], output: Path, *extra: str) -> dict:
    treg(["evaluate", *args, f"--runs={json.dumps(runs_setting)}", f"--output.path={output}",
          "--trainer.enable_progress_bar=false", *extra])  # fmt: skip
    rows = json.loads((output / "evaluation.json").read_text())
    return {row["run"]: row for row in rows}


@pytest.mark.parametrize("run", ["lora", "old"])
def test_evaluate_reads_lora_and_older_checkpoints(runs, run):
    """The held-out pair metrics of a checkpoint equal those of its exported folder."""
    ckpt = runs["old"] if run == "old" else runs[run]["ckpt"]
    source = "lora" if run == "lora" else "full"
    args = [a for a in runs[source]["args"] if not a.startswith("--trainer.max_steps")]
    export = str(runs[source]["export"])
    got = evaluate(
        args,
        [{"name": "ckpt", "ckpt_path": str(ckpt)}, {"name": "folder", "policy": export}],
        runs["root"] / f"report-{run}",
    )
    pairs = {name: row["pairs"] for name, row in got.items()}
    assert set(pairs["ckpt"]) >= {"reward_accuracy", "margin"}
    for key, value in pairs["ckpt"].items():
        assert value == pytest.approx(pairs["folder"][key], rel=1e-4, abs=1e-5), key
