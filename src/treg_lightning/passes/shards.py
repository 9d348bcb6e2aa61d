"""A long pass cut into shards: the plan, the rank rule, the parts folder, skip-if-done, merge.

The items of a pass (prompts, pairs) are cut into shards of ``shard_size`` consecutive items;
shard ``k`` is made by rank ``k % world_size`` and written whole (:mod:`.atomic`) as one part
file in the pass's parts folder. A rerun skips the shards whose part is done, so a killed pass
continues where it stopped. When every rank is through, rank 0 reads all parts in shard order
and merges them; a part that is missing or belongs to other inputs stops the merge with an error
naming it.

The parts folder of a pass whose output is ``out.jsonl`` is ``out.jsonl.parts/<first 16 hex
digits of the fingerprint>/`` (:func:`parts_folder`): other settings get another folder, so
their parts never mix.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from treg_lightning.errors import UserError
from treg_lightning.passes.ranks import Ranks

T = TypeVar("T")


class PartError(UserError, RuntimeError):
    """A part file of a pass is missing or holds what another run made (the message names it)."""


def missing_part(path: Path) -> PartError:
    return PartError(
        f"{path} is missing after every rank finished (a rank stopped early, or the file was "
        "removed). Rerun the same command: finished parts are kept and only the missing ones "
        "are made."
    )


def foreign_part(path: Path, what: str) -> PartError:
    """The error for a part that holds ``what`` (e.g. "other prompts than expected")."""
    return PartError(
        f"{path} holds {what}: it belongs to another run or was edited. Delete it and rerun the "
        "same command (the other parts are kept)."
    )


@dataclass(frozen=True)
class ShardPlan:
    """``items`` cut into shards of ``shard_size`` consecutive items (the last may be shorter)."""

    items: int
    shard_size: int

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}.")

    @property
    def count(self) -> int:
        return -(-self.items // self.shard_size)

    def slice(self, k: int) -> slice:
        return slice(k * self.shard_size, min(self.items, (k + 1) * self.shard_size))

    def size(self, k: int) -> int:
        return self.slice(k).stop - self.slice(k).start

    def shards_of(self, ranks: Ranks) -> list[int]:
        """The rank rule: rank ``r`` of ``n`` makes the shards ``k`` with ``k % n == r``."""
        return list(range(ranks.rank, self.count, ranks.world_size))


def parts_folder(output: str | Path, digest: str) -> Path:
    """Where the parts of the pass writing ``output`` with fingerprint ``digest`` lie."""
    return Path(f"{output}.parts") / digest[:16]


@dataclass(frozen=True)
class Parts:
    """The part files of a pass: part ``k`` is ``folder / name.format(k)``."""

    folder: Path
    name: str = "shard-{:06d}.jsonl"

    def path(self, k: int) -> Path:
        return self.folder / self.name.format(k)

    def todo(self, plan: ShardPlan, ranks: Ranks, done: Callable[[int], bool] | None = None):
        """This rank's shards whose part is not done yet; ``done(k)`` defaults to "the part
        file exists" (parts are written whole, so an existing one is finished)."""
        done = done or (lambda k: self.path(k).is_file())
        return [k for k in plan.shards_of(ranks) if not done(k)]

    def read(self, k: int, read: Callable[[Path], T]) -> T:
        """``read(path)`` of part ``k``; :class:`PartError` if it is missing."""
        path = self.path(k)
        if not path.is_file():
            raise missing_part(path)
        return read(path)

    def remove(self) -> None:
        """Delete the parts (after the merge), and the ``<output>.parts`` folder above them when
        no other settings left parts there."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.folder.parent.name.endswith(".parts"):
            try:
                self.folder.parent.rmdir()
            except OSError:
                pass
