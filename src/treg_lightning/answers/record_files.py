"""The files ``treg predict`` and ``treg pairs`` write, in the layout their name says.

- ``.jsonl``: JSON lines, one object a line (what ``treg fit --data.source`` and
  ``treg evaluate`` read, and what a long run can be streamed into);
- ``.json``: one JSON list of the same objects (AlpacaEval's ``model_outputs.json``; the data
  readers read it too).

Any other name is refused at start-up: a ``.csv`` or ``.txt`` file holding JSON would mislead
every tool that trusts the suffix. Both layouts are written atomically (a reader never sees half
a file) and read back by :func:`read_records`.
"""

from __future__ import annotations

import json
from pathlib import Path

from treg_lightning.errors import ConfigError
from treg_lightning.outputs import disk_full_hint
from treg_lightning.passes import write_jsonl, write_text

LAYOUTS = {".jsonl": "JSON lines", ".json": "one JSON list"}


def check_suffix(path: str | Path, setting: str = "--output.path") -> Path:
    """Refuse a name whose suffix is neither ``.jsonl`` nor ``.json``; returns the path."""
    path = Path(path).expanduser()
    if path.suffix not in LAYOUTS:
        named = f"ends with {path.suffix}" if path.suffix else "has no suffix"
        raise ConfigError(
            f"{setting} {path}: the name {named}, which says neither of the two layouts written "
            "here. Name the file .jsonl (JSON lines, one object a line) or .json (one JSON list, "
            "as AlpacaEval's model_outputs.json)."
        )
    return path


def write_records(path: str | Path, rows: list[dict], advice: str) -> Path:
    """``rows`` as the layout of ``path``'s suffix, written atomically; ``advice`` says what to
    do when the disk fills up."""
    path = Path(path)
    with disk_full_hint(path, advice):
        if path.suffix == ".json":
            write_text(path, json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
        else:
            write_jsonl(path, rows)
    return path


def read_records(path: str | Path) -> list[dict]:
    """The rows of a file written by :func:`write_records` (a ``.json`` list, else JSON lines)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]
