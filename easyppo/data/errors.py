"""Errors raised by the data pipeline, each pointing at the exact place that needs fixing.

A training run on a million-row file that dies with ``KeyError: 'content'`` after an hour teaches the
user nothing. Every problem found in the data is therefore a :class:`RowError` that names the source
(file path or dataset name), the row number and the field, and every problem in the configuration is a
:class:`DataConfigError` that names the config key. All of them are raised while the data is being
prepared, before the first training step.

Row-number convention (the same everywhere in easyppo): **row numbers are 1-based**. In a JSONL file
the row number is the line number, so ``sed -n 17p file.jsonl`` shows row 17 (blank lines are skipped
but still counted). In a JSON array, a Parquet file, an HF ``datasets`` split or a TFDS split it is the
1-based position of the record.
"""

from __future__ import annotations

from collections.abc import Sequence

#: How many individual row errors an aggregated error message lists before summarising the rest.
MAX_ERRORS_SHOWN = 10


class RowError(ValueError):
    """One malformed row (or, with ``row=None``, a source that cannot be read at all).

    Attributes:
      source: file path or dataset name the row came from.
      row: 1-based row number (see the module docstring), or None for whole-file problems.
      field: dotted/indexed path of the offending field, e.g. ``"chosen[2].content"``; None when the
        problem is the row as a whole (not JSON, not an object).
      reason: a short stable code such as ``"missing_field"``, used to count bad rows by kind.
      detail: the human-readable explanation without the location prefix.
    """

    def __init__(self, source: str, row: int | None, field: str | None, reason: str, detail: str) -> None:
        self.source = source
        self.row = row
        self.field = field
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.location}: {detail}")

    @property
    def location(self) -> str:
        parts = [self.source]
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.field is not None:
            parts.append(f"field '{self.field}'")
        return ", ".join(parts)

    # Exceptions whose constructor takes other arguments than the message need __reduce__ to pickle
    # (and so to cross process boundaries, e.g. out of a datasets.map worker).
    def __reduce__(self):
        return (type(self), (self.source, self.row, self.field, self.reason, self.detail))


class BadRowsError(ValueError):
    """Bad rows were found and ``on_bad_row="error"``: lists the first few, counts the rest."""

    def __init__(self, errors: Sequence[RowError], num_rows: int, headline: str | None = None) -> None:
        self.errors = list(errors)
        self.num_rows = num_rows
        if headline is None:
            headline = f"{len(self.errors)} of {num_rows} rows are malformed (set data.on_bad_row='skip' to skip them)"
        self.headline = headline
        super().__init__(_with_examples(headline, self.errors))

    def __reduce__(self):
        return (type(self), (self.errors, self.num_rows, self.headline))


class TooManyBadRowsError(BadRowsError):
    """``on_bad_row="skip"`` but the bad fraction exceeds ``max_bad_fraction``: the data is suspect."""

    def __init__(self, errors: Sequence[RowError], num_rows: int, max_bad_fraction: float) -> None:
        fraction = len(errors) / max(num_rows, 1)
        headline = (
            f"{len(errors)} of {num_rows} rows ({fraction:.2%}) are malformed, more than "
            f"data.max_bad_fraction={max_bad_fraction:g}"
        )
        super().__init__(errors, num_rows, headline)
        self.max_bad_fraction = max_bad_fraction

    def __reduce__(self):
        return (type(self), (self.errors, self.num_rows, self.max_bad_fraction))


class DataConfigError(ValueError):
    """An invalid data option; the message starts with the config key, e.g. ``data.kind``."""

    def __init__(self, key: str, detail: str) -> None:
        self.key = key
        self.detail = detail
        super().__init__(f"data.{key}: {detail}")

    def __reduce__(self):
        return (type(self), (self.key, self.detail))


def _with_examples(headline: str, errors: Sequence[RowError]) -> str:
    if not errors:
        return headline
    shown = [f"  {error}" for error in errors[:MAX_ERRORS_SHOWN]]
    if len(errors) > MAX_ERRORS_SHOWN:
        shown.append(f"  ... and {len(errors) - MAX_ERRORS_SHOWN} more")
    return "\n".join([headline + ":", *shown])
