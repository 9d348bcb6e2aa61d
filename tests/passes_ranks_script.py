"""`python passes_ranks_script.py SCENARIO RANK OUT [ARGS]`: one of two gloo ranks of a pass in
which one rank fails (see ``SCENARIOS``). Run twice, as rank 0 and rank 1, by
tests/passes/test_passes.py.

NCCL tells no rank that another one has died, so a failed rank looks alive to its peers; gloo
closes the dead rank's connections, and the peers would learn of the failure from that. To run
the NCCL case on CPU, the rank whose failure was injected stays alive (connections open) until
every other rank has exited, as a dead NCCL rank appears to the others. The injection writes
``OUT/failed-at`` (the time of the failure) before raising.
"""

import datetime
import errno
import os
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import numpy as np
import torch.distributed as dist

scenario, rank, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
injected = False


class Injected(RuntimeError):
    pass


def fail(message: str, error: BaseException | None = None):
    global injected
    injected = True
    (out / "failed-at").write_text(repr(time.time()))
    raise error if error is not None else Injected(message)


def rows(n: int = 6) -> list[dict]:
    return [
        {"index": i, "prompt_ids": [1, 2], "chosen_ids": [3, i + 4], "rejected_ids": [5]}
        for i in range(n)
    ]


def score_chunk(chunk: list[dict]) -> dict:
    return {"chosen_token_rewards": [np.full(len(r["chosen_ids"]), 0.25) for r in chunk]}


def step() -> None:
    """Rank 1 raises inside a step while rank 0, done, waits at its end."""
    from treg_lightning.passes import distributed

    ranks = distributed()
    with ranks.step("work"):
        if ranks.rank == 1:
            fail("boom in the step on rank 1")
    ranks.barrier("after")


def nested() -> None:
    """Rank 1 raises inside an outer step before an inner one, in which rank 0 waits (as when
    one rank fails to load its evaluator while the other waits for the cache's lock)."""
    from treg_lightning.passes import distributed

    ranks = distributed()
    with ranks.step("outer"):
        if ranks.rank == 1:
            fail("boom before the inner step on rank 1")
        ranks.barrier("inner")
        ranks.barrier("inner-2")
    ranks.barrier("after")


def merge() -> None:
    """Rank 0 raises while merging; rank 1 waits for the merge."""
    from treg_lightning.passes import distributed

    ranks = distributed()
    ranks.on_rank_zero("merge", lambda: fail("boom in the merge on rank 0"))


def annotate() -> None:
    """The token-reward build: rank 1's scoring raises; rank 0 scored its chunks and waits."""
    from treg_lightning.rewards.cache import build_in_chunks

    def scored(chunk):
        if rank == 1:
            fail("boom while scoring a chunk on rank 1")
        return score_chunk(chunk)

    build_in_chunks(rows(), out / "work", scored, chunk_pairs=2)


def cache_save() -> None:
    """The token-reward cache: the disk fills up while rank 0 saves the merged cache (a user
    error); rank 1 waits for the save."""
    import datasets

    from treg_lightning.rewards.cache import load_or_build

    def full(*args, **kwargs):
        fail("", OSError(errno.ENOSPC, "No space left on device"))

    with mock.patch.object(datasets.Dataset, "save_to_disk", full):
        load_or_build(rows(), out / "cache", "f" * 64, score_chunk, chunk_pairs=2)


def export() -> None:
    """``TRegTrainer.export`` on both ranks (``sys.argv[4]``: the model, ``[5]``: the checkpoint):
    rank 0 writes, the other rank waits; each rank that exports leaves ``exported-by-<rank>``.
    A checkpoint that rank 0 cannot read is the injected failure."""
    from treg_lightning.models import export as export_module
    from treg_lightning.module import PreferenceModule
    from treg_lightning.outputs import Output
    from treg_lightning.training.trainer import TRegTrainer

    real = export_module.export_checkpoint

    def recorded(*args, **kwargs):
        (out / f"exported-by-{rank}").touch()
        try:
            return real(*args, **kwargs)
        except Exception as error:
            fail("", error)

    with mock.patch.object(export_module, "export_checkpoint", recorded):
        trainer = TRegTrainer(accelerator="cpu", devices=1, logger=False)
        trainer.export(PreferenceModule(sys.argv[4]), ckpt_path=sys.argv[5],
                       output=Output(str(out / "export")))  # fmt: skip


SCENARIOS = {"step": step, "nested": nested, "merge": merge, "annotate": annotate,
             "cache_save": cache_save, "export": export}  # fmt: skip


def linger_while_peers_run() -> None:
    """Stay alive, connections open, until the other rank's process has ended (<= 5 min)."""
    peer = int((out / f"pid-{1 - rank}").read_text())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            os.kill(peer, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


if __name__ == "__main__":
    (out / f"pid-{rank}").write_text(str(os.getpid()))
    while not (out / f"pid-{1 - rank}").exists():
        time.sleep(0.05)
    # The test's bound is 60 s; the process group would wait 5 minutes.
    timeout = datetime.timedelta(minutes=5)
    dist.init_process_group(
        "gloo", init_method=f"file://{out}/pg", rank=rank, world_size=2, timeout=timeout
    )
    try:
        SCENARIOS[scenario]()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        if injected:
            linger_while_peers_run()
        os._exit(1)  # no teardown of the process group: the peer may be gone
    print(f"rank {rank} finished", flush=True)
    sys.stderr.flush()
    # No teardown of the process group at interpreter exit either: the peer may already have
    # closed its side, and gloo's teardown then decides the exit status, not the scenario.
    os._exit(0)
