"""bench/gpu_check.sh --dry-run: every step of the GPU check on CPU with tiny shapes, so the
first call on a GPU machine cannot die on a typo (tests/test_gpu.py, train_vs_trl.py with all
four sides and the largest-micro-batch search, the summary)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "TREG_GPU_DRY_RUN"):
        env.pop(key, None)
    command = ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    tests = (out / "gpu-tests.log").read_text()
    assert "7 passed" in tests and "skipped" not in tests, tests[-2000:]
    report = json.loads((out / "train_vs_trl.json").read_text())
    runs = report["runs"]["32"]
    for side in ("ours", "ours-unshared", "trl", "trl-precompute"):
        assert runs[side]["ok"] and runs[side]["tokens_per_s"] > 0, side
    assert runs["ours"]["shared_prompt"] and not runs["ours-unshared"]["shared_prompt"]
    assert runs["trl"]["reference_model"] and not runs["trl-precompute"]["reference_model"]
    assert set(runs["ratios"]) == {"ours/trl", "ours/trl-precompute", "ours/ours-unshared"}
    for side in ("ours", "trl-precompute"):
        assert report["find_max_batch"][side]["max_micro_batch"] == 1
    environment = json.loads((out / "environment.json").read_text())
    assert environment["dry_run"] is True
    summary = (out / "summary.txt").read_text()
    assert "32 ours/trl-precompute: tokens/s x" in summary
