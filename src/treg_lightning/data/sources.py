"""Load raw preference rows from wherever they live, as a list of plain dicts.

A source is one string:

* ``"demo"``: the small preference set shipped in the package (``data/demo/pairs.jsonl``);
* a local file: ``.jsonl``, ``.json``, ``.parquet``, ``.csv`` (``.jsonl``/``.json`` may be
  gzipped, e.g. ``hh-rlhf.jsonl.gz``);
* a local folder: one written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``'s, then
  ``split`` picks the split), or a folder of data files that ``datasets.load_dataset`` reads;
* otherwise a Hugging Face hub dataset id, loaded with ``datasets.load_dataset(id, split=split)``.

Unreadable files (not UTF-8, truncated, corrupt) raise `DataFormatError` naming the file (and
the line for json/jsonl/csv) instead of a parser stack trace.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from treg_lightning.data.errors import DataFormatError
from treg_lightning.errors import MissingFileError

DEMO_SOURCE = "demo"

SOURCE_HINT = (
    "Pass an existing .jsonl/.json/.parquet/.csv file, a folder saved with "
    "Dataset.save_to_disk, a Hugging Face hub dataset id, or 'demo'."
)


@dataclass
class RawSource:
    """Rows as read, before normalization.

    Attributes:
        name: Display name used in error messages (file name, or hub id with split).
        rows: One dict per row, in source order; row ``i`` is ``rows[i]``.
        lines: 1-based file line of each row, when the format has lines (jsonl).
        indices: Row number in the original source of each row, when this is a subset
            (see `subset`); None means ``rows[i]`` is row ``i``.
    """

    name: str
    rows: list[dict]
    lines: list[int] | None = None
    indices: list[int] | None = None

    def index_of(self, position: int) -> int:
        """Row number in the original source of ``rows[position]``."""
        return self.indices[position] if self.indices is not None else position

    def line_of(self, position: int) -> int | None:
        """1-based file line of ``rows[position]``, if known."""
        return self.lines[position] if self.lines is not None else None

    def subset(self, positions: list[int]) -> RawSource:
        """The rows at `positions` (in that order), keeping their original row numbers."""
        return RawSource(
            self.name,
            [self.rows[p] for p in positions],
            [self.lines[p] for p in positions] if self.lines is not None else None,
            [self.index_of(p) for p in positions],
        )


def load_source(source: str, split: str = "train", limit: int | None = None) -> RawSource:
    """Reads the raw rows of `source` (see the module docstring for what a source can be).

    Args:
        source: "demo", a local file or folder, or a Hugging Face hub dataset id.
        split: Split to read from a hub dataset, a data-file folder or a saved DatasetDict.
        limit: Keep only the first `limit` rows (None: all).
    """
    if source == DEMO_SOURCE:
        loaded = _read_file(_demo_path(), name="demo")
    else:
        path = Path(source).expanduser()
        if path.is_file():
            loaded = _read_file(path, name=path.name)
        elif path.is_dir():
            loaded = _read_folder(path, split)
        elif _looks_like_path(source):
            raise MissingFileError(f"{source}: no such file or folder. {SOURCE_HINT}")
        else:
            loaded = _read_hub(source, split, limit)
    if limit is not None:
        loaded.rows = loaded.rows[:limit]
        loaded.lines = loaded.lines[:limit] if loaded.lines is not None else None
    return loaded


def _demo_path() -> Path:
    path = Path(str(resources.files("treg_lightning.data") / "demo" / "pairs.jsonl"))
    if not path.is_file():
        raise MissingFileError(
            f"the demo set {path} is missing from the installed package; reinstall treg-lightning."
        )
    return path


def _looks_like_path(source: str) -> bool:
    # A hub id is "name" or "owner/name"; anything with a file suffix, a leading ./ ~ / or more
    # than one slash is meant as a local path, so a typo gives "no such file", not a hub lookup.
    suffixes = {".json", ".jsonl", ".gz", ".parquet", ".csv", ".arrow"}
    return (
        Path(source).suffix in suffixes
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or "\\" in source
    )


# --- files -----------------------------------------------------------------------------------


def _read_file(path: Path, name: str) -> RawSource:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1] if suffixes else path.suffix
    reader = _READERS.get(kind)
    if reader is None:
        raise DataFormatError(
            f"unsupported file type '{kind or path.name}'",
            file=name,
            hint=f"Use one of {', '.join(sorted(_READERS))}. {SOURCE_HINT}",
        )
    return reader(path, name)


def _read_bytes(path: Path, name: str) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (EOFError, OSError, zlib.error) as error:
        raise DataFormatError(
            f"the gzip file is truncated or corrupt ({error})",
            file=name,
            hint="Download or write the file again.",
        ) from None


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")  # -sig: a leading byte-order mark is not data
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataFormatError(
            f"not valid UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start})",
            file=name,
            line=line,
            hint="Convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`).",
        ) from None


def _read_jsonl(path: Path, name: str) -> RawSource:
    text = _decode(_read_bytes(path, name), name)
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        rows.append(_parse_json_object(line, name, number))
        lines.append(number)
    return RawSource(name, rows, lines)


def _parse_json_object(line: str, name: str, number: int) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataFormatError(
            f"invalid JSON ({error.msg}, column {error.colno}); the file may be truncated",
            file=name,
            line=number,
            hint="Each line of a .jsonl file must be one complete JSON object.",
        ) from None
    if not isinstance(value, dict):
        raise DataFormatError(
            f"expected a JSON object per line, got {type(value).__name__}",
            file=name,
            line=number,
            hint="Each line of a .jsonl file must be one JSON object with the data columns.",
        )
    return value


def _read_json(path: Path, name: str) -> RawSource:
    text = _decode(_read_bytes(path, name), name)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several objects, one per line: it is really jsonl
            return _read_jsonl(path, name)
        raise DataFormatError(
            f"invalid JSON ({error.msg}, column {error.colno}); the file may be truncated",
            file=name,
            line=error.lineno,
            hint="Write the file again, or use .jsonl with one object per line.",
        ) from None
    return RawSource(name, _json_rows(value, name))


def _json_rows(value, name: str) -> list[dict]:
    if isinstance(value, list) and all(isinstance(row, dict) for row in value):
        return value
    columns_ok = isinstance(value, dict) and all(isinstance(v, list) for v in value.values())
    if columns_ok and len({len(v) for v in value.values()}) <= 1:
        # Column-oriented {"prompt": [...], "chosen": [...], ...}, as pandas writes it.
        keys = list(value)
        return [dict(zip(keys, values)) for values in zip(*value.values())]
    raise DataFormatError(
        "expected a list of row objects or an object of equal-length column lists",
        file=name,
        hint='Write [{"prompt": ..., "chosen": ..., "rejected": ...}, ...] or use .jsonl.',
    )


def _read_csv(path: Path, name: str) -> RawSource:
    text = _decode(_read_bytes(path, name), name)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        rows = [dict(row) for row in reader]
    except csv.Error as error:
        raise DataFormatError(
            f"invalid CSV ({error})", file=name, line=reader.line_num, hint="Write it again."
        ) from None
    return RawSource(name, rows)


def _read_parquet(path: Path, name: str) -> RawSource:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataFormatError(
            f"cannot read the parquet file, it is truncated or not parquet ({first_line})",
            file=name,
            hint="Write or download the file again.",
        ) from None
    return RawSource(name, table.to_pylist())


_READERS: dict[str, Callable[[Path, str], RawSource]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


# --- folders and the hub -----------------------------------------------------------------------


def _read_folder(path: Path, split: str) -> RawSource:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _read_saved(path, split)
    return _read_hub(str(path), split, None, name=f"{path.name} (split '{split}')")


def _read_saved(path: Path, split: str) -> RawSource:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataFormatError(
                f"no split '{split}' in the saved DatasetDict",
                file=path.name,
                hint=f"Set split to one of {sorted(loaded)}.",
            )
        loaded = loaded[split]
        return RawSource(f"{path.name} (split '{split}')", loaded.to_list())
    return RawSource(path.name, loaded.to_list())


def _read_hub(source: str, split: str, limit: int | None, name: str | None = None) -> RawSource:
    name = name or f"{source} (split '{split}')"
    try:
        loaded = datasets.load_dataset(source, split=split)
    except Exception as error:  # noqa: BLE001 - the hub raises many types; all mean "cannot load"
        raise DataFormatError(
            f"cannot load the Hugging Face dataset '{source}' split '{split}': "
            f"{type(error).__name__}: {error}",
            hint=f"Check the id, the split and your network or HF_HUB_OFFLINE. {SOURCE_HINT}",
        ) from error
    if limit is not None:
        loaded = loaded.select(range(min(limit, len(loaded))))
    return RawSource(name, loaded.to_list())
