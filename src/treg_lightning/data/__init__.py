"""The data layer: load raw pairs, normalize, tokenize, cache token rewards, batch."""

from treg_lightning.data.collate import LengthGroupedSampler, PreferenceCollator, pair_lengths
from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.data.errors import DataFormatError, InvalidRowError, SkipReport
from treg_lightning.data.formats import normalize_row, normalize_rows
from treg_lightning.data.sources import DEMO_SOURCE, RawSource, load_source
from treg_lightning.data.tokenize import PairTokenizer, tokenize_pairs

__all__ = [
    "DEMO_SOURCE",
    "DataFormatError",
    "InvalidRowError",
    "LengthGroupedSampler",
    "PairTokenizer",
    "PreferenceCollator",
    "PreferenceDataModule",
    "RawSource",
    "SkipReport",
    "load_source",
    "normalize_row",
    "normalize_rows",
    "pair_lengths",
    "tokenize_pairs",
]
