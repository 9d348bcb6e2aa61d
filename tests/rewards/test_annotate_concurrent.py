"""Two `treg annotate` runs on one cache folder: the second waits for the first's lock, then
reuses its cache (no traceback, no pair scored twice)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from builders import annotate_args, tiny_fit_args, write_pairs

SRC = Path(__file__).resolve().parents[2] / "src"
# `treg annotate` whose chunk writer, after the first chunk, waits for the file argv[1].
HELD = """
import os, sys, time
from treg_lightning.rewards.cache import chunks
go, args = sys.argv[1], sys.argv[2:]
write = chunks._write_chunk
def held(path, columns, key):
    write(path, columns, key)
    while not os.path.exists(go):
        time.sleep(0.05)
chunks._write_chunk = held
from treg_lightning.cli.main import cli_main
cli_main(args)
"""


def test_two_annotate_runs_on_one_cache_folder(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 6)
    args = [
        "annotate",
        *tiny_fit_args(tiny_model_dir, data, tmp_path, *annotate_args(tmp_path), rewards=None),
        "--data.rewards.chunk_pairs=2",
    ]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    env.pop("TREG_DEBUG", None)
    go = tmp_path / "go"
    logs = {name: tmp_path / f"{name}.err" for name in ("first", "second")}
    first = subprocess.Popen(
        [sys.executable, "-c", HELD, str(go), *args], env=env, stderr=logs["first"].open("w")
    )
    second = None

    def wait_for(condition, what):
        deadline = time.monotonic() + 120
        while not condition():
            assert time.monotonic() < deadline, what
            assert first.poll() is None, logs["first"].read_text()[-2000:]
            time.sleep(0.1)

    try:
        wait_for(lambda: list((tmp_path / "cache").glob("*/work/chunk-*")), "no first chunk")
        second = subprocess.Popen(
            [sys.executable, "-m", "treg_lightning.cli.main", *args],
            env=env,
            stderr=logs["second"].open("w"),
        )
        waiting = "is being built or read by another process; waiting for it to finish"
        wait_for(lambda: waiting in logs["second"].read_text(), "the second did not wait")
        go.touch()
        assert first.wait(timeout=120) == 0, logs["first"].read_text()[-2000:]
        assert second.wait(timeout=120) == 0, logs["second"].read_text()[-2000:]
    finally:
        go.touch()
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    err = logs["second"].read_text()
    assert "Traceback" not in err and "error:" not in err, err[-2000:]
    (cache,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in cache.iterdir()) == ["data", "meta.json"]
    assert "token-reward cache, train: 6 pairs" in err  # the second read the finished cache
