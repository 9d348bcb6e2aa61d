"""The one resumable sharded pass (treg_lightning.passes): the shard plan and rank rule against
hand-written tables, skip-if-done, the atomic writer (exact bytes; nothing partial when a write
raises), the merge errors naming the part, and failure propagation: on 2 gloo processes a rank
that raises in a step (annotate, cache save, merge) ends both processes within seconds, each
naming the real error."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builders import checkout_env
from treg_lightning.errors import UserError
from treg_lightning.passes import (
    PartError,
    Parts,
    RankFailedError,
    RankRefusedError,
    Ranks,
    ShardPlan,
    atomic_path,
    distributed,
    parts_folder,
    write_bytes,
    write_json,
    write_jsonl,
    write_text,
)
from treg_lightning.passes.ranks import _raise_failure

SCRIPT = Path(__file__).resolve().parents[1] / "passes_ranks_script.py"


# --- the plan and the rank rule --------------------------------------------------------------


def test_shard_plan_cuts_consecutive_items():
    plan = ShardPlan(items=7, shard_size=3)
    assert plan.count == 3
    assert [plan.slice(k) for k in range(3)] == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert [plan.size(k) for k in range(3)] == [3, 3, 1]
    assert ShardPlan(0, 4).count == 0 and ShardPlan(8, 4).count == 2
    with pytest.raises(ValueError, match="shard_size must be >= 1, got 0"):
        ShardPlan(3, 0)


def test_rank_rule_gives_shard_k_to_rank_k_mod_world_size():
    plan = ShardPlan(items=20, shard_size=3)  # 7 shards
    by_rank = [plan.shards_of(Ranks(r, 3)) for r in range(3)]
    assert by_rank == [[0, 3, 6], [1, 4], [2, 5]]
    assert plan.shards_of(Ranks()) == list(range(7))
    assert plan.shards_of(Ranks(3, 4)) == [3]


def test_parts_folder_is_named_by_the_output_and_the_fingerprint():
    assert parts_folder(Path("out/answers.jsonl"), "0123456789abcdef" * 4) == Path(
        "out/answers.jsonl.parts/0123456789abcdef"
    )
    assert Parts(Path("w")).path(12) == Path("w/shard-000012.jsonl")
    assert Parts(Path("w"), "chunk-{:06d}.safetensors").path(3) == Path(
        "w/chunk-000003.safetensors"
    )


def test_todo_skips_finished_parts(tmp_path):
    plan, parts = ShardPlan(10, 2), Parts(tmp_path)  # shards 0..4
    for k in (0, 3):
        parts.path(k).write_text("{}\n")
    assert parts.todo(plan, Ranks()) == [1, 2, 4]
    assert parts.todo(plan, Ranks(0, 2)) == [2, 4]  # rank 0 of 2 owns 0, 2, 4
    assert parts.todo(plan, Ranks(1, 2)) == [1]  # owns 1, 3
    # A part with the wrong content is not done under a stricter rule.
    assert parts.todo(plan, Ranks(1, 2), done=lambda k: k == 1) == [3]


# --- the atomic writer ----------------------------------------------------------------------


def test_writers_write_the_exact_bytes(tmp_path):
    value = {"b": 1, "a": ["é", 2.5]}
    write_json(tmp_path / "s.json", value, sort_keys=True)
    assert (tmp_path / "s.json").read_text() == '{\n "a": [\n  "\\u00e9",\n  2.5\n ],\n "b": 1\n}'
    write_json(tmp_path / "u.json", {"x": Path("p")}, end="\n")  # str() of what JSON lacks
    assert (tmp_path / "u.json").read_text() == '{\n "x": "p"\n}\n'
    write_jsonl(tmp_path / "r.jsonl", iter([{"t": "é"}, {"n": 1}]))
    assert (tmp_path / "r.jsonl").read_bytes() == '{"t": "é"}\n{"n": 1}\n'.encode()
    write_text(tmp_path / "t.txt", "ü")
    assert (tmp_path / "t.txt").read_bytes() == b"\xc3\xbc"
    write_bytes(tmp_path / "t.txt", b"\x00\x01")
    assert (tmp_path / "t.txt").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl", "s.json", "t.txt", "u.json"]


def test_a_write_that_raises_leaves_no_partial_file(tmp_path):
    def rows():
        yield {"first": 1}
        raise RuntimeError("cut off after one row")

    target = tmp_path / "answers.jsonl"
    with pytest.raises(RuntimeError, match="cut off"):
        write_jsonl(target, rows())
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary file
    target.write_text("old\n")
    with pytest.raises(TypeError):
        write_jsonl(target, [{"ok": 1}, {"bad": object()}])
    assert target.read_text() == "old\n"  # the earlier file stays whole
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_path_writes_a_folder_under_a_hidden_name_and_moves_it(tmp_path):
    with atomic_path(tmp_path / "data") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".data.tmp-{os.getpid()}-")
        tmp.mkdir()
        (tmp / "a").write_text("x")
    assert (tmp_path / "data" / "a").read_text() == "x"
    with pytest.raises(OSError), atomic_path(tmp_path / "other") as tmp:
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# --- merge errors ---------------------------------------------------------------------------


def test_missing_and_foreign_parts_are_named(tmp_path):
    from treg_lightning.answers.predictions import merge_shards, read_shard
    from treg_lightning.rewards.cache import merge_chunks

    parts = Parts(tmp_path / "parts")
    parts.folder.mkdir()
    write_jsonl(parts.path(0), [{"index": 0}, {"index": 1}])
    prompts = [{"index": i} for i in range(3)]
    with pytest.raises(PartError) as missing:
        merge_shards(prompts, parts, tmp_path / "out.jsonl", shard_size=2)
    assert str(missing.value).startswith(
        f"{parts.path(1)} is missing after every rank finished (a rank stopped early, or the "
        "file was removed). Rerun the same command"
    )
    assert isinstance(missing.value, UserError) and not (tmp_path / "out.jsonl").exists()
    with pytest.raises(PartError) as foreign:
        read_shard(parts, 0, [0, 5])
    assert str(foreign.value).startswith(
        f"{parts.path(0)} holds other prompts than expected: it belongs to another run"
    )
    rows = [{"index": i, "prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]} for i in (0, 1)]
    with pytest.raises(PartError, match=r"chunk-000000\.safetensors is missing after every rank"):
        merge_chunks(rows, tmp_path / "chunks", chunk_pairs=1)


# --- ranks ----------------------------------------------------------------------------------


def test_one_process_is_rank_0_of_1_and_steps_pass_errors_through():
    assert distributed() == Ranks(0, 1)
    with pytest.raises(RuntimeError, match="world_size=2 needs torch.distributed initialized"):
        distributed(0, 2)
    stop = KeyboardInterrupt("stop")
    with pytest.raises(KeyboardInterrupt) as info, Ranks().step("work"):
        raise stop
    assert info.value is stop
    assert Ranks().on_rank_zero("merge", lambda: 7) == 7
    assert Ranks(1, 1).on_rank_zero("merge", lambda: 7) is None


def test_reports_of_a_step_become_one_error_on_every_rank():
    _raise_failure("s", [("s", None), ("s", None)])  # nobody failed: nothing raised
    with pytest.raises(RankFailedError) as bug:
        _raise_failure("s", [("s", None), ("s", ("ValueError", "boom", False))])
    assert str(bug.value) == (
        "rank 1 failed at s with ValueError: boom (its own output has the traceback)."
    )
    assert not isinstance(bug.value, UserError)
    reports = [("s", ("OutputFolderError", "disk full", True)), ("s", ("KeyError", "x", False))]
    with pytest.raises(RankRefusedError) as user:
        _raise_failure("s", reports)
    assert str(user.value) == "rank 0 (and 1 more ranks) stopped at s: disk full"
    assert isinstance(user.value, UserError)  # the CLI prints it alone, exit status 2
    with pytest.raises(RuntimeError, match="reached different steps"):
        _raise_failure("s", [("s", None), ("t", None)])
    # A rank that failed in an outer step while the others waited in an inner one.
    with pytest.raises(RankFailedError, match="rank 1 failed at outer with OSError: gone"):
        _raise_failure("inner", [("inner", None), ("outer", ("OSError", "gone", False))])


# --- a failing rank ends every rank (2 gloo processes) ---------------------------------------

# The failing rank's own error, and what the other rank must say about it.
FAILURES = {
    "step": ("Injected: boom in the step on rank 1", "rank 1 failed at work with Injected: boom "
             "in the step on rank 1"),
    "nested": ("Injected: boom before the inner step on rank 1", "rank 1 failed at outer with "
               "Injected: boom before the inner step on rank 1"),
    "merge": ("Injected: boom in the merge on rank 0", "rank 0 failed at merge with Injected: "
              "boom in the merge on rank 0"),
    "annotate": ("Injected: boom while scoring a chunk on rank 1", "rank 1 failed at "
                 "annotate-chunks with Injected: boom while scoring a chunk on rank 1"),
    "cache_save": ("no space left on device while writing", "rank 0 stopped at cache-save: no "
                   "space left on device while writing"),
}  # fmt: skip
FAILING_RANK = {"step": 1, "nested": 1, "merge": 0, "annotate": 1, "cache_save": 0}
BOUND_S = 60  # from the failure to the end of both processes; the process group waits 5 min


@pytest.mark.gpu_emulation
@pytest.mark.parametrize("scenario", sorted(FAILURES))
def test_a_failing_rank_ends_both_ranks_within_seconds(scenario, tmp_path):
    codes, texts = _two_ranks(scenario, tmp_path)
    assert (tmp_path / "failed-at").exists(), texts  # the failure was injected
    own, reported = FAILURES[scenario]
    failing = FAILING_RANK[scenario]
    assert codes == [1, 1], texts
    assert own in texts[failing], texts[failing][-3000:]
    assert reported in texts[1 - failing], texts[1 - failing][-3000:]


@pytest.mark.gpu_emulation
def test_export_on_two_ranks_is_written_by_rank_0_while_the_other_waits(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"policy.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    codes, texts = _two_ranks("export", tmp_path / "good", tiny_model_dir, ckpt)
    assert codes == [0, 0], texts
    assert sorted(p.name for p in (tmp_path / "good").glob("exported-by-*")) == ["exported-by-0"]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "good" / "export")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], value, rtol=0, atol=0)
    # A checkpoint rank 0 cannot read: both ranks stop, rank 1 with rank 0's error.
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    codes, texts = _two_ranks("export", tmp_path / "bad", tiny_model_dir, bad)
    assert codes == [1, 1] and (tmp_path / "bad" / "failed-at").exists(), texts
    assert f"rank 0 stopped at export: --ckpt_path {bad}" in texts[1], texts[1][-3000:]
    assert "exported-by-1" not in {p.name for p in (tmp_path / "bad").iterdir()}


def _two_ranks(scenario: str, out: Path, *args) -> tuple[list[int], list[str]]:
    """Run the scenario on ranks 0 and 1; their exit statuses and outputs."""
    out.mkdir(exist_ok=True)
    env = checkout_env(OMP_NUM_THREADS="1")
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    logs = [out / f"rank{r}.log" for r in (0, 1)]
    processes = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), scenario, str(r), str(out), *map(str, args)],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for r, log in enumerate(logs)
    ]
    try:
        _wait_for_both(processes, out / "failed-at")
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return [p.returncode for p in processes], [log.read_text() for log in logs]


def _wait_for_both(processes: list[subprocess.Popen], failed_at: Path) -> None:
    """Wait (reaping, so a lingering rank sees its peer gone) until both processes end; fail if
    they outlive a failure by more than ``BOUND_S``."""
    start = time.monotonic()
    while None in [p.poll() for p in processes]:  # polls (reaps) every process
        if failed_at.exists():
            waited = time.time() - float(failed_at.read_text() or "inf")
            assert waited < BOUND_S, f"ranks still running {waited:.0f} s after the failure"
        assert time.monotonic() - start < 240, "the ranks ran for 240 s"
        time.sleep(0.1)
