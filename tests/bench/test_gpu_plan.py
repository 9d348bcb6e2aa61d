"""bench/gpu_plan.py: the GPU check's plan and its cost model (what tests/bench/test_gpu_check.py
reads back from the dry run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import gpu_plan  # noqa: E402

GB_1B = 1_235_814_400 * 2 / 1e9  # Llama-3.2-1B's shape in bf16: 2.47 GB per load


def _estimates(plan):
    return {s["name"]: s["estimate_s"] for s in plan["steps"]}


def test_the_plan_fits_and_reserves_the_later_sides():
    plan = gpu_plan.build_plan()
    e = _estimates(plan)
    assert plan["fits"] and plan["mandatory_s"] <= gpu_plan.BUDGET_S == 480
    assert gpu_plan.reserve_after(plan, "ours") == pytest.approx(
        e["side trl-precompute"] + e["side ours-unshared"] + e["side trl"]
    )
    assert gpu_plan.reserve_after(plan, "trl") == 0


def test_one_model_load_per_side_two_with_a_live_reference(monkeypatch):
    """One more second per GB adds 2.47 s to each side's process, 4.94 s to trl's (policy and
    reference): the model is loaded once per process, not once per workload."""
    before = _estimates(gpu_plan.build_plan())
    assumptions = {
        **gpu_plan.ASSUMPTIONS,
        "load_s_per_gb": gpu_plan.ASSUMPTIONS["load_s_per_gb"] + 1,
    }
    monkeypatch.setattr(gpu_plan, "ASSUMPTIONS", assumptions)
    after = _estimates(gpu_plan.build_plan())
    for side, loads in (("ours", 1), ("trl-precompute", 1), ("ours-unshared", 1), ("trl", 2)):
        grown = after[f"side {side}"] - before[f"side {side}"]
        assert grown == pytest.approx(loads * GB_1B, abs=0.11), side


def test_each_workload_costs_at_least_its_window_and_first_step():
    """Two workloads of ours: >= start 15 + load 2 x 2.47 + 2 x (setup 1 + first step 5 +
    window 10) = 51.9 s."""
    side = gpu_plan.BENCHMARK["sides"][0]
    assert side["side"] == "ours" and len(side["workloads"]) == 2
    assert gpu_plan.side_s(side, gpu_plan.settings(False)) >= 15 + 2 * GB_1B + 2 * 16


def test_dry_run_settings_mirror_the_gpu_ones():
    gpu, dry = gpu_plan.settings(False), gpu_plan.settings(True)
    assert [s["side"] for s in gpu["sides"]] == [s["side"] for s in dry["sides"]]
    assert [len(s["workloads"]) for s in gpu["sides"]] == [
        len(s["workloads"]) for s in dry["sides"]
    ]
    assert dry["size"] == "tiny" and dry["in_process"] and not gpu["in_process"]
    assert gpu["window_s"] == 10 and gpu["size"] == "1b"


def test_over_budget_exits_1(capsys):
    assert gpu_plan.main(["--budget", "100"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
