"""`PreferenceDataModule`: raw pairs -> normalized -> tokenized -> token-reward cache -> batches.

Usable with a plain ``Trainer`` (no CLI needed)::

    data = PreferenceDataModule("demo", tokenizer="smollm2", max_length=512,
                                max_prompt_length=256, batch_size=4, val_fraction=0.1)
    trainer.fit(module, datamodule=data)

Token rewards come from the injected source ``rewards`` (a
:class:`~treg_lightning.rewards.TokenRewardSource`; default: the paper's contrastive
self-generated rewards, :class:`~treg_lightning.rewards.ContrastiveRewards`, cached): ``setup``
hands it the tokenized pairs of each split, on every rank, and serves what it returns. With
``rewards=None`` no source runs and the batches carry no token rewards (plain DPO / IPO / SimPO;
a regularizer that needs token rewards is refused at start-up).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from treg_lightning.data.collate import LengthGroupedSampler, PreferenceCollator, pair_lengths
from treg_lightning.data.errors import DataFormatError, SkipReport
from treg_lightning.data.formats import normalize_rows
from treg_lightning.data.resumable import ResumableDataLoader
from treg_lightning.data.settings import check_loader_settings
from treg_lightning.data.sources import DEMO_SOURCE, RawSource, load_source
from treg_lightning.data.splits import (
    LABELS,
    SplitSource,
    check_overlaps,
    duplicates_note,
    hold_out,
    load_split,
    plan_splits,
    require_split,
)
from treg_lightning.data.tokenize import PairTokenizer, tokenize_pairs
from treg_lightning.errors import ConfigError
from treg_lightning.models.loading import load_tokenizer
from treg_lightning.passes import distributed
from treg_lightning.rewards.contrastive import ContrastiveRewards
from treg_lightning.rewards.source import AnnotationContext, TokenRewardSource

SPLITS = ("train", "val", "test")
# The splits each Trainer stage needs; the others are still read, to check for shared pairs.
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


class PreferenceDataModule(pl.LightningDataModule):
    """Preference pairs with token rewards, served as the contract's padded batch dicts.

    Args:
        source: Training pairs: "demo" (shipped set), a local .jsonl/.json/.parquet/.csv file,
            a folder saved with Dataset.save_to_disk, or a Hugging Face hub dataset id.
        tokenizer: Tokenizer name or path (hub id, folder, .gguf file or "smollm2"); use the
            policy model's.
        split: Split of `source` to train on (hub datasets, data folders, saved DatasetDicts).
        val_source: Validation pairs, same kinds as `source`. Setting it or `val_split`
            disables `val_fraction`.
        val_split: Split of `val_source` (or of `source` when `val_source` is unset).
        val_fraction: Without `val_source`/`val_split`, hold out this fraction of `source`'s
            rows for validation, chosen by `seed` (0: no validation); every copy of a held-out
            pair is held out with it.
        test_source: Test pairs for `treg test` (test/* metrics), same kinds as `source`.
        test_split: Split of `test_source` (or of `source` when `test_source` is unset).
        allow_overlap: Run even when validation or test pairs are also training pairs (or
            test pairs validation pairs), with a warning giving the count; by default such
            data is refused, naming both settings.
        max_length: Maximum tokens of prompt + one response.
        max_prompt_length: Maximum prompt tokens (cut from the left); < `max_length`.
        chat_template: Jinja chat template replacing the tokenizer's (needed if it has none).
        batch_size: Pairs per training batch, per device.
        eval_batch_size: Pairs per validation batch (None: `batch_size`).
        num_workers: DataLoader worker processes.
        seed: Seed for the validation hold-out and the batch order (with the epoch).
        skip_invalid_rows: Skip rows with content problems (empty response, roles out of
            order, chosen identical to rejected, ...) and report the counts per reason; False
            raises on the first one. Schema problems (missing columns, unreadable files)
            always raise.
        limit: Use only the first `limit` rows of each source (>= 1; None: all).
        megabatch_size: Global batches per length-sorted group in the training order (larger:
            less padding, less random batches).
        rewards: Source of the token rewards (and cached reference log-probs): default the
            contrastive self-generated rewards of the paper
            (treg_lightning.rewards.ContrastiveRewards: template, evaluator, batch size, cache
            folder); treg_lightning.rewards.SpanRewards (spans in the data) or
            treg_lightning.rewards.ModelContrastRewards (two models); null: no token rewards
            (plain DPO / IPO / SimPO).
        trust_remote_code: Allow tokenizer/model code from the hub.
    """

    def __init__(
        self,
        source: str = "demo",
        tokenizer: str = "smollm2",
        split: str = "train",
        val_source: str | None = None,
        val_split: str | None = None,
        val_fraction: float = 0.0,
        test_source: str | None = None,
        test_split: str | None = None,
        allow_overlap: bool = False,
        max_length: int = 2048,
        max_prompt_length: int = 1800,
        chat_template: str | None = None,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        skip_invalid_rows: bool = True,
        limit: int | None = None,
        megabatch_size: int = 64,
        rewards: TokenRewardSource | None = lazy_instance(ContrastiveRewards),
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        check_loader_settings(batch_size, eval_batch_size, num_workers, megabatch_size, limit)
        if not 0 < max_prompt_length < max_length:
            raise ConfigError(
                f"max_prompt_length ({max_prompt_length}) must be positive and smaller than "
                f"max_length ({max_length}), so that every response keeps at least one token."
            )
        if rewards is not None and not isinstance(rewards, TokenRewardSource):
            raise ConfigError(
                f"rewards must be a token-reward source (e.g. treg_lightning.rewards."
                f"ContrastiveRewards(...)) or None for no token rewards, got {rewards!r}."
            )
        self.save_hyperparameters(ignore=["rewards"])
        self.source = source
        self.tokenizer_name = tokenizer
        self.split = split
        self.val_source = val_source
        self.val_split = val_split
        self.val_fraction = val_fraction
        self.test_source = test_source
        self.test_split = test_split
        self.allow_overlap = allow_overlap
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.chat_template = chat_template
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.skip_invalid_rows = skip_invalid_rows
        self.limit = limit
        self.megabatch_size = megabatch_size
        self.rewards = rewards
        self.trust_remote_code = trust_remote_code
        self.tokenizer = None
        self.datasets: dict[str, object] = {}
        self.lengths: dict[str, list[int]] = {}
        self.reports: dict[str, SkipReport] = {}
        self.repeats: dict[str, list[int]] = {}  # rows repeating an earlier pair, per split

    # --- Lightning hooks -----------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Downloads (hub datasets, tokenizer) once per node; nothing is kept in memory."""
        self.get_tokenizer()
        for where in self.split_plan().values():
            if where.source != DEMO_SOURCE and not Path(where.source).expanduser().exists():
                load_source(where.source, where.split, self.limit)  # a hub dataset: HF cache

    def setup(self, stage: str | None = None) -> None:
        """Builds the splits needed by `stage` (all when None); idempotent.

        Raises:
            ConfigError: ``validate`` / ``test`` without such data configured, or validation /
                test pairs that are also training pairs (see ``allow_overlap``).
            DataFormatError: an empty source, or no usable pair left in a split.
        """
        plan = self.split_plan()
        if stage in ("validate", "test"):
            require_split(plan, _STAGE_SPLITS[stage][0], stage)
        wanted = [s for s in _STAGE_SPLITS.get(stage or "fit", SPLITS) if s in plan]
        if all(split in self.datasets for split in wanted):
            return
        rows = self.tokenized_rows()
        for split in wanted:
            if split not in self.datasets and rows.get(split):
                self.datasets[split] = self.serve(split, rows[split])
                self.lengths[split] = pair_lengths(rows[split])
        if self.rewards is not None:
            self.rewards.release()  # only annotation needs the evaluator: free it before training

    def train_dataloader(self) -> DataLoader:
        loader = self._dataloader("train", self.batch_size, shuffle=True)
        loader.consumed = self._batches_consumed
        return loader

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.datasets:
            return []  # Lightning runs no validation loop for an empty list
        return self._dataloader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._dataloader("test", self.eval_batch_size, shuffle=False)

    # --- building blocks (overridable) ---------------------------------------------------------

    def tokenized_rows(self) -> dict[str, list[dict]]:
        """Normalized and tokenized pairs per split ("train", and "val" / "test" if
        configured); logs reports. Everything here runs before any model or evaluator loads.

        Raises:
            DataFormatError: A schema problem, an invalid row with skip_invalid_rows False, an
                empty source, or no usable row left in a split.
            ConfigError: Splits sharing pairs (see ``allow_overlap``), or a ``val_fraction``
                that leaves no training row.
        """
        tokenizer = self.get_tokenizer()
        if self.rewards is not None:  # its models exist and read these ids, before tokenizing
            self.rewards.check_models(self.annotation_context())
        pair_tokenizer = PairTokenizer(
            tokenizer, self.max_length, self.max_prompt_length, self.chat_template
        )
        examples = self._examples()
        rows = {}
        for split, (source_name, split_examples) in examples.items():
            report = self.reports[split]
            rows[split] = tokenize_pairs(
                split_examples, pair_tokenizer, self.skip_invalid_rows, report, source_name
            )
            self._log_report(split, source_name, report, rows[split])
        return rows

    def annotate(self) -> dict[str, object]:
        """Runs the reward source over every split (building its cache); returns the served
        rows by split. What ``treg annotate`` calls."""
        if self.rewards is None:
            raise ConfigError(
                "nothing to annotate: data.rewards is null (no token-reward source). Set it to "
                "a source, e.g. data.rewards: {class_path: treg_lightning.rewards."
                "ContrastiveRewards}."
            )
        rows = self.tokenized_rows()
        served = {split: self.serve(split, r) for split, r in rows.items() if r}
        self.rewards.release()
        return served

    def get_tokenizer(self):
        """The data's tokenizer (``tokenizer`` setting), loaded on first use and kept: the one
        that tokenizes the pairs, prompt sets and generated answers alike."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(
                self.tokenizer_name, trust_remote_code=self.trust_remote_code
            )
        return self.tokenizer

    def serve(
        self, split: str, rows: list[dict], rewards: TokenRewardSource | None = None
    ) -> list[dict]:
        """``rows`` (tokenized pairs of ``split``, :meth:`tokenized_rows`) as the data serves
        them: annotated by the token-reward source ``rewards`` (default: the data's own
        ``rewards``; its cache is read or built), or as they are when there is none."""
        rewards = rewards if rewards is not None else self.rewards
        if rewards is None:
            return rows
        return rewards.annotate(rows, split, self.annotation_context())

    # --- internals -----------------------------------------------------------------------------

    def split_plan(self) -> dict[str, SplitSource]:
        """Where each configured split's rows come from (``train``, ``val``, ``test``)."""
        return plan_splits(
            self.source,
            self.split,
            self.val_source,
            self.val_split,
            self.val_fraction,
            self.test_source,
            self.test_split,
        )

    def _examples(self) -> dict[str, tuple[str, list[dict]]]:
        """Normalized examples per split, with their source's display name; refuses splits
        that share pairs (:func:`~treg_lightning.data.splits.check_overlaps`)."""
        plan = self.split_plan()
        sources = {
            split: load_split(split, where, self.limit)
            for split, where in plan.items()
            if not where.held_out
        }
        if "val" in plan and plan["val"].held_out:
            sources["train"], sources["val"] = hold_out(
                sources["train"], self.val_fraction, self.seed
            )
        sources = {split: sources[split] for split in SPLITS if split in sources}
        examples = {
            split: (raw.name, self._normalize(split, raw)) for split, raw in sources.items()
        }
        normalized = {split: rows for split, (_, rows) in examples.items()}
        self.repeats = check_overlaps(normalized, plan, self.allow_overlap)
        return examples

    def _normalize(self, split: str, source: RawSource) -> list[dict]:
        self.reports[split] = SkipReport()
        return normalize_rows(source, self.skip_invalid_rows, self.reports[split])

    def _log_report(self, split: str, name: str, report: SkipReport, rows: list[dict]) -> None:
        message = f"{split} data from {name}: {len(rows)} pairs; {report.summary()}"
        repeats = self.repeats.get(split) or []
        message += duplicates_note(repeats)
        if report.num_skipped or repeats:
            rank_zero_warn(message)
        else:
            rank_zero_info(message)
        if not rows:
            which = "" if split == "train" else f"{LABELS[split]} "
            raise DataFormatError(
                f"no usable {which}pairs left: {report.summary()}",
                file=name,
                hint="Check the data format (see treg_lightning.data.formats) and the lengths.",
            )

    def annotation_context(self) -> AnnotationContext:
        """What a token-reward source is handed with the rows (tokenizer, model name, device)."""
        return AnnotationContext(
            tokenizer=self.get_tokenizer(),
            model_name=self.tokenizer_name,
            device=self._device(),
            settings={"max_length": self.max_length, "max_prompt_length": self.max_prompt_length},
            trust_remote_code=self.trust_remote_code,
        )

    def _device(self) -> torch.device:
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _batches_consumed(self) -> int | None:
        # The fit loop's count of batches stepped on this epoch; the loader has yielded one
        # more (Lightning fetches ahead), which a resumed run must not skip.
        try:
            return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        except AttributeError:
            return None

    def _replicas(self) -> tuple[int, int]:
        """(num_replicas, rank) of data parallelism, from the Trainer's strategy if attached."""
        if self.trainer is not None:
            # Parallel strategies say how data is split (data-parallel size, not world size,
            # under tensor parallelism); single-device strategies have no such attribute.
            kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
            return kwargs.get("num_replicas", 1), kwargs.get("rank", 0)
        ranks = distributed()
        return ranks.world_size, ranks.rank

    def _dataloader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(
                f"no {split} pairs: setup() has not run for this stage (the Trainer runs it) or "
                f"the data has no {split} split configured."
            )
        dataset = self.datasets[split]
        num_replicas, rank = self._replicas()
        sampler = LengthGroupedSampler(
            self.lengths[split],
            batch_size,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=self.seed,
            megabatch_size=self.megabatch_size,
        )
        tokenizer = self.get_tokenizer()
        pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = tokenizer.eos_token_id
        # Resumable mid-epoch: Lightning stores its position in checkpoints (training only; the
        # validation loop always runs whole).
        loader_class = ResumableDataLoader if shuffle else DataLoader
        return loader_class(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=PreferenceCollator(pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
