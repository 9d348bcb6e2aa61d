"""A training DataLoader that resumes mid-epoch: Lightning saves its state in checkpoints.

Lightning's fit loop calls ``state_dict()`` on every training DataLoader that has one when it
writes a checkpoint, and ``load_state_dict()`` when a fit resumes from it (``ckpt_path``).
Without that, a run stopped mid-epoch restarts the epoch from its first batch: batches are seen
twice and the resumed run differs from the one that never stopped.

The state is tiny: the sampler's epoch and the number of batches of that epoch the training
loop has consumed. The batch order is a function of ``seed + epoch`` only (see
``LengthGroupedSampler``), so the first iteration after loading recomputes that order and starts
``batches * batch_size`` indices into it: the skipped batches are never read or collated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """``DataLoader`` with ``state_dict``/``load_state_dict`` for exact mid-epoch resume.

    Takes ``DataLoader``'s arguments. The sampler must have ``epoch``, ``set_epoch`` and
    ``skip_samples`` (indices to drop from the start of its next iteration), as
    ``LengthGroupedSampler`` does, and all batches but the last must be full (``batch_size``).

    Attributes:
        consumed: returns how many batches of the current epoch the training loop has stepped
            on; set by the datamodule to read the trainer's counter. Lightning fetches one batch
            ahead, so the batches this loader has yielded are one more than those consumed.
            None: the batches yielded are taken as consumed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in ("set_epoch", "skip_samples"):
            if not hasattr(self.sampler, name):
                raise TypeError(
                    f"ResumableDataLoader needs a sampler with `{name}` (e.g. "
                    f"LengthGroupedSampler), got {type(self.sampler).__name__}."
                )
        self.consumed: Callable[[], int | None] | None = None
        self._yielded = 0  # batches of the current iteration handed out (skipped ones included)

    def __iter__(self) -> Iterator:
        self._yielded = self.sampler.skip_samples // (self.batch_size or 1)
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        consumed = self.consumed() if self.consumed is not None else None
        batches = self._yielded if consumed is None else min(consumed, self._yielded)
        return {"epoch": int(self.sampler.epoch), "batches": int(batches)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= len(self):
            # Saved at the very end of an epoch (e.g. max_steps reached on its last batch):
            # the next iteration is the next epoch, from its first batch.
            self.sampler.set_epoch(epoch + 1)
            self.sampler.skip_samples = 0
            return
        self.sampler.set_epoch(epoch)
        self.sampler.skip_samples = batches * (self.batch_size or 1)


def reopen_cut_epoch(checkpoint: dict[str, Any]) -> bool:
    """Mark an epoch that ``max_steps`` (or a stop request) cut short as unfinished, in place.

    When a fit stops before the last batch of an epoch, Lightning still ends that epoch: it
    counts it as processed and runs ``on_train_epoch_end``, where the default ``ModelCheckpoint``
    (or ``on_train_end``, with validation) writes ``last.ckpt``. Resuming that checkpoint with a
    larger ``max_steps`` then starts the next epoch (or, with ``max_epochs=1``, trains nothing),
    while this loader's state says how many batches of the cut epoch were consumed: the rest of
    the epoch would be skipped silently.

    This rewrites the fit loop's progress of such a checkpoint into the state of one written
    after the same batch mid-epoch (``on_train_batch_end``), the resume Lightning and this loader
    already do exactly: the cut epoch continues at its next batch. It applies only when the
    checkpoint holds this loader's state for those very batches; returns whether it changed
    anything. Called from ``PreferenceModule.on_load_checkpoint`` (before the loops restore).
    """
    fit = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    batch_progress = fit.get("epoch_loop.batch_progress")
    epoch_progress = fit.get("epoch_progress")
    loaders = (fit.get("state_dict") or {}).get("combined_loader") or []
    if not batch_progress or not epoch_progress:
        return False
    batches, epochs = batch_progress["current"], epoch_progress["current"]
    consumed = batches["processed"]
    cut = (
        not batch_progress.get("is_last_batch", True)  # the epoch's data was not exhausted
        and consumed > 0
        and batches["completed"] == consumed  # the epoch loop had finished its last batch
        and epochs["ready"] == epochs["started"] == epochs["processed"] > 0  # epoch ended
        and any(_own_state(state) and state["batches"] == consumed for state in loaders)
    )
    if not cut:
        return False
    for progress in (batch_progress["current"], batch_progress["total"]):
        progress["completed"] = progress["processed"] - 1
    for progress in (epoch_progress["current"], epoch_progress["total"]):
        progress["processed"] -= 1
        progress["completed"] = progress["processed"]
    loop_state = fit.get("epoch_loop.state_dict") or {}
    if "_batches_that_stepped" in loop_state:  # counted once more by Lightning on restart
        loop_state["_batches_that_stepped"] -= 1
    return True


def _own_state(state: Any) -> bool:
    return isinstance(state, dict) and set(state) == {"epoch", "batches"}
