"""Reading raw records (one dict per row) from files, HF ``datasets`` or TFDS, with their location.

This module only turns bytes into Python values and remembers where each value came from; it does not
judge the values (that is :mod:`easyppo.data.schema`). A line that is not JSON becomes a record that
carries its :class:`RowError` instead of a value, so that ``on_bad_row="skip"`` can count it like any
other bad row. A source that cannot be read at all (missing file, a ``.json`` file that is not JSON)
raises at once: there is no row to skip.

Text that is not valid UTF-8 is decoded with ``surrogateescape`` rather than rejected here, so the
schema check can say *which field* holds the bad bytes instead of only which line.

Paths go through ``etils.epath``, so ``gs://bucket/data/*.jsonl`` works where the GCS backend is
installed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from easyppo.data.errors import DataConfigError, RowError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_GLOB_CHARS = "*?["
_PARQUET_BATCH_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """One row as read from its source: either a parsed ``value`` or the ``error`` that prevented it."""

    source: str
    row: int
    value: Any = None
    error: RowError | None = None


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Where the rows come from: exactly one of ``path``, ``hf_dataset`` or ``tfds_dataset``.

    Attributes:
      path: a file, a glob, or several of them separated by commas (``.json``, ``.jsonl``,
        ``.parquet``; local or ``gs://``). Files are read in the order given, globs sorted.
      hf_dataset: a ``datasets`` name (hub name, local dataset directory, or a directory written by
        ``Dataset.save_to_disk``), loaded with ``split`` and the optional ``hf_subset`` (config name).
      tfds_dataset: a TFDS name such as ``"my_prefs/default:1.0.0"`` read through
        ``tfds.data_source`` (needs ``tensorflow-datasets``; TensorFlow itself is not needed).
      split: the split for ``hf_dataset`` / ``tfds_dataset``; ignored for files.
    """

    path: str = ""
    hf_dataset: str = ""
    hf_subset: str = ""
    tfds_dataset: str = ""
    tfds_data_dir: str = ""
    split: str = "train"

    def __post_init__(self) -> None:
        chosen = [key for key in ("path", "hf_dataset", "tfds_dataset") if getattr(self, key)]
        if len(chosen) != 1:
            raise DataConfigError(
                "path",
                "set exactly one of data.path, data.hf_dataset and data.tfds_dataset "
                f"(got {', '.join('data.' + k for k in chosen) if chosen else 'none'})",
            )


def read_records(spec: SourceSpec) -> Iterator[RawRecord]:
    """Yields every record of the source described by ``spec``, in a fixed order."""
    if spec.path:
        for path in expand_paths(spec.path):
            yield from read_file(path)
    elif spec.hf_dataset:
        yield from read_hf_dataset(spec.hf_dataset, spec.split, subset=spec.hf_subset)
    else:
        yield from read_tfds(spec.tfds_dataset, spec.split, data_dir=spec.tfds_data_dir)


def expand_paths(paths: str) -> list[str]:
    """Splits a comma-separated list of files and globs into concrete file paths.

    Raises:
      DataConfigError: (key ``data.path``) for a missing file, a glob that matches nothing, or a file
        type other than .json / .jsonl / .parquet.
    """
    files: list[str] = []
    for entry in (part.strip() for part in paths.split(",")):
        if not entry:
            continue
        matches = _glob(entry) if any(c in entry for c in _GLOB_CHARS) else [entry]
        if not matches:
            raise DataConfigError("path", f"'{entry}' matches no files")
        for match in matches:
            if not epath.Path(match).is_file():
                raise DataConfigError("path", f"no such file: {match}")
            if not match.endswith(FILE_SUFFIXES):
                raise DataConfigError(
                    "path", f"unsupported file type for {match}: expected one of {', '.join(FILE_SUFFIXES)}"
                )
            files.append(match)
    if not files:
        raise DataConfigError("path", "is empty")
    return files


def _glob(pattern: str) -> list[str]:
    """Globs ``pattern`` from its longest wildcard-free directory prefix (works for gs:// too)."""
    parts = pattern.split("/")
    first_wild = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
    base = "/".join(parts[:first_wild]) or "."
    return sorted(str(p) for p in epath.Path(base).glob("/".join(parts[first_wild:])))


def read_file(path: str) -> Iterator[RawRecord]:
    """Reads one .json / .jsonl / .parquet file (dispatch on the suffix)."""
    if path.endswith(".jsonl"):
        return read_jsonl(path)
    if path.endswith(".json"):
        return read_json(path)
    if path.endswith(".parquet"):
        return read_parquet(path)
    raise DataConfigError("path", f"unsupported file type for {path}")


def read_jsonl(path: str) -> Iterator[RawRecord]:
    """JSON Lines: one object per line; the row number is the 1-based line number."""
    with epath.Path(path).open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # A UTF-8 byte-order mark is not part of the first row.
            if not raw.strip():
                continue
            text = raw.decode("utf-8", errors="surrogateescape")
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                error = RowError(
                    path, line_number, None, "invalid_json", f"not valid JSON ({e.msg} at column {e.colno})"
                )
                yield RawRecord(path, line_number, error=error)
                continue
            yield RawRecord(path, line_number, value)


def read_json(path: str) -> Iterator[RawRecord]:
    """A JSON document holding an array of row objects; the row number is the 1-based array index."""
    text = epath.Path(path).read_bytes().decode("utf-8-sig", errors="surrogateescape")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (several JSON values: is this a JSON Lines file? name it .jsonl)" if e.msg == "Extra data" else ""
        raise RowError(
            path, None, None, "invalid_json", f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}{hint}"
        ) from None
    if not isinstance(document, list):
        raise RowError(
            path,
            None,
            None,
            "wrong_type",
            f"expected a JSON array of row objects at the top level, got {type_name(document)}",
        )
    for index, value in enumerate(document):
        yield RawRecord(path, index + 1, value)


def read_parquet(path: str) -> Iterator[RawRecord]:
    """A Parquet file; the row number is the 1-based row index across all row groups."""
    import pyarrow.parquet as pq  # Imported here: pyarrow is heavy and only Parquet needs it directly.

    with epath.Path(path).open("rb") as f:
        parquet = pq.ParquetFile(f)
        row_offset = 0
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            yield from _parquet_batch_records(path, batch, row_offset)
            row_offset += batch.num_rows


def _parquet_batch_records(path: str, batch, row_offset: int) -> Iterator[RawRecord]:
    try:
        values = batch.to_pylist()
    except UnicodeDecodeError:
        # Parquet strings are meant to be UTF-8 but not every writer checks; find the culprit cells.
        values = None
    if values is not None:
        for index, value in enumerate(values):
            yield RawRecord(path, row_offset + index + 1, value)
        return
    for index in range(batch.num_rows):
        row = row_offset + index + 1
        try:
            yield RawRecord(path, row, batch.slice(index, 1).to_pylist()[0])
        except UnicodeDecodeError:
            bad_column = next(
                name
                for name, column in zip(batch.schema.names, batch.columns, strict=True)
                if not _decodes(column, index)
            )
            error = RowError(path, row, bad_column, "invalid_utf8", "text is not valid UTF-8")
            yield RawRecord(path, row, error=error)


def _decodes(column, index: int) -> bool:
    try:
        column.slice(index, 1).to_pylist()
    except UnicodeDecodeError:
        return False
    return True


def read_hf_dataset(name: str, split: str, *, subset: str = "") -> Iterator[RawRecord]:
    """Rows of an HF ``datasets`` split; the row number is the 1-based index within the split.

    ``name`` may be a hub name (needs network), a local directory of data files, or a directory
    written by ``save_to_disk`` (recognised by its ``state.json`` / ``dataset_dict.json``).
    """
    import datasets  # Imported lazily: ~1 s, and not needed for plain files.

    label = f"{name}[{split}]"
    try:
        local = epath.Path(name)
        if (local / "state.json").exists() or (local / "dataset_dict.json").exists():
            dataset = datasets.load_from_disk(name)
        else:
            dataset = datasets.load_dataset(name, subset or None, split=split)
    except Exception as e:  # The datasets library raises many types; all mean "cannot read this".
        raise RowError(label, None, None, "unreadable", f"cannot load the dataset: {e}") from e
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataConfigError("split", f"{name} has no split {split!r}; it has {', '.join(dataset)}")
        dataset = dataset[split]
    for index, value in enumerate(dataset):
        yield RawRecord(label, index + 1, value)


def read_tfds(name: str, split: str, *, data_dir: str = "") -> Iterator[RawRecord]:
    """Rows of a TFDS split through ``tfds.data_source`` (random-access, no TensorFlow needed).

    TFDS hands back bytes and NumPy values, and stores a sequence of message dicts as a dict of
    equally long lists (``{"role": [...], "content": [...]}``); records are converted back to the
    plain JSON shape the schema expects.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataConfigError(
            "tfds_dataset", "reading TFDS needs tensorflow-datasets: pip install 'easyppo[tfds]'"
        ) from e
    label = f"{name}[{split}]"
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:
        raise RowError(label, None, None, "unreadable", f"cannot load the dataset: {e}") from e
    for index in range(len(source)):
        yield RawRecord(label, index + 1, _plain_from_tfds(source[index], top_level=True))


def _plain_from_tfds(value: Any, *, top_level: bool = False) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")
    if isinstance(value, np.ndarray):
        return [_plain_from_tfds(v) for v in value.tolist()] if value.ndim else _plain_from_tfds(value.item())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        columns = {k: _plain_from_tfds(v) for k, v in value.items()}
        if not top_level and _is_transposed_sequence(value):
            # tfds.features.Sequence({"role": Text(), "content": Text()}) -> list of message dicts.
            length = len(next(iter(columns.values())))
            return [{k: columns[k][i] for k in columns} for i in range(length)]
        return columns
    if isinstance(value, (list, tuple)):
        return [_plain_from_tfds(v) for v in value]
    return value


def _is_transposed_sequence(value: dict) -> bool:
    columns = list(value.values())
    one_dimensional = all(isinstance(c, list) or (isinstance(c, np.ndarray) and c.ndim == 1) for c in columns)
    return bool(columns) and one_dimensional and len({len(c) for c in columns}) == 1


def type_name(value: Any) -> str:
    """JSON-flavoured type names for error messages ("object", "array", "null", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__
