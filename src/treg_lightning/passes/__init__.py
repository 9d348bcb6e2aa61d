"""One resumable, sharded pass over ranks, and one atomic writer (the ground floor: imports
only :mod:`treg_lightning.errors`, the standard library and ``torch.distributed``).

Every long pass (annotate, predict, pairs) is built from these pieces::

    ranks = distributed()                          # rank r of n (0 of 1 without a process group)
    plan = ShardPlan(len(items), shard_size)       # shard k = items[plan.slice(k)]
    parts = Parts(parts_folder(output, digest))    # part k = <output>.parts/<digest>/shard-k
    with ranks.step("make"):                       # a rank that raises stops every rank
        for k in parts.todo(plan, ranks):          # this rank's shards (k % n == r), not done
            write_jsonl(parts.path(k), make(items[plan.slice(k)]))
    ranks.on_rank_zero("merge", lambda: merge([parts.read(k, read) for k in range(plan.count)]))

- :mod:`.atomic`: :func:`atomic_path` and the writers built on it (bytes, text, JSON, JSONL);
- :mod:`.ranks`: :func:`distributed`, :class:`Ranks` and its steps with failure propagation;
- :mod:`.shards`: :class:`ShardPlan` (the rank rule), :class:`Parts` (skip-if-done, reading
  for the merge) and the missing / foreign part errors.
"""

from treg_lightning.passes.atomic import (
    atomic_path,
    write_bytes,
    write_json,
    write_jsonl,
    write_text,
)
from treg_lightning.passes.ranks import (
    RankFailedError,
    RankRefusedError,
    Ranks,
    distributed,
)
from treg_lightning.passes.shards import (
    PartError,
    Parts,
    ShardPlan,
    foreign_part,
    missing_part,
    parts_folder,
)

__all__ = [
    "PartError",
    "Parts",
    "RankFailedError",
    "RankRefusedError",
    "Ranks",
    "ShardPlan",
    "atomic_path",
    "distributed",
    "foreign_part",
    "missing_part",
    "parts_folder",
    "write_bytes",
    "write_json",
    "write_jsonl",
    "write_text",
]
