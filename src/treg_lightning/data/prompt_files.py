"""Prompts files: the prompts ``treg predict --prompts.file`` and ``treg pairs --prompts.file``
answer, one a row.

A prompts file is ``.jsonl`` (one JSON value a line) or ``.json`` (a list), either possibly
gzipped (``.jsonl.gz``), or a ``.csv`` / ``.parquet`` table (one prompt a row; a CSV cell may hold
a message list as text). The bytes are read, un-gzipped and decoded by the readers of
:mod:`treg_lightning.data.sources`, so a truncated gzip, non-UTF-8 text or a corrupt parquet file
get the same messages as in training. Each row is one of:

- a string (one user turn);
- a list of ``{"role", "content"}`` messages ending with the user's turn;
- an object with ``messages`` (a message list), ``prompt`` (a string or message list) or
  ``instruction`` (AlpacaEval's eval set; an Alpaca ``input`` field is appended to it), looked
  for in that order. A ``messages`` conversation that ends with the assistant's answer (the
  UltraFeedback layout: ``HuggingFaceH4/ultrafeedback_binarized`` rows carry ``prompt``,
  ``messages`` = [user, assistant], ``chosen``, ``rejected``, ``score_*``) is asked up to its
  last user turn: its prompt is the messages before the last assistant turn.

A row's prompt follows the rules of training's prompts (:mod:`treg_lightning.data.formats`): an
optional system message, then user / assistant turns alternating, ending with the user's, no
user turn without text. Training skips a pair that breaks them (``data.skip_invalid_rows``); a
prompts file is answered row for row, so such a row is refused, naming the file, row and field.

Other fields of an object row travel into the output rows (AlpacaEval's ``dataset``, a
``prompt_id``), except the answers the source holds and their scores (:data:`ANSWER_FIELDS`,
any ``score_*`` field): they are another model's answers, not this prompt's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from treg_lightning.data.errors import DataFormatError, InvalidRowError
from treg_lightning.data.formats import (
    _check_prompt_text,
    _check_roles,
    _prompt_messages,
    _read_back_message_lists,
)
from treg_lightning.data.sources import _READERS, _decode, _read_bytes, _read_file

PROMPT_FIELDS = ("messages", "prompt", "instruction")
# Answers a preference or generation set holds for the prompt (UltraFeedback, the SimPO
# on-policy sets), not carried into the rows answering it; ``score_*`` fields neither.
ANSWER_FIELDS = ("chosen", "rejected", "completions", "all_generated_responses", "all_rm_scores")
# Fields that describe the prompt itself (or an earlier answer) rather than travel with it.
_CONSUMED = {*PROMPT_FIELDS, *ANSWER_FIELDS, "input", "output", "generator"}
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
    prompts = []
    for row, (line, value) in enumerate(_numbered_values(path)):
        try:
            prompts.append(prompt_row(value))
        except DataFormatError as error:
            hint = error.hint if type(error) is DataFormatError else _ROW_HINT
            raise DataFormatError(
                error.problem, file=str(path), row=row, line=line, field=error.field, hint=hint
            ) from None
    if not prompts:
        raise DataFormatError("the prompts file holds no prompt", file=str(path))
    return prompts


# A prompts file has no skip setting: every row is answered, so the hint is to fix the row.
_ROW_HINT = (
    "Fix or remove the row (training skips such a pair; a prompts file is answered row for "
    "row, so it is refused)."
)


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


def prompt_row(value) -> dict[str, Any]:
    """``{"messages", "extra"}`` of one row of a prompts file (see the module docstring).

    Raises:
        DataFormatError: the row holds no prompt field; InvalidRowError: its prompt breaks
            the rules of training's prompts (the field named).
    """
    extra: dict[str, Any] = {}
    field = "prompt"
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
        extra = {
            k: v for k, v in value.items() if k not in _CONSUMED and not k.startswith("score_")
        }
        prompt = value[field]
        if field == "instruction" and str(value.get("input") or "").strip():
            prompt = f"{prompt}\n\n{value['input']}"
    else:
        prompt = value
    if not isinstance(prompt, (str, list)):
        raise DataFormatError(
            f"a prompt must be a string or a list of messages, got {type(prompt).__name__}",
            field=field,
        )
    try:
        messages = _prompt_messages(prompt)
        if field == "messages":
            messages = _before_last_answer(messages)
        if not messages or not any(m["content"].strip() for m in messages):
            raise InvalidRowError("empty prompt", field="prompt", reason="empty prompt")
        _check_prompt_text(messages)  # training's rule: no user turn without text
        _check_roles(messages)
    except InvalidRowError as error:
        where = error.field or "prompt"
        raise InvalidRowError(
            error.problem, field=field + where.removeprefix("prompt"), reason=error.reason
        ) from None
    return {"messages": messages, "extra": extra}


def _before_last_answer(messages: list[dict]) -> list[dict]:
    """A conversation up to its last user turn: the messages before its final assistant
    turn(s), or the messages as they are when they end with the user's turn."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    return messages[:end]
