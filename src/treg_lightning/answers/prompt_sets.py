"""Prompt sets for ``treg predict``: the data's held-out prompts or a prompts file.

A prompt is ``{"index", "messages", "instruction", "prompt_ids", ...}``: the chat messages
(ending with the user's turn), the AlpacaEval ``instruction`` (the last user turn), and the
prompt token ids, made exactly as in training (:meth:`PairTokenizer.prompt_ids`, cut from the
left to ``max_prompt_length``), so the policy is asked in the format it was trained on.

A prompts file is ``.jsonl`` (one JSON value a line) or ``.json`` (a list), either possibly
gzipped (``.jsonl.gz``), or a ``.csv`` / ``.parquet`` table (one prompt a row; a CSV cell may hold
a message list as text). The bytes are read, un-gzipped and decoded by the data readers of
:mod:`treg_lightning.data.sources`, so a truncated gzip, non-UTF-8 text or a corrupt parquet file
get the same messages as in training. Each row is one of:

- a string (one user turn);
- a list of ``{"role", "content"}`` messages ending with the user's turn;
- an object with ``messages`` (a message list), ``prompt`` (a string or message list) or
  ``instruction`` (AlpacaEval's eval set; an Alpaca ``input`` field is appended to it). Other
  fields (AlpacaEval's ``dataset``) are kept in the output rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from treg_lightning.data.errors import DataFormatError, SkipReport
from treg_lightning.data.formats import _check_roles, _prompt_messages, _read_back_message_lists
from treg_lightning.data.sources import _READERS, _decode, _read_bytes, _read_file
from treg_lightning.data.tokenize import PairTokenizer

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
            "or leave --prompts unset to use the data's validation prompts.",
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


def instruction_of(messages: list[dict]) -> str:
    """AlpacaEval's ``instruction``: the last user turn."""
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def build_prompt_set(
    prompts: list[dict[str, Any]], pair_tokenizer: PairTokenizer, report: SkipReport
) -> list[dict[str, Any]]:
    """Prompt ids for each prompt (as in training); prompts cut to ``max_prompt_length`` are
    counted in ``report.truncated["prompt"]``."""
    out = []
    for index, prompt in enumerate(prompts):
        ids = pair_tokenizer.prompt_ids(prompt["messages"])
        ids = pair_tokenizer._truncate_prompt(ids, report)  # the very cut training applies
        out.append(
            {
                "index": index,
                "messages": prompt["messages"],
                "instruction": instruction_of(prompt["messages"]),
                "prompt_ids": ids,
                "extra": prompt.get("extra", {}),
            }
        )
    return out


def data_prompts(datamodule, split: str) -> list[dict[str, Any]]:
    """The distinct prompts of a split of a :class:`PreferenceDataModule`, in data order, with
    the prompt ids training used (pairs sharing a prompt give one prompt)."""
    rows = datamodule.tokenized_rows()
    if not rows.get(split):
        from treg_lightning.errors import ConfigError

        raise ConfigError(
            f"the data has no {split!r} pairs to take prompts from (splits: "
            f"{sorted(k for k, v in rows.items() if v)}). Set data.val_fraction or "
            "data.val_source for held-out prompts, --split train, or give --prompts FILE."
        )
    seen, out = set(), []
    for row in rows[split]:
        key = json.dumps(row["prompt"], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append(
            {
                "index": len(out),
                "messages": row["prompt"],
                "instruction": instruction_of(row["prompt"]),
                "prompt_ids": list(row["prompt_ids"]),
                "extra": {"pair_index": row.get("index")},
            }
        )
    repeated = len(rows[split]) - len(out)
    rank_zero_info(
        f"prompts: {len(out)} distinct prompts of the {split} split"
        + (f" ({repeated} pairs repeat an earlier prompt)" if repeated else "")
    )
    return out


def load_prompt_set(
    datamodule, prompts_file: str | None, split: str, limit: int | None = None
) -> list[dict[str, Any]]:
    """The prompts of ``prompts_file`` (tokenized with the data's tokenizer and lengths) or of
    the data's ``split``; the first ``limit`` only when set."""
    if prompts_file is None:
        prompt_set = data_prompts(datamodule, split)
    else:
        tokenizer = datamodule._load_tokenizer()
        pair_tokenizer = PairTokenizer(
            tokenizer,
            datamodule.max_length,
            datamodule.max_prompt_length,
            datamodule.chat_template,
        )
        report = SkipReport()
        prompt_set = build_prompt_set(read_prompts_file(prompts_file), pair_tokenizer, report)
        cut = report.truncated["prompt"]
        rank_zero_info(
            f"prompts: {len(prompt_set)} from {prompts_file}"
            + (f"; {cut} cut from the left to data.max_prompt_length" if cut else "")
        )
    return prompt_set[:limit] if limit is not None else prompt_set
