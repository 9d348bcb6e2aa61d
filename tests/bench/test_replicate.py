"""bench/replicate.py --dry-run: four variants from the same start on the same pairs, judged on
held-out pairs and answers, with the table and the plots."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "replicate.py"


def load_script():
    spec = importlib.util.spec_from_file_location("replicate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicate")
    replicate = load_script()
    replicate.main(["--dry-run", "--out", str(root / "out"), "--work-dir", str(root / "work")])
    return root


def first_step(root: Path, variant: str) -> dict[str, float]:
    from treg_lightning.answers.plots import read_metrics

    series = read_metrics(root / "work" / "logs" / variant)
    return {name: values[0][1] for name, values in series.items() if values[0][0] == 0}


def test_variants_start_from_the_same_policy_on_the_same_pairs(dry_run):
    """Step 0, policy = reference: DPO's loss is exactly log 2; a T-REG variant's first loss is
    its plain twin's plus the logged T-REG term (same start, same first batch)."""
    dpo, dpo_treg = first_step(dry_run, "dpo"), first_step(dry_run, "dpo-t-reg")
    simpo, simpo_treg = first_step(dry_run, "simpo"), first_step(dry_run, "simpo-t-reg")
    assert dpo["train/loss_step"] == pytest.approx(math.log(2), abs=1e-5)
    assert "train/treg_step" not in dpo and dpo_treg["train/treg_step"] > 0
    for plain, treg in ((dpo, dpo_treg), (simpo, simpo_treg)):
        total = plain["train/loss_step"] + treg["train/treg_step"]
        assert treg["train/loss_step"] == pytest.approx(total, abs=1e-5)
    assert simpo["train/loss_step"] != pytest.approx(dpo["train/loss_step"], abs=1e-3)


def test_table_answers_and_plots(dry_run):
    out = dry_run / "out"
    results = {r["run"]: r for r in json.loads((out / "evaluation.json").read_text())}
    assert list(results) == ["DPO", "DPO + T-REG", "SimPO", "SimPO + T-REG", "reference"]
    instructions = None
    for name, result in results.items():
        answers = [
            json.loads(line) for line in Path(result["predictions"]).read_text().splitlines()
        ]
        assert len(answers) == result["answers"]["answers"] == 4
        if instructions is None:
            instructions = [a["instruction"] for a in answers]
        assert [a["instruction"] for a in answers] == instructions  # the same prompts
        assert result["answers"]["tokens"]["mean"] <= 8  # max_new_tokens of the dry run
        if name != "reference":
            assert 0 <= result["pairs"]["reward_accuracy"] <= 1
            assert 0 <= result["reward"]["win_rate"] <= 1 and result["reward"]["n"] == 4
    assert len((out / "evaluation.md").read_text().splitlines()) == 2 + 5
    for png in ("curves.png", "evaluation.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    timings = json.loads((out / "timings.json").read_text())
    assert {"train: DPO", "answers: untrained reference"} <= set(timings)
