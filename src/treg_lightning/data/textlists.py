"""Message lists that another tool flattened to text, read back safely or refused.

``pandas.DataFrame.to_csv`` writes a list of ``{role, content}`` dicts as its Python repr
(``"[{'role': 'user', 'content': 'Hi'}]"``), and some pipelines store JSON text in a string
column. Read as plain strings, those rows would train the repr as the response text. A value that
looks like a message list (it starts with ``[`` or ``{`` and names a ``role`` key) is parsed with
``json.loads``, then ``ast.literal_eval`` (literals only: it never runs code), then as numpy's
repr of an object array (what pandas writes for a column read from parquet: the dicts are
separated by spaces, not commas; the missing commas are put back between tokens, so quotes and
braces inside the texts are never touched); when none gives a message list, the row is refused
with the reason, never trained as text.
"""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize

from treg_lightning.data.errors import InvalidRowError

# A quoted 'role' or "role" key, as in a dict repr or JSON object.
_ROLE_KEY = re.compile(r"""["']role["']\s*:""")
# The start of a list of dicts, or of a dict.
_OPENING = re.compile(r"\s*(\[\s*)?\{")
# Longest text parsed: ast.literal_eval of a huge or deeply nested literal is slow.
MAX_CHARS = 5_000_000


def looks_like_messages(text: str) -> bool:
    """Whether ``text`` reads as a flattened message list (or one message) rather than prose:
    it opens a list of dicts (or a dict) and names a quoted ``role`` key. The end is not
    looked at, so a cell cut off by a tool's length limit is caught (and refused) too."""
    return _OPENING.match(text) is not None and _ROLE_KEY.search(text) is not None


def parse_messages(text: str, field: str) -> list:
    """The message list that ``text`` holds as JSON or as a Python literal.

    Raises:
        InvalidRowError: the text looks like a message list but is neither valid JSON nor a
            Python literal (e.g. numpy's repr without commas, or a cut-off cell), or it holds
            something else than a list of messages.
    """
    stripped = text.strip()
    value = _load(stripped) if len(stripped) <= MAX_CHARS else None
    if isinstance(value, dict):
        value = [value]  # a single message
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        if value is None:
            why = "it is neither JSON nor a Python literal (a cut-off cell?)"
        elif isinstance(value, list):
            why = "not all of its items are {role, content} messages"
        else:
            why = f"it holds a {type(value).__name__}, not a list of messages"

        raise InvalidRowError(
            f"looks like a message list stored as text, but cannot be read back: {why}",
            field=field,
            reason="message list stored as unreadable text",
            hint="Write the data as .jsonl or .parquet (e.g. Dataset.to_json), which keep "
            "message lists as lists; or set skip_invalid_rows=true to count and skip the row.",
        )
    return value


def _load(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    for candidate in (text, _with_commas_between_dicts(text)):
        if candidate is None:
            continue
        try:
            return ast.literal_eval(candidate)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return None


def _with_commas_between_dicts(text: str) -> str | None:
    """numpy's ``[{...} {...}\\n {...}]`` with the commas back (``}`` then ``{`` tokens)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return None
    out, previous, inserted = [], None, False
    for token in tokens:
        if token.type in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT):
            continue
        if token.exact_type == tokenize.LBRACE and previous == tokenize.RBRACE:
            out.append((tokenize.OP, ","))
            inserted = True
        out.append((token.type, token.string))
        previous = token.exact_type
    return tokenize.untokenize(out) if inserted else None
