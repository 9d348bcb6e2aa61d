"""bench/train_vs_trl.py and vs_trl_runners.py: MFU from the hardware FLOPs of what a side
computed, timed windows of a minimum length, one process per side over all its workloads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import flops  # noqa: E402
import pair_lengths  # noqa: E402
import train_vs_trl  # noqa: E402
import vs_trl_runners  # noqa: E402

TINY = flops.Shape(4, 8, 1, 2, 1, 10)  # test_mfu.py's shape: 288 / 16 / 80 FLOPs


def test_mfu_counts_what_the_shared_layout_computed():
    """Pairs (3, 2, 1) and (5, 1, 4), shared prompt, checkpointing. Pair 1: 7 tokens, 22 causal
    pairs, 3 head tokens (test_mfu.py). Pair 2: shared block 4 tokens (10 pairs), chosen block
    2 (2*3/2 + 2 x 4 = 11), rejected block 5 (5*6/2 + 5 x 4 = 35): 11 tokens, 56 pairs, 5 head
    tokens. Sum 18 / 78 / 8: decoder 18 x 288 + 78 x 16 = 6432, x4 = 25728; head 8 x 80 x 4 =
    2560; 28288 FLOPs. Over 2 s on an H100 SXM: 14144 FLOP/s, MFU 14144 / 989e12. Pair tokens
    6 + 10 = 16, 8 per second."""
    rows = pair_lengths.make_rows([(3, 2, 1), (5, 1, 4)], vocab_size=10, seed=0)
    counts = vs_trl_runners.timed_work(
        TINY, [rows], True, pair_lengths.shared_padded_tokens, checkpointing=True, reference=False
    )
    assert (counts["nonpadding_computed_tokens"], counts["attention_pairs"]) == (18, 78)
    assert counts["flops"] == 28288
    result = {"ok": True, "elapsed_s": 2.0, "cpu_s": 4.0, "peak_cuda_bytes": 10**9, **counts}
    out = train_vs_trl.summarize(result, 100, "bfloat16", "NVIDIA H100 80GB HBM3", rss_base=0)
    assert out["hardware_flops_per_s"] == 14144
    assert out["mfu"] == pytest.approx(14144 / 989e12, rel=1e-12)
    assert (out["pair_tokens_per_s"], out["pair_tokens_per_cpu_s"]) == (8, 4)
    # 2 x 11 positions computed (shared rows, padded to 11), 18 of them real.
    assert out["padding_share"] == pytest.approx(1 - 18 / 22)


def test_live_reference_and_full_head_count_as_computed():
    """TRL with a live reference and the head on every position (CPU): pair (3, 2, 1) unshared:
    9 tokens, 25 pairs, 9 head positions. Decoder 9 x 288 + 25 x 16 = 2992, x4 = 11968; head
    9 x 80 = 720, x4 = 2880; reference forward 2992 + 720 = 3712; total 18560. No MFU for a
    float32 run or an unknown card."""
    rows = pair_lengths.make_rows([(3, 2, 1)], vocab_size=10, seed=0)
    counts = vs_trl_runners.timed_work(
        TINY, [rows], False, pair_lengths.padded_tokens, True, reference=True, compact_head=False
    )
    assert counts["flops"] == 18560
    result = {"ok": True, "elapsed_s": 1.0, "cpu_s": 1.0, "peak_rss_bytes": 10**9, **counts}
    assert "mfu" not in train_vs_trl.summarize(dict(result), 100, "float32", "cpu", 0)
    assert "mfu" not in train_vs_trl.summarize(dict(result), 100, "bfloat16", "NVIDIA A10", 0)


def test_window_runs_until_its_seconds_on_whole_passes(monkeypatch):
    """Each step takes 3 fake seconds: 2 warm-up steps (b0, b1), then steps until >= 10 s on a
    whole number of passes over the 3 batches (so every side times the same pairs): 12 s after 4
    steps is not a whole pass, 6 steps (18 s) are: b2, b0, b1, b2, b0, b1."""
    now = [0.0]
    monkeypatch.setattr(vs_trl_runners.time, "perf_counter", lambda: now[0])

    def step(batch):
        now[0] += 3.0

    window = vs_trl_runners._window(step, ["b0", "b1", "b2"], warmup=2, window_s=10.0)
    assert window["timed_batches"] == ["b2", "b0", "b1", "b2", "b0", "b1"]
    assert (window["elapsed_s"], window["warmup_s"]) == (18.0, 6.0)


def test_one_process_per_side_over_its_lengths(tmp_path):
    """ours in its own process (a child interpreter), two workloads, one model load: each
    workload reports its own window, memory peak and pairs."""
    out = tmp_path / "report.json"
    train_vs_trl.main(
        [
            "--size", "tiny", "--sides", "ours", "--max-length", "32", "64",
            "--micro-batch", "2", "1", "--window-s", "0.3", "--warmup-steps", "1",
            "--pool-steps", "2", "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    (process,) = report["processes"]["ours"]
    assert process["ok"] and not process["in_process"], process.get("error")
    assert process["load_s"] > 0 and process["start_s"] > 0
    for length, batch in (("32", 2), ("64", 1)):
        r = report["runs"][length]["ours"]
        assert r["ok"] and (r["max_length"], r["micro_batch"]) == (int(length), batch)
        assert r["elapsed_s"] >= 0.3 and r["steps"] >= 1 and r["peak_rss_bytes"] > 0
        assert r["pairs"] == r["steps"] * batch


def test_every_side_trains_on_the_committed_hh_lengths(tmp_path):
    """The pool of each workload: ``--pool-steps`` x micro-batch pairs drawn from
    bench/data/hh_lengths.json (no file outside the checkout), cut to the workload's length,
    the same pairs for every side."""
    args = train_vs_trl.parse_args(["--size", "tiny", "--pool-steps", "3", "--seed", "5"])
    bench = train_vs_trl.settings_from_args(args)
    side = {"side": "trl", "workloads": [[48, 2]], "find_max_batch": False}
    spec = train_vs_trl.side_spec(args, bench, side, tmp_path, None)
    ours = train_vs_trl.side_spec(args, bench, {**side, "side": "ours"}, tmp_path, None)
    rows = spec["workloads"][0]["rows"]
    want = [pair_lengths.truncate(n, 48) for n in pair_lengths.load_table()]
    assert [pair_lengths.triple(r) for r in rows] == pair_lengths.sample(6, 48, seed=5)
    assert all(pair_lengths.triple(r) in want for r in rows)
    assert ours["workloads"][0]["rows"] == rows
