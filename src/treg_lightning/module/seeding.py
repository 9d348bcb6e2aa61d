"""Random draws of a training step that a resumed run repeats exactly.

Lightning checkpoints do not hold the global random state, so dropout (LoRA's ``lora_dropout``,
a model's own dropout) drew other masks after a resume than the run that never stopped did.
:func:`seed_step` seeds the global generators at the start of every training batch from the
run's seed, the step, the batch and the process rank: the masks of a batch depend on where it
is in the run, not on how the run got there.
"""

from __future__ import annotations

import hashlib
import os

import torch


def step_seed(seed: int, global_step: int, batch_idx: int, rank: int) -> int:
    """A 63-bit seed for one batch of one process (distinct for each combination)."""
    text = f"{seed}:{global_step}:{batch_idx}:{rank}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def seed_step(global_step: int, batch_idx: int, rank: int) -> int | None:
    """Seed torch's generators for this batch from the run's seed (``seed_everything``, the
    ``PL_GLOBAL_SEED`` variable); an unseeded run is left alone. Returns the seed used."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    if seed is None:
        return None
    value = step_seed(int(seed), global_step, batch_idx, rank)
    torch.manual_seed(value)
    return value
