"""Prompts files: the reader behind ``treg predict --prompts.file`` and ``treg pairs
--prompts.file``.

A prompts file is ``.jsonl`` (one JSON value a line) or ``.json`` (a list), either possibly
gzipped (``.jsonl.gz``), or a ``.csv`` / ``.parquet`` table (one prompt a row; a CSV cell may hold
a message list as text). The bytes are read, un-gzipped and decoded by the readers of the pair
data (:mod:`treg_lightning.data.sources`), and the messages checked as in
:mod:`treg_lightning.data.formats`, so a truncated gzip, non-UTF-8 text, a corrupt parquet file
or a prompt ending with the assistant get the same messages as in training. Each row is one of:

- a string (one user turn);
- a list of ``{"role", "content"}`` messages ending with the user's turn;
- an object with ``messages`` (a message list), ``prompt`` (a string or message list) or
  ``instruction`` (AlpacaEval's eval set; an Alpaca ``input`` field is appended to it). Other
  fields (AlpacaEval's ``dataset``) are kept as the row's ``extra``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from treg_lightning.data.errors import DataFormatError
from treg_lightning.data.formats import _check_roles, _prompt_messages, _read_back_message_lists
from treg_lightning.data.sources import _READERS, _decode, _read_bytes, _read_file

PROMPT_FIELDS = ("messages", "prompt", "instruction")
# Fields of a prompts-file row that describe the prompt itself rather than travel with it.
_CONSUMED = {*PROMPT_FIELDS, "input", "output", "generator"}
# Prompts files read as tables of row objects by the data readers.
_TABLE_READERS = {kind: _READERS[kind] for kind in (".csv", ".parquet")}


def read_prompts_file(path: str | Path) -> list[dict[str, Any]]:
    """``[{"messages", "extra"}]`` of a prompts file, in file order.

    Raises:
        DataFormatError: the file is missing or unreadable, or a row is not a prompt (naming
            the file, line and what to do).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataFormatError(
            "prompts file not found",
            file=str(path),
            hint="Give a .jsonl (one prompt a line), .json, .csv or .parquet file of prompts, "
            "or leave --prompts.file unset to use the data's validation prompts.",
        )
    numbered = _numbered_values(path)
    prompts = []
    for row, (line, value) in enumerate(numbered):
        try:
            prompts.append(_prompt_row(value))
        except DataFormatError as error:
            # A prompts file has no skip setting: the hint is to fix the row.
            hint = error.hint if type(error) is DataFormatError else "Fix or remove the row."
            raise DataFormatError(
                error.problem, file=str(path), row=row, line=line, field=error.field, hint=hint
            ) from None
    if not prompts:
        raise DataFormatError("the prompts file holds no prompt", file=str(path))
    return prompts


def _numbered_values(path: Path) -> list[tuple[int | None, Any]]:
    """``(line or None, value)`` of every row of the prompts file at ``path``."""
    suffixes = [suffix for suffix in path.suffixes if suffix != ".gz"]
    kind = suffixes[-1] if suffixes else path.suffix
    if kind not in (".jsonl", ".json", *_TABLE_READERS):
        raise DataFormatError(
            f"unsupported prompts file type '{kind or path.name}'",
            file=str(path),
            hint="Give a .jsonl, .jsonl.gz, .json, .json.gz, .csv or .parquet file of prompts.",
        )
    if kind in _TABLE_READERS:  # rows are objects: the data readers read them as they are
        source = _read_file(path, str(path))
        return [(source.line_of(i), row) for i, row in enumerate(source.rows)]
    text = _decode(_read_bytes(path, str(path)), str(path))
    if kind == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                f"invalid JSON ({err.msg}, column {err.colno}); the file may be truncated",
                file=str(path),
                line=err.lineno,
                hint="Write the list again, or use .jsonl with one prompt a line.",
            ) from None
        if not isinstance(values, list):
            raise DataFormatError("a .json prompts file must hold a list", file=str(path))
        return [(None, value) for value in values]
    return [
        (number, _json_line(line, path, number))
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()  # blank lines are layout, not rows
    ]


def _json_line(line: str, path: Path, number: int):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"not valid JSON ({err.msg})",
            file=str(path),
            line=number,
            hint="Each line must be one JSON value: a string, a message list or an object "
            "with a 'prompt', 'messages' or 'instruction' field.",
        ) from None


def _prompt_row(value) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if isinstance(value, dict):
        value = _read_back_message_lists(value)  # a message list stored as text (CSV)
        present = [f for f in PROMPT_FIELDS if f in value]
        # A table row has every column: an empty cell (CSV) or null (parquet) is no field.
        given = [f for f in present if value[f] is not None and value[f] != ""]
        field = (given or present or [None])[0]
        if field is None:
            raise DataFormatError(
                f"a prompt object needs one of the fields {list(PROMPT_FIELDS)}; it has "
                f"{sorted(value)}",
                hint="Name the prompt field 'prompt' (a string or message list), 'messages' or "
                "'instruction'.",
            )
        extra = {k: v for k, v in value.items() if k not in _CONSUMED}
        prompt = value[field]
        if field == "instruction" and str(value.get("input") or "").strip():
            prompt = f"{prompt}\n\n{value['input']}"
    else:
        prompt = value
    if not isinstance(prompt, (str, list)):
        raise DataFormatError(
            f"a prompt must be a string or a list of messages, got {type(prompt).__name__}",
            field="prompt",
        )
    messages = _prompt_messages(prompt)
    if not messages or not any(m["content"].strip() for m in messages):
        raise DataFormatError("empty prompt", field="prompt", hint="Remove the row.")
    _check_roles(messages)
    return {"messages": messages, "extra": extra}
