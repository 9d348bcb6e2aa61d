"""Batches of preference pairs: padding collator and length-grouped sampler.

`PreferenceCollator` turns rows (``prompt_ids``, ``chosen_ids``, per-token values, ...) into the
batch of the pair contract (:mod:`treg_lightning.pairs`): per side ``{side}_input_ids``,
``{side}_attention_mask``, ``{side}_response_mask`` and whichever per-token values the rows carry
(``{side}_token_rewards``, ``{side}_ref_token_logps``), plus ``index`` and ``prompt_lengths``.
Each side is right-padded to its own longest sequence. A value the rows do not carry is not in
the batch: nothing is filled in for it.

`LengthGroupedSampler` orders pairs so that each batch holds pairs of similar length, which
cuts the padding the model computes on real data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import DistributedSampler

from treg_lightning.pairs import SIDES, VALUE_FIELDS, field
from treg_lightning.rewards.cache.store import CacheError


class PreferenceCollator:
    """Pads rows into the contract's batch dict.

    Args:
        pad_token_id: Id written at padding positions of ``input_ids`` (masked everywhere).
        pad_to_multiple_of: Round the padded length up to a multiple of this (None: no rounding).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = {
            "index": torch.tensor([int(row["index"]) for row in rows], dtype=torch.long),
            "prompt_lengths": torch.tensor([len(row["prompt_ids"]) for row in rows]),
        }
        for side in SIDES:
            batch.update(self._side(rows, side))
        return batch

    def _side(self, rows: Sequence[dict], side: str) -> dict[str, torch.Tensor]:
        lengths = [len(row["prompt_ids"]) + len(row[field(side, "ids")]) for row in rows]
        shape = (len(rows), self._padded_length(max(lengths)))
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        response_mask = torch.zeros(shape, dtype=torch.bool)
        values = {name: torch.zeros(shape) for name in _carried_values(rows, side)}
        for b, row in enumerate(rows):
            start, end = len(row["prompt_ids"]), lengths[b]
            input_ids[b, :end] = torch.tensor(
                list(row["prompt_ids"]) + list(row[field(side, "ids")])
            )
            attention_mask[b, :end] = 1
            response_mask[b, start:end] = True
            for name, tensor in values.items():
                tensor[b, start:end] = _per_token(row[field(side, name)], end - start, row, side)
        batch = {
            field(side, "input_ids"): input_ids,
            field(side, "attention_mask"): attention_mask,
            field(side, "response_mask"): response_mask,
        }
        batch.update({field(side, name): tensor for name, tensor in values.items()})
        return batch

    def _padded_length(self, length: int) -> int:
        multiple = self.pad_to_multiple_of
        return math.ceil(length / multiple) * multiple if multiple else length


def _carried_values(rows: Sequence[dict], side: str) -> list[str]:
    """The per-token value fields the rows carry; all rows of a batch must agree."""
    carried = []
    for name in VALUE_FIELDS:
        present = [row.get(field(side, name)) is not None for row in rows]
        if all(present):
            carried.append(name)
        elif any(present):
            missing = [row.get("index") for row, ok in zip(rows, present, strict=True) if not ok]
            raise CacheError(
                f"rows {missing} have no {field(side, name)} while others of their batch do: "
                "the data serves per-token values for some pairs only. Rebuild the token-reward "
                "cache (delete its folder) so that every pair is annotated."
            )
    return carried


def _per_token(values, num_tokens: int, row: dict, side: str) -> torch.Tensor:
    if len(values) != num_tokens:
        raise CacheError(
            f"row {row.get('index')}: {len(values)} per-token values for {num_tokens} "
            f"{side} tokens; the token-reward cache does not match the tokenized data. "
            "Delete the cache folder and rebuild it."
        )
    return torch.as_tensor(values, dtype=torch.float32)


def pair_lengths(rows: Sequence[dict]) -> list[int]:
    """Grouping key of each pair: prompt + longer response, in tokens."""
    return [
        len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
        for row in rows
    ]


class LengthGroupedSampler(DistributedSampler):
    """Yields this rank's pair indices so that consecutive `batch_size` pairs have similar length.

    Per epoch (seeded by ``seed + epoch``, like `DistributedSampler`): shuffle all indices, pad
    them (drop_last=False) or cut them (drop_last=True) to a multiple of `num_replicas`, cut
    them into mega-batches of ``megabatch_size`` global batches (``batch_size * num_replicas``
    pairs), sort each mega-batch by length, split it into global batches and shuffle those. Rank
    ``r`` takes the ``r``-th slice of each global batch, so all ranks step on pairs of similar
    length too. The last, smaller global batch stays last so batches never straddle groups.
    Without shuffle (evaluation) all pairs are sorted by length, longest first.

    It is a `DistributedSampler` given its ``num_replicas``/``rank`` explicitly, so Lightning
    leaves it in place (it only injects a sampler when the DataLoader's is not one) and calls
    `set_epoch` on it each epoch; this works whatever the Trainer's `use_distributed_sampler`.
    Use it as ``DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=...)``.

    Args:
        lengths: Length of each pair (see `pair_lengths`).
        batch_size: Per-rank batch size of the DataLoader using this sampler.
        num_replicas: Number of data-parallel ranks.
        rank: This rank.
        shuffle: Shuffle (training) or sort all by length (evaluation).
        seed: Base seed; the order is a function of ``seed`` and the epoch only.
        drop_last: Drop the tail so every rank gets the same number of distinct pairs (else
            the tail is padded with repeated pairs, as `DistributedSampler` does).
        megabatch_size: Global batches per sorted group: larger groups cut more padding but
            make batch composition less random.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        megabatch_size: int = 64,
    ) -> None:
        super().__init__(
            lengths,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.megabatch_size = megabatch_size
        # Indices to drop from the start of the next iteration only (mid-epoch resume, see
        # ResumableDataLoader): skipping here means the skipped batches are never collated.
        self.skip_samples = 0

    def __iter__(self):
        order = self._global_order()
        global_batch = self.batch_size * self.num_replicas
        mine = []
        for start in range(0, len(order), global_batch):
            chunk = order[start : start + global_batch]
            share = len(chunk) // self.num_replicas  # chunk length is a multiple of replicas
            mine.extend(chunk[self.rank * share : (self.rank + 1) * share])
        skip, self.skip_samples = self.skip_samples, 0
        return iter(mine[skip:])

    def _global_order(self) -> list[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        if self.shuffle:
            indices = torch.randperm(len(self.lengths), generator=generator).tolist()
        else:
            indices = list(range(len(self.lengths)))
        if self.drop_last:
            indices = indices[: self.total_size]
        else:
            repeats = math.ceil(self.total_size / max(len(indices), 1))
            indices = (indices * repeats)[: self.total_size]
        if not self.shuffle:
            return sorted(indices, key=lambda i: -self.lengths[i])
        return self._grouped(indices, generator)

    def _grouped(self, indices: list[int], generator: torch.Generator) -> list[int]:
        global_batch = self.batch_size * self.num_replicas
        group = global_batch * self.megabatch_size
        batches = []
        for start in range(0, len(indices), group):
            chunk = sorted(indices[start : start + group], key=lambda i: -self.lengths[i])
            batches.extend(chunk[i : i + global_batch] for i in range(0, len(chunk), global_batch))
        full = [batch for batch in batches if len(batch) == global_batch]
        partial = [batch for batch in batches if len(batch) < global_batch]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return [index for batch in shuffled + partial for index in batch]
