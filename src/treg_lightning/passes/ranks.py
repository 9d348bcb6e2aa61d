"""This process's place among the ranks of a job, and steps that every rank ends together.

A long pass runs as a sequence of steps (``with ranks.step("predict-shards"): ...``). At the
end of each step every rank waits for the others, as at a barrier, and learns whether the step
raised on any rank: if it did, every rank raises, the failing ranks their own error and the
others a :class:`RankFailedError` naming the rank, the step and the error. Without this, a rank
that raises while the others wait at a barrier (or later, while they wait for the merge) leaves
them blocked until the process group's timeout (30 minutes under Lightning): NCCL tells no rank
that another one has died.

Every line a rank runs between two steps must sit inside a step, so that a failure there is
reported: a pass is written as consecutive ``with ranks.step(...)`` blocks, and work done by
rank 0 alone (the merge) as :meth:`Ranks.on_rank_zero`. Steps nest (a pass inside a verb's
step): a rank that fails in the outer step while the others wait in an inner one meets them in
that inner step's exchange, and an error is reported once, by the innermost step it leaves.
A step's block holds no other collective than the steps inside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch.distributed as dist

from treg_lightning.errors import UserError, user_error_in

T = TypeVar("T")


class RankFailedError(RuntimeError):
    """Another rank raised in a step of the pass: this rank stops too, with that rank's error."""


class RankRefusedError(UserError, RankFailedError):
    """Another rank stopped the pass with a user error (its message says what to fix)."""


@dataclass(frozen=True)
class Ranks:
    """Rank ``rank`` of ``world_size`` processes (0 of 1: a single process)."""

    rank: int = 0
    world_size: int = 1

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Run the block, then wait for every rank; raise on every rank if it raised on one.

        A single process runs the block as it is: its errors pass through unchanged.
        """
        if self.world_size == 1:
            yield
            return
        try:
            yield
        except BaseException as error:
            # Told once: a step inside this one may have told every rank already (the ranks
            # then raise together, so none of them waits in this step's exchange).
            if not getattr(error, "told_every_rank", False):
                with contextlib.suppress(Exception):  # the peers may be gone: keep our error
                    _exchange(name, error, self.world_size)
                _mark_told(error)
            raise
        _raise_failure(name, _exchange(name, None, self.world_size))

    def barrier(self, name: str) -> None:
        """Wait for every rank (a step with nothing in it)."""
        with self.step(name):
            pass

    def on_rank_zero(self, name: str, work: Callable[[], T]) -> T | None:
        """``work()`` on rank 0 while the other ranks wait for it (its result on rank 0, None
        elsewhere); if it raises, every rank raises."""
        with self.step(name):
            return work() if self.rank == 0 else None


def distributed(rank: int | None = None, world_size: int | None = None) -> Ranks:
    """This process's :class:`Ranks`: torch.distributed's when it is initialized, else 0 of 1;
    explicit ``rank`` / ``world_size`` override (tests, custom launchers)."""
    initialized = dist.is_available() and dist.is_initialized()
    rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
    world_size = (
        world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
    )
    if world_size > 1 and not initialized:
        raise RuntimeError(
            f"world_size={world_size} needs torch.distributed initialized (Fabric/Trainer or "
            "init_process_group) so rank 0 can wait for the other ranks before merging."
        )
    return Ranks(rank, world_size)


# A rank's report at the end of a step: (step name, None) or (step name, (error type, message,
# whether it is the user's to fix)).
_Report = tuple[str, tuple[str, str, bool] | None]


def _exchange(name: str, error: BaseException | None, world_size: int) -> list[_Report]:
    """Every rank's report of the step (a collective: every rank must call it once per step)."""
    failure = None
    if error is not None:
        user = user_error_in(error)
        failure = (type(error).__name__, str(user if user is not None else error), user is not None)
    reports: list = [None] * world_size
    dist.all_gather_object(reports, (name, failure))
    return reports


def _mark_told(error: BaseException) -> None:
    with contextlib.suppress(AttributeError):  # an exception class with __slots__
        error.told_every_rank = True


def _raise_failure(name: str, reports: list[_Report]) -> None:
    """Raise on this rank what the reports of a step say: the first failing rank's error (at
    the step it failed in: an outer one when it failed outside the step the others were in)."""
    failed = [(rank, step, failure) for rank, (step, failure) in enumerate(reports) if failure]
    names = {step for step, _ in reports}
    if not failed and names == {name}:
        return
    if not failed:  # a bug: the ranks run different code
        error = RuntimeError(f"the ranks reached different steps of the pass: {sorted(names)}.")
    else:
        rank, step, (kind, message, user) = failed[0]
        others = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
        if user:
            error = RankRefusedError(f"rank {rank}{others} stopped at {step}: {message}")
        else:
            error = RankFailedError(
                f"rank {rank}{others} failed at {step} with {kind}: {message} (its own output "
                "has the traceback)."
            )
    _mark_told(error)  # every rank raises it now: no outer step reports it again
    raise error
