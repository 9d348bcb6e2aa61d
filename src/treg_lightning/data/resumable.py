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
