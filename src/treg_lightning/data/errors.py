"""Errors that speak to the user, and the report of rows skipped on the way.

Two kinds of problems exist in a preference data set:

* schema problems (a missing or misspelled column, an unreadable file): nothing can be trained
  until they are fixed, so they always raise `DataFormatError`;
* row problems (an empty response, roles out of order, a pair too long to fit): one bad row
  out of 60,000 should not stop a run, so with `skip_invalid_rows=True` they are skipped and
  counted by reason in a `SkipReport`, printed at the end. With `skip_invalid_rows=False` the
  first one raises `InvalidRowError`. Nothing is ever dropped without being counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from treg_lightning.errors import UserError

SKIP_HINT = "Fix or remove the row, or set skip_invalid_rows=true to count and skip it."


class DataFormatError(UserError, ValueError):
    """A data problem, located as precisely as known (file, row, field), with what to do.

    Args:
        problem: What is wrong, e.g. "empty response".
        file: Display name of the source (file name, hub id and split, "demo").
        row: Row index in the source, counted from 0 as `datasets` indexes rows.
        field: Column or field name, e.g. "chosen" or "chosen[1].role".
        hint: What to do about it.
        line: 1-based line in the file when known (jsonl, json, csv).
        reason: Short category used to count skipped rows; defaults to `problem`.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
        hint: str | None = None,
        line: int | None = None,
        reason: str | None = None,
    ) -> None:
        self.problem = problem
        self.file = file
        self.row = row
        self.field = field
        self.hint = hint
        self.line = line
        self.reason = reason or problem
        super().__init__(self._message())

    def located(self, *, file: str | None = None, row: int | None = None, line: int | None = None):
        """Returns a copy with the location filled in where it was unknown."""
        return type(self)(
            self.problem,
            file=self.file or file,
            row=self.row if self.row is not None else row,
            field=self.field,
            hint=self.hint,
            line=self.line if self.line is not None else line,
            reason=self.reason,
        )

    def _message(self) -> str:
        where = [self.file] if self.file else []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.line is not None:
            where.append(f"(line {self.line})" if self.row is not None else f"line {self.line}")
        place = " ".join(where)
        if self.field is not None:
            place = f"{place}, field '{self.field}'" if place else f"field '{self.field}'"
        text = f"{place}: {self.problem}." if place else f"{self.problem}."
        return f"{text} {self.hint}" if self.hint else text


class InvalidRowError(DataFormatError):
    """A problem confined to one row: skippable with `skip_invalid_rows=True`."""

    def __init__(self, problem: str, **kwargs) -> None:
        kwargs.setdefault("hint", SKIP_HINT)
        super().__init__(problem, **kwargs)


@dataclass
class SkipReport:
    """Counts rows skipped per reason (and prompts/responses truncated) for one data split.

    Attributes:
        total: Number of rows read from the source.
        skipped: Skipped rows per reason.
        examples: The first few skipped row indices per reason, to find them again.
        truncated: Rows kept but truncated, per what was cut ("prompt", "chosen", "rejected").
    """

    total: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)
    truncated: Counter = field(default_factory=Counter)
    max_examples: int = 3

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, error: DataFormatError) -> None:
        """Counts one skipped row under `error.reason`."""
        self.skipped[error.reason] += 1
        rows = self.examples.setdefault(error.reason, [])
        if error.row is not None and len(rows) < self.max_examples:
            rows.append(error.row)

    def summary(self) -> str:
        """One line, e.g. "skipped 3 of 1500 rows: 2 empty response (rows 3, 17), ..."."""
        text = f"skipped {self.num_skipped} of {self.total} rows"
        if self.skipped:
            text += ": " + ", ".join(self._reason_text(r, n) for r, n in self.skipped.most_common())
        if self.truncated:
            cut = ", ".join(f"{n} {what}" for what, n in sorted(self.truncated.items()))
            text += f"; truncated {cut}"
        return text

    def _reason_text(self, reason: str, count: int) -> str:
        rows = self.examples.get(reason, [])
        if not rows:
            return f"{count} {reason}"
        label = "row" if len(rows) == 1 else "rows"
        more = ", ..." if count > len(rows) else ""
        return f"{count} {reason} ({label} {', '.join(map(str, rows))}{more})"
