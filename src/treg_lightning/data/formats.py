"""Normalize raw preference rows into one internal form.

Every accepted row becomes::

    {"index": int,                                     # row in the source, for messages
     "prompt": [{"role": str, "content": str}, ...],   # ends with a user turn
     "chosen": str, "rejected": str}                   # assistant response texts

Accepted layouts (the ones TRL accepts, plus HH-RLHF transcripts):

* standard: ``prompt`` str, ``chosen``/``rejected`` str;
* conversational: ``prompt`` a list of ``{role, content}`` messages, ``chosen``/``rejected`` a
  list with one assistant message;
* full conversations (implicit prompt): ``chosen``/``rejected`` message lists that share their
  leading messages (the prompt) and end with one assistant message each; this covers the SimPO
  on-policy sets (``prompt`` str + ``chosen``/``rejected`` = [user, assistant]), where the
  conversation is authoritative and the ``prompt`` column is not needed;
* HH-RLHF transcripts: ``chosen``/``rejected`` strings of ``"\\n\\nHuman: ..."`` /
  ``"\\n\\nAssistant: ..."`` turns; the prompt is every turn but the last assistant turn, and it
  must be the same in both. A ``prompt`` string in that transcript form is parsed the same way.

Message content may be a string or a list of ``{"type": "text", "text": ...}`` parts. Response
texts are stripped of surrounding whitespace, as most chat templates do. A message list flattened
to text by another tool (a pandas CSV's Python repr, or JSON text) is read back safely or the row
is refused (see textlists.py). An empty prompt (empty text, empty list, a user turn with no text)
is refused, never trained.

Token-reward annotations of a row (``chosen_spans`` / ``rejected_spans``, see
:mod:`treg_lightning.rewards.spans`) are kept as they are, for the reward source to read; every
other extra column is dropped.

Schema problems (a missing or misspelled column) raise `DataFormatError`; problems of one row
raise `InvalidRowError`, which `normalize_rows` skips and counts when ``skip_invalid_rows`` is
True (see errors.py).
"""

from __future__ import annotations

import difflib
import re

from treg_lightning.data.errors import DataFormatError, InvalidRowError, SkipReport
from treg_lightning.data.sources import RawSource
from treg_lightning.data.textlists import looks_like_messages, parse_messages

ROLES = ("system", "user", "assistant")
REQUIRED_COLUMNS = ("chosen", "rejected")
MESSAGE_COLUMNS = ("prompt", "chosen", "rejected")
# Columns kept beside the normalized fields, for token-reward sources (rewards/spans.py).
ANNOTATION_COLUMNS = ("chosen_spans", "rejected_spans")
# Column names other data sets give the prompt, reported as "rename 'question' to 'prompt'".
PROMPT_ALIASES = (
    "question", "instruction", "query", "input", "context", "prompts", "questions",
    "instructions", "inputs", "user", "human", "request", "problem", "prompt_text", "text",
)  # fmt: skip

# "\n\nHuman: " / "\n\nAssistant: " turn markers of Anthropic's HH-RLHF transcripts.
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def normalize_rows(source: RawSource, skip_invalid_rows: bool, report: SkipReport) -> list[dict]:
    """Normalizes every row of `source`; counts skipped rows in `report`.

    Args:
        source: Rows as loaded by `load_source`.
        skip_invalid_rows: Skip (and count) rows with content problems instead of raising.
        report: Receives the total and the skipped rows per reason.

    Raises:
        DataFormatError: On a schema problem, or on the first invalid row when
            `skip_invalid_rows` is False, naming file, row and field.
    """
    report.total += len(source.rows)
    examples = []
    for position, row in enumerate(source.rows):
        index = source.index_of(position)
        try:
            example = normalize_row(row)
        except DataFormatError as error:
            error = error.located(file=source.name, row=index, line=source.line_of(position))
            if not (skip_invalid_rows and isinstance(error, InvalidRowError)):
                raise error from None
            report.skip(error)
            continue
        annotations = {k: row[k] for k in ANNOTATION_COLUMNS if row.get(k) is not None}
        examples.append({"index": index, **example, **annotations})
    return examples


def normalize_row(row: dict) -> dict:
    """Returns ``{"prompt": messages, "chosen": str, "rejected": str}`` for one raw row."""
    _check_columns(row)
    row = _read_back_message_lists(row)
    chosen, rejected = row["chosen"], row["rejected"]
    _check_response_type("chosen", chosen)
    _check_response_type("rejected", rejected)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise InvalidRowError(
            "chosen and rejected have different formats (one a string, one a message list)",
            field="rejected",
            reason="mixed formats",
        )
    if isinstance(chosen, str) and row.get("prompt") is None:
        try:
            chosen = _parse_transcript(chosen, "chosen", implicit=True, columns=list(row))
            rejected = _parse_transcript(rejected, "rejected", implicit=True, columns=list(row))
        except InvalidRowError:
            _check_prompt_alias(row)  # the prompt is in a column of another name: say so
            raise
    prompt = _prompt_messages(row.get("prompt"))
    if isinstance(chosen, str):
        if prompt is None:
            raise _no_shared_prompt("rejected", 0)
        example = {"prompt": prompt, "chosen": chosen.strip(), "rejected": rejected.strip()}
    else:
        example = _split_conversations(
            prompt, _messages(chosen, "chosen"), _messages(rejected, "rejected")
        )
    _check_example(example)
    return example


# --- columns and value types ------------------------------------------------------------------


def _check_columns(row: dict) -> None:
    keys = [str(key) for key in row]
    for column in REQUIRED_COLUMNS:
        if column not in row:
            raise DataFormatError(
                f"missing column '{column}'{_did_you_mean(column, keys)}",
                field=column,
                hint=f"Preference rows need 'chosen' and 'rejected' (and usually 'prompt'); "
                f"the row has {keys}. Rename the column (e.g. Dataset.rename_column).",
            )
    if "prompt" not in row:
        candidates = [key for key in keys if not key.endswith("_id") and key not in ("chosen",)]
        if guess := _did_you_mean("prompt", candidates):
            raise DataFormatError(
                f"missing column 'prompt'{guess}",
                field="prompt",
                hint="Rename the column to 'prompt', or remove it if the prompt is implicit "
                "in chosen/rejected.",
            )


def _read_back_message_lists(row: dict) -> dict:
    flattened = {
        field: parse_messages(row[field], field)
        for field in MESSAGE_COLUMNS
        if isinstance(row.get(field), str) and looks_like_messages(row[field])
    }
    return {**row, **flattened} if flattened else row


def _check_prompt_alias(row: dict) -> None:
    """No 'prompt' column but one under another usual name, beside string responses: say so
    (the row would otherwise be read as an HH-RLHF transcript without turn markers)."""
    lowered = {str(key).lower(): key for key in row}
    alias = next((lowered[name] for name in PROMPT_ALIASES if name in lowered), None)
    if alias is None or not isinstance(row[alias], (str, list)):
        return
    raise DataFormatError(
        f"no 'prompt' column; the file has columns {[str(key) for key in row]}",
        field="prompt",
        hint=f"Rename '{alias}' to 'prompt' (e.g. Dataset.rename_column('{alias}', 'prompt'), or "
        "edit the header), or give chosen/rejected as full conversations.",
    )


def _did_you_mean(name: str, keys: list[str]) -> str:
    lowered = {key.lower(): key for key in keys}
    matches = difflib.get_close_matches(name, list(lowered), n=1, cutoff=0.75)
    return f" (did you mean '{lowered[matches[0]]}'?)" if matches else ""


def _check_response_type(field: str, value) -> None:
    if value is None:
        raise InvalidRowError("empty response (null)", field=field, reason="empty response")
    if not isinstance(value, (str, list)):
        raise InvalidRowError(
            f"expected a string or a list of {{role, content}} messages, "
            f"got {type(value).__name__}",
            field=field,
            reason="non-string content",
        )


def _prompt_messages(prompt) -> list[dict] | None:
    if prompt is None:
        return None
    if isinstance(prompt, str):
        if prompt.lstrip("\n").startswith("Human:"):
            turns = _parse_transcript(prompt, "prompt", implicit=False)
            # An HH-style prompt ends with an empty "Assistant:" cue; the template adds its own.
            if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
                turns = turns[:-1]
            return turns
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return _messages(prompt, "prompt")
    raise InvalidRowError(
        f"expected a string or a list of {{role, content}} messages, got {type(prompt).__name__}",
        field="prompt",
        reason="non-string content",
    )


def _messages(value: list, field: str) -> list[dict]:
    return [_message(item, f"{field}[{i}]") for i, item in enumerate(value)]


def _message(item, field: str) -> dict:
    if not isinstance(item, dict) or "role" not in item or "content" not in item:
        keys = list(item) if isinstance(item, dict) else type(item).__name__
        raise InvalidRowError(
            f"expected a message {{'role': ..., 'content': ...}}, got {keys}",
            field=field,
            reason="malformed message",
        )
    role = item["role"]
    if role not in ROLES:
        raise InvalidRowError(
            f"unknown role {role!r}{_did_you_mean(str(role), list(ROLES))}; "
            f"roles are {', '.join(ROLES)}",
            field=f"{field}.role",
            reason="unknown role",
        )
    return {"role": role, "content": _text(item["content"], f"{field}.content")}


def _text(content, field: str) -> str:
    if isinstance(content, str):
        return content
    parts_ok = isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    )
    if parts_ok:  # multimodal-style [{"type": "text", "text": ...}] with text parts only
        return "".join(part["text"] for part in content)
    raise InvalidRowError(
        f"message content must be a string (or text parts), got {type(content).__name__}",
        field=field,
        reason="non-string content",
    )


# --- HH-RLHF transcripts --------------------------------------------------------------------


def _parse_transcript(
    text: str, field: str, implicit: bool, columns: list | None = None
) -> list[dict]:
    """Splits "\\n\\nHuman: a\\n\\nAssistant: b" into user/assistant messages."""
    text = "\n\n" + text.lstrip("\n") if text.lstrip("\n").startswith("Human:") else text
    pieces = _HH_MARKER.split(text)
    if len(pieces) < 3 or pieces[0].strip():
        if implicit:
            raise InvalidRowError(
                "no 'prompt' column, and the text has no '\\n\\nHuman:' / '\\n\\nAssistant:' "
                "turn markers to separate the prompt from the response (the row has columns "
                f"{[str(c) for c in columns or []]})",
                field=field,
                reason="implicit prompt without turn markers",
                hint="Add a 'prompt' column (rename the one that holds the prompt), or give "
                "chosen/rejected as message lists.",
            )
        return [{"role": "user", "content": text}]
    roles, contents = pieces[1::2], pieces[2::2]
    return [
        {"role": _HH_ROLES[role], "content": content.strip()}
        for role, content in zip(roles, contents)
    ]


# --- splitting prompt and responses ------------------------------------------------------------


def _split_conversations(prompt: list[dict] | None, chosen: list[dict], rejected: list[dict]):
    if prompt and _starts_with(chosen, prompt) and _starts_with(rejected, prompt):
        chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    elif len(chosen) > 1 or len(rejected) > 1:
        prompt = []  # full conversations: their shared leading messages are the prompt
    if not chosen or not rejected:
        field = "chosen" if not chosen else "rejected"
        raise InvalidRowError("empty response (no message)", field=field, reason="empty response")
    shared = _shared_length(chosen, rejected)
    if shared != len(chosen) - 1 or shared != len(rejected) - 1:
        differs = "chosen" if shared < len(chosen) - 1 else "rejected"
        raise _no_shared_prompt(f"{differs}[{shared}]", shared)
    given = prompt
    prompt = (prompt or []) + chosen[:-1]
    if not prompt and given is not None:
        raise InvalidRowError("empty prompt (no message)", field="prompt", reason="empty prompt")
    if not prompt:
        raise _no_shared_prompt("prompt", 0)
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise InvalidRowError(
                f"the response must be an assistant message, got {messages[-1]['role']!r}",
                field=f"{field}[{len(messages) - 1}].role",
                reason="roles out of order",
            )
    return {"prompt": prompt, "chosen": chosen[-1]["content"].strip(),
            "rejected": rejected[-1]["content"].strip()}  # fmt: skip


def _starts_with(messages: list[dict], prefix: list[dict]) -> bool:
    return len(messages) > len(prefix) and messages[: len(prefix)] == prefix


def _shared_length(first: list[dict], second: list[dict]) -> int:
    shared = 0
    for a, b in zip(first, second):
        if a != b:
            break
        shared += 1
    return shared


def _no_shared_prompt(field: str, at: int) -> InvalidRowError:
    return InvalidRowError(
        f"chosen and rejected do not share a prompt: they differ at message {at}, before "
        "their last (assistant) message",
        field=field,
        reason="implicit prompt not shared",
        hint="Give an explicit 'prompt' column, or fix the row; "
        "or set skip_invalid_rows=true to count and skip it.",
    )


# --- content checks ----------------------------------------------------------------------------


def _check_example(example: dict) -> None:
    _check_prompt_text(example["prompt"])
    _check_roles(example["prompt"])
    for field in ("chosen", "rejected"):
        if not example[field]:
            raise InvalidRowError("empty response", field=field, reason="empty response")
    if example["chosen"] == example["rejected"]:
        raise InvalidRowError(
            "chosen identical to rejected (no preference to learn)",
            field="rejected",
            reason="chosen identical to rejected",
        )


def _check_prompt_text(prompt: list[dict]) -> None:
    """A prompt must hold text, and so must each of its user turns."""
    if not any(message["content"].strip() for message in prompt):
        raise InvalidRowError(
            "empty prompt (no text to answer)", field="prompt", reason="empty prompt"
        )
    for position, message in enumerate(prompt):
        if message["role"] == "user" and not message["content"].strip():
            raise InvalidRowError(
                f"empty user message at prompt message {position}",
                field=f"prompt[{position}].content",
                reason="empty prompt",
            )


def _check_roles(prompt: list[dict]) -> None:
    """Optional system message, then user/assistant alternating, ending with user."""
    start = 1 if prompt and prompt[0]["role"] == "system" else 0
    turns = prompt[start:]
    for offset, message in enumerate(turns):
        expected = "user" if offset % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise InvalidRowError(
                f"roles out of order: expected {expected!r} at prompt message {start + offset}, "
                f"got {message['role']!r} (after an optional system message, roles alternate "
                "user/assistant and the prompt ends with user)",
                field="prompt",
                reason="roles out of order",
            )
    if not turns or turns[-1]["role"] != "user":
        raise InvalidRowError(
            "the prompt must end with a user message",
            field="prompt",
            reason="roles out of order",
        )
