"""The annotate pass: self-generated token rewards (METHOD.md section 1) and reference logps.

For each pair and each response ``y`` (chosen, rejected) the evaluator scores the same response
ids after three contexts: ``x_better`` and ``x_worse`` from a :class:`ContrastiveTemplate`, and
the plain prompt ``x`` (``prompt_ids``). Stored per response token:

    r_hat_t   = sigmoid(log p(y_t | x_better, y_<t) - log p(y_t | x_worse, y_<t)) - 0.5
    ref_logp_t = log p(y_t | x, y_<t)            (if store_reference_logps)

Work is split into chunks of ``chunk_pairs`` consecutive pairs; chunk ``c`` is done by rank
``c % world_size`` and saved to ``work_dir/chunk-{c:06d}.safetensors`` (temp file +
``os.replace``, so a killed run never leaves a partial chunk). A rerun skips finished chunks.
Each chunk is batched on its own in a fixed order, so the result is bit-for-bit the same however
the run was cut and however many ranks did it. Rank 0 merges the chunks after a barrier.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from treg_lightning.errors import ConfigError
from treg_lightning.logprobs import token_logps_from_hidden
from treg_lightning.outputs import disk_full_hint
from treg_lightning.rewards.prompts import ContrastiveTemplate, get_template

RESPONSES = ("chosen", "rejected")


class TokenRewardAnnotator:
    """Computes the token-reward cache rows for tokenized pairs.

    Args:
        template: contrastive template: a preset name (``"instruct"``, ``"revise"``) or a
            :class:`ContrastiveTemplate`.
        batch_size: sequences (context + response) per forward pass.
        store_reference_logps: also store the evaluator's token logps of each response under
            the plain prompt, so DPO/IPO can train without a live reference model. Only valid
            as reference logps when the evaluator is the reference model.
        chunk_pairs: pairs per resumable work unit (one file each).
        max_context_length: cut the contrastive contexts to this many tokens (older turns first;
            the instruction is kept); None leaves them whole.
        logp_chunk_size: rows of lm_head logits computed at a time.
        progress: show a tqdm bar (tokens/s) on rank 0.
    """

    def __init__(
        self,
        template: str | ContrastiveTemplate = "instruct",
        batch_size: int = 8,
        store_reference_logps: bool = True,
        chunk_pairs: int = 32,
        max_context_length: int | None = None,
        logp_chunk_size: int = 1024,
        progress: bool = True,
    ) -> None:
        if batch_size < 1 or chunk_pairs < 1:
            raise ConfigError("batch_size and chunk_pairs must be >= 1.")
        self.template = get_template(template)
        self.batch_size = batch_size
        self.store_reference_logps = store_reference_logps
        self.chunk_pairs = chunk_pairs
        self.max_context_length = max_context_length
        self.logp_chunk_size = logp_chunk_size
        self.progress = progress
        # Throughput counters: tokens forwarded (contexts + responses), seconds, forward passes.
        self.stats = {"tokens": 0, "seconds": 0.0, "forwards": 0, "chunks_done": 0}

    def settings(self) -> dict[str, Any]:
        """What changes the cached values (for the cache fingerprint)."""
        return {
            "template": self.template.to_dict(),
            "store_reference_logps": self.store_reference_logps,
            "max_context_length": self.max_context_length,
        }

    def __call__(
        self,
        model: torch.nn.Module,
        tokenizer,
        rows: Sequence[Mapping[str, Any]],
        work_dir: str | Path,
        rank: int | None = None,
        world_size: int | None = None,
        on_chunk_done: Callable[[int], None] | None = None,
    ) -> datasets.Dataset | None:
        """Annotate this rank's chunks, then (rank 0) merge all chunks into a dataset.

        Args:
            model: the evaluator, a causal LM (``get_output_embeddings`` and ``base_model``).
            tokenizer: its tokenizer (the one that produced the rows' ids).
            rows: tokenized pairs with ``prompt`` (messages), ``chosen``/``rejected`` (texts),
                ``prompt_ids``/``chosen_ids``/``rejected_ids`` and optionally ``index``.
            work_dir: folder for the chunk files.
            rank, world_size: default to torch.distributed's when initialized, else 0 and 1.
            on_chunk_done: called with the chunk number after each chunk file is written.

        Returns:
            On rank 0 the merged dataset (CONTRACT "Token-reward cache rows"); None elsewhere.
        """
        rank, world_size, barrier = _dist(rank, world_size)
        _check_plain_logits(model)
        rows = rows if isinstance(rows, list) else list(rows)
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        n_chunks = -(-len(rows) // self.chunk_pairs)
        todo = [
            c
            for c in range(rank, n_chunks, world_size)
            if not self._chunk_done(work_dir, c, rows[self._chunk_slice(c)])
        ]
        bar = self._progress_bar(rows, todo, rank)
        for c in todo:
            chunk_rows = rows[self._chunk_slice(c)]
            columns = self.annotate_rows(model, tokenizer, chunk_rows, bar)
            _write_chunk(work_dir / _chunk_name(c), columns, self._chunk_key(chunk_rows))
            self.stats["chunks_done"] += 1
            if on_chunk_done is not None:
                on_chunk_done(c)
        if bar is not None:
            bar.close()
        barrier()
        return self.merge(rows, work_dir) if rank == 0 else None

    def _chunk_slice(self, c: int) -> slice:
        return slice(c * self.chunk_pairs, (c + 1) * self.chunk_pairs)

    def _chunk_key(self, chunk_rows) -> str:
        """Identity of a chunk's inputs: a leftover chunk from other inputs is recomputed."""
        h = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode())
        for row in chunk_rows:
            texts = [row.get(k) for k in ("prompt", *RESPONSES)]
            h.update(json.dumps([texts, *(list(row[k]) for k in _ID_KEYS)]).encode())
        return h.hexdigest()

    def _chunk_done(self, work_dir: Path, c: int, chunk_rows) -> bool:
        path = work_dir / _chunk_name(c)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="numpy") as f:
                return f.metadata().get("key") == self._chunk_key(chunk_rows)
        except Exception:  # noqa: BLE001 -- an unreadable chunk is simply redone
            return False

    def _progress_bar(self, rows, todo: list[int], rank: int):
        if not self.progress or rank != 0:
            return None
        per_pair = 2 * (3 if self.store_reference_logps else 2)
        n_pairs = sum(len(rows[self._chunk_slice(c)]) for c in todo)
        return tqdm(total=n_pairs * per_pair, unit="seq", desc="annotate", smoothing=0.1)

    @torch.inference_mode()
    def annotate_rows(self, model, tokenizer, rows, bar=None) -> dict[str, list[np.ndarray]]:
        """Rewards (and reference logps) of a list of pairs; one float32 array per response."""
        was_training = model.training
        model.eval()  # no dropout: annotation must be deterministic
        try:
            return self._annotate_rows(model, tokenizer, rows, bar)
        finally:
            model.train(was_training)

    def _annotate_rows(self, model, tokenizer, rows, bar) -> dict[str, list[np.ndarray]]:
        sequences, keys = [], []
        for i, row in enumerate(rows):
            for name in RESPONSES:
                for context_name, context in self._contexts(tokenizer, row, name).items():
                    sequences.append((context, list(row[f"{name}_ids"])))
                    keys.append((i, name, context_name))
        start = time.perf_counter()
        seconds_before = self.stats["seconds"]

        def on_batch(n_sequences: int, n_tokens: int) -> None:
            self.stats["tokens"] += n_tokens
            self.stats["forwards"] += 1
            self.stats["seconds"] = seconds_before + time.perf_counter() - start
            if bar is not None:
                bar.update(n_sequences)
                bar.set_postfix(tok_s=f"{self.stats['tokens'] / self.stats['seconds']:.0f}")

        logps = score_sequences(model, sequences, self.batch_size, self.logp_chunk_size, on_batch)
        by_key = dict(zip(keys, logps, strict=True))
        columns: dict[str, list[np.ndarray]] = {}
        for name in RESPONSES:
            columns[f"{name}_rewards"] = [
                token_rewards(by_key[i, name, "better"], by_key[i, name, "worse"])
                for i in range(len(rows))
            ]
            if self.store_reference_logps:
                columns[f"{name}_ref_logps"] = [by_key[i, name, "plain"] for i in range(len(rows))]
        return columns

    def _contexts(self, tokenizer, row, name: str) -> dict[str, list[int]]:
        better, worse = self.template.build(
            tokenizer, row["prompt"], row[name], max_length=self.max_context_length
        )
        contexts = {"better": better, "worse": worse}
        if self.store_reference_logps:
            contexts["plain"] = list(row["prompt_ids"])
        return contexts

    def merge(self, rows: Sequence[Mapping[str, Any]], work_dir: str | Path) -> datasets.Dataset:
        """Assemble the dataset from all chunk files (raises if one is missing)."""
        work_dir = Path(work_dir)
        value_names = [f"{n}_rewards" for n in RESPONSES]
        if self.store_reference_logps:
            value_names += [f"{n}_ref_logps" for n in RESPONSES]
        values: dict[str, list[np.ndarray]] = {k: [] for k in value_names}
        for c in range(-(-len(rows) // self.chunk_pairs)):
            path = work_dir / _chunk_name(c)
            if not path.is_file():
                raise FileNotFoundError(f"Annotation chunk {path} is missing; rerun annotate.")
            chunk = _read_chunk(path)
            for k in value_names:
                values[k].extend(chunk[k])
        table = {
            "index": pa.array([r.get("index", i) for i, r in enumerate(rows)], pa.int64()),
            **{k: _list_array([r[k] for r in rows], np.int32) for k in _ID_KEYS},
            **{k: _list_array(v, np.float32) for k, v in values.items()},
        }
        return datasets.Dataset(pa.table(table))


_ID_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")


def token_rewards(better_token_logps: np.ndarray, worse_token_logps: np.ndarray) -> np.ndarray:
    """``r_hat_t = sigmoid(better_t - worse_t) - 0.5``, float32, in (-0.5, 0.5)."""
    diff = torch.from_numpy(better_token_logps - worse_token_logps)
    return (torch.sigmoid(diff) - 0.5).numpy().astype(np.float32)


def score_sequences(
    model: torch.nn.Module,
    sequences: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
    logp_chunk_size: int = 1024,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[np.ndarray]:
    """Token logps of each ``response`` after its ``context``: one float32 array per sequence.

    Sequences are sorted by length (longest first, stable) and batched with right padding, so
    the result depends only on the list given. ``on_batch(n_sequences, n_tokens)`` is called
    after each forward pass.
    """
    order = sorted(range(len(sequences)), key=lambda i: -sum(map(len, sequences[i])))
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(sequences)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = [sequences[i] for i in indices]
        for i, logps in zip(indices, _score_batch(model, batch, logp_chunk_size), strict=True):
            out[i] = logps
        if on_batch is not None:
            on_batch(len(batch), sum(len(c) + len(r) for c, r in batch))
    return out


def _score_batch(model, batch, logp_chunk_size: int) -> list[np.ndarray]:
    device = model.get_output_embeddings().weight.device
    width = max(len(c) + len(r) for c, r in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
    response_mask = torch.zeros(len(batch), width, dtype=torch.bool)
    for b, (context, response) in enumerate(batch):
        n = len(context) + len(response)
        input_ids[b, :n] = torch.tensor(context + response)
        attention_mask[b, :n] = 1
        response_mask[b, len(context) : n] = True
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    response_mask = response_mask.to(device)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
    head = model.get_output_embeddings()
    token_logps = token_logps_from_hidden(
        hidden,
        head.weight,
        input_ids,
        response_mask,
        chunk_size=logp_chunk_size,
        softcap=getattr(model.config, "final_logit_softcapping", None),
        lm_head_bias=head.bias,
    ).float()
    return [
        token_logps[b, len(c) : len(c) + len(r)].cpu().numpy() for b, (c, r) in enumerate(batch)
    ]


def _check_plain_logits(model) -> None:
    """Logits must be ``lm_head(hidden)`` (+ Gemma-2 soft-capping, which is handled)."""
    for key in ("logit_scale", "logits_scaling"):
        value = getattr(model.config, key, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} scales its logits ({key}={value}); the annotate pass "
                "computes logps from lm_head(hidden) and would get them wrong for this model."
            )


def check_same_vocab(tokenizer, evaluator_tokenizer, evaluator_name: str = "evaluator") -> None:
    """Raise if the evaluator's tokenizer does not map every token to the same id: the cached
    response ids are scored by the evaluator as they are."""
    a, b = tokenizer.get_vocab(), evaluator_tokenizer.get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()), key=str)[:5]
        raise ConfigError(
            f"The {evaluator_name} model's tokenizer differs from the data tokenizer (vocab sizes "
            f"{len(b)} vs {len(a)}; e.g. {diff}): token rewards need the same vocabulary. Use an "
            "evaluator from the same model family, or leave it unset to use the reference model."
        )


def _dist(rank: int | None, world_size: int | None):
    dist = torch.distributed
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
    return rank, world_size, (dist.barrier if initialized else lambda: None)


def _chunk_name(c: int) -> str:
    return f"chunk-{c:06d}.safetensors"


def _write_chunk(path: Path, columns: dict[str, list[np.ndarray]], key: str) -> None:
    """One safetensors file: per column the concatenated values and the per-row lengths."""
    tensors = {}
    for name, arrays in columns.items():
        tensors[f"{name}.values"] = np.concatenate(arrays).astype(np.float32)
        tensors[f"{name}.lengths"] = np.array([len(a) for a in arrays], np.int64)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    advice = "free space or point cache_dir elsewhere; finished chunks are kept"
    try:
        with disk_full_hint(path, advice):
            save_file(tensors, str(tmp), metadata={"key": key})
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a partial chunk (disk full, error) is never left behind


def _read_chunk(path: Path) -> dict[str, list[np.ndarray]]:
    tensors = load_file(str(path))
    columns = {}
    for name in {k.rsplit(".", 1)[0] for k in tensors}:
        splits = np.cumsum(tensors[f"{name}.lengths"])[:-1]
        columns[name] = np.split(tensors[f"{name}.values"], splits)
    return columns


def _list_array(arrays: Sequence[Sequence], dtype) -> pa.ListArray:
    lengths = np.array([len(a) for a in arrays], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate([np.asarray(a, dtype) for a in arrays]) if len(arrays) else []
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.asarray(values, dtype)))
