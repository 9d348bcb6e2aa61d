"""bench/gpu_check.sh --dry-run: every step of the GPU check on CPU with tiny shapes, so the
first call on a GPU machine cannot die on a typo (its plan, tests/test_gpu.py without and with
flex, train_vs_trl.py with all four sides, their workloads and the largest-micro-batch search,
the summary); and the plan it writes fits the GPU budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUDGET_S = 480


def _run(out: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env_extra}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "TREG_GPU_DRY_RUN"):
        env.pop(key, None)
    command = ["bash", str(ROOT / "bench" / "gpu_check.sh"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    proc = _run(out, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return out


def test_dry_run_plan_fits_the_budget(dry_run):
    """The plan of the real run (estimates from gpu_plan.ASSUMPTIONS): its mandatory steps add
    up to less than the 480 s budget, model loads included; one process per side, ours and
    trl-precompute at 1024 (16 pairs) and 2048 (8 pairs), the other two at 1024; the searches
    and the flex tests optional, the CUDA tests before the benchmark."""
    plan = json.loads((dry_run / "plan.json").read_text())
    mandatory = [s for s in plan["steps"] if not s["optional"]]
    assert plan["budget_s"] == BUDGET_S and plan["fits"]
    assert sum(s["estimate_s"] for s in mandatory) == pytest.approx(plan["mandatory_s"], abs=0.5)
    assert plan["mandatory_s"] <= BUDGET_S
    names = [s["name"] for s in plan["steps"]]
    assert names.index("cuda tests") < names.index("side ours")
    optional = {s["name"] for s in plan["steps"] if s["optional"]}
    assert optional == {
        "largest micro-batch ours",
        "largest micro-batch trl-precompute",
        "flex tests",
    }
    assert all(s["estimate_s"] > 0 for s in plan["steps"])
    sides = {s["side"]: s["workloads"] for s in plan["benchmark"]["sides"]}
    assert sides == {
        "ours": [[1024, 16], [2048, 8]],
        "trl-precompute": [[1024, 16], [2048, 8]],
        "ours-unshared": [[1024, 16]],
        "trl": [[1024, 16]],
    }
    assert plan["run"]["size"] == "tiny" and plan["dry_run"]


def test_dry_run_ran_every_step(dry_run):
    report = json.loads((dry_run / "train_vs_trl.json").read_text())
    runs = report["runs"]
    assert set(runs) == {"32", "64"}  # the dry run's stand-ins for 1024 and 2048
    for side in ("ours", "ours-unshared", "trl", "trl-precompute"):
        assert runs["32"][side]["ok"] and runs["32"][side]["pair_tokens_per_s"] > 0, side
    assert set(runs["64"]) - {"ratios"} == {"ours", "trl-precompute"}
    short = runs["32"]
    assert short["ours"]["shared_prompt"] and not short["ours-unshared"]["shared_prompt"]
    assert short["trl"]["reference_model"] and not short["trl-precompute"]["reference_model"]
    assert set(runs["32"]["ratios"]) == {"ours/trl", "ours/trl-precompute", "ours/ours-unshared"}
    # One process per side, each over all its workloads.
    assert {side: len(p) for side, p in report["processes"].items()} == dict.fromkeys(
        ("ours", "trl-precompute", "ours-unshared", "trl"), 1
    )
    for side in ("ours", "trl-precompute"):
        assert report["find_max_batch"][side]["max_micro_batch"] == 2
    environment = json.loads((dry_run / "environment.json").read_text())
    assert environment["dry_run"] is True
    steps = {s["name"]: s for s in json.loads((dry_run / "steps.json").read_text())}
    assert steps["cuda tests"]["status"] == "0", (dry_run / "gpu-tests.log").read_text()[-3000:]
    assert steps["benchmark"]["status"] == "0"
    assert steps["flex tests"]["status"] in ("0", "5")  # 5: no flex test selected
    summary = (dry_run / "summary.txt").read_text()
    assert "32 ours/trl-precompute: pair tokens/s x" in summary
    assert "largest micro-batch at 64, ours: 2" in summary


def test_a_plan_over_the_budget_stops_before_any_step(tmp_path):
    """GPU_CHECK_BUDGET_S below the mandatory estimates: exit 2 with the plan, nothing run."""
    proc = _run(tmp_path / "out", "--dry-run", GPU_CHECK_BUDGET_S="200")
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "exceed the budget of 200 s" in proc.stdout
    assert not (tmp_path / "out" / "gpu-tests.log").exists()
