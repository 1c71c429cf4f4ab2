"""From a data config to a batch iterator: read, validate, tokenise (cached), batch.

``default_config()`` lists every data option with its default; :func:`build_iterator` is what the
train loop calls. The stages run in this order, so every problem surfaces before training starts:

1. read the rows (:mod:`~easyppo.data.sources`) and validate them in one cheap pass
   (:mod:`~easyppo.data.schema`); bad rows are raised together, or skipped and counted;
2. fingerprint the valid rows with the tokenizer and format settings, and tokenise them with
   ``datasets.map`` unless a cache entry with that fingerprint exists (:mod:`~easyppo.data.examples`);
3. apply the over-length policy's outcome (dropped / failed rows) and the bad-row budget again;
4. hand the usable rows to the deterministic per-host :class:`~easyppo.data.iterator.BatchIterator`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any

import numpy as np
from ml_collections import config_dict

from easyppo.data.batcher import ExampleBatcher
from easyppo.data.errors import BadRowsError, DataConfigError, RowError, TooManyBadRowsError
from easyppo.data.examples import (
    ExampleSettings,
    RowEncoder,
    Status,
    dataset_fingerprint,
    row_errors,
    tokenize_records,
)
from easyppo.data.iterator import BatchIterator
from easyppo.data.schema import KINDS, ValidatedRows, validate_records
from easyppo.data.sources import SourceSpec, read_records
from easyppo.weights import hub

logger = logging.getLogger(__name__)

ON_BAD_ROW = ("error", "skip")


def default_config() -> config_dict.ConfigDict:
    """Every data option and its default (the one place data defaults live)."""
    c = config_dict.ConfigDict()
    # Where the rows come from: exactly one of path / hf_dataset / tfds_dataset.
    c.path = ""  # .json / .jsonl / .parquet files or globs, comma-separated; local or gs://.
    c.hf_dataset = ""  # HF datasets name, local dataset dir, or a save_to_disk dir.
    c.hf_subset = ""  # HF config name, if the dataset has several.
    c.tfds_dataset = ""  # TFDS name (needs tensorflow-datasets).
    c.tfds_data_dir = ""  # TFDS data directory; "": its default
    c.split = "train"  # For hf_dataset / tfds_dataset.
    # What the rows are and how they become tokens.
    c.kind = "preference"  # "sft" | "preference" | "prompt".
    c.answer_field = "answer"  # prompt rows' ground truth for verifiable rewards (dotted: nested field)
    c.chat_format = "tulu"  # See docs/chat_formats.md.
    c.tokenizer_path = ""  # sentencepiece .model, HF tokenizer dir or tokenizer.json.
    c.bos_id = config_dict.placeholder(int)  # None: take the tokenizer's own.
    c.eos_id = config_dict.placeholder(int)  # None: the tokenizer's own
    c.pad_id = config_dict.placeholder(int)  # None: the tokenizer's own
    c.train_on = "all_assistant"  # sft only: "all_assistant" | "last_assistant".
    # Lengths, in tokens.
    c.max_seq_len = 1024  # Padded width of sft / preference sequences (prompt + response).
    c.max_prompt_len = 512  # Prompt budget; padded width of "prompt" rows. None: max_seq_len - 1.
    c.max_response_len = config_dict.placeholder(int)  # None: whatever fits in max_seq_len.
    c.truncation = "truncate"  # Over-long rows: "truncate" | "drop" | "error".
    # sft / preference: the LM head scores only a window of the row, one of this many widths, picked
    # per batch (one compiled step per width; 1: the full max_seq_len). See easyppo/data/windows.py.
    c.loss_window_buckets = 4  # sft / preference: widths of the scored window (1: every position)
    # Bad rows.
    c.on_bad_row = "error"  # "error": raise listing them; "skip": skip and count them.
    c.max_bad_fraction = 0.01  # With "skip": abort if more than this fraction of rows is bad.
    # Order and batching.
    c.global_batch_size = 32  # Rows per step over all hosts.
    c.seed = 0  # shuffling seed
    c.shuffle = True  # a fresh random order every epoch (else file order)
    c.drop_remainder = True  # skip the last incomplete batch of each epoch (else fill it with masked rows)
    c.num_epochs = config_dict.placeholder(int)  # None: repeat forever.
    # Tokenisation.
    c.num_proc = 4  # Processes for datasets.map.
    c.cache_dir = os.path.join("~", ".cache", "easyppo", "data")  # where tokenised datasets are cached
    return c


@dataclasses.dataclass(frozen=True)
class DataStats:
    """What happened to the rows; logged at startup and exposed as ``iterator.stats``."""

    rows_read: int
    rows_bad: int
    bad_by_reason: dict[str, int]
    rows_truncated: int
    rows_dropped: int  # Over-long rows left out with truncation="drop".
    rows_used: int
    cache_hit: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Tokenised, validated data ready to batch: shared by every iterator over it."""

    batcher: ExampleBatcher
    fingerprint: str
    stats: DataStats
    settings: ExampleSettings


def source_spec(config: config_dict.ConfigDict) -> SourceSpec:
    return SourceSpec(
        path=config.path,
        hf_dataset=config.hf_dataset,
        hf_subset=config.hf_subset,
        tfds_dataset=config.tfds_dataset,
        tfds_data_dir=config.tfds_data_dir,
        split=config.split,
    )


def example_settings(config: config_dict.ConfigDict) -> ExampleSettings:
    if config.kind not in KINDS:
        raise DataConfigError("kind", f"must be one of {KINDS}, got {config.kind!r}")
    return ExampleSettings(
        kind=config.kind,
        chat_format=config.chat_format,
        max_seq_len=config.max_seq_len,
        max_prompt_len=config.max_prompt_len,
        max_response_len=config.max_response_len,
        truncation=config.truncation,
        train_on=config.train_on,
    )


def check_policy(config: config_dict.ConfigDict) -> None:
    """Validates the options that are not checked where they are used."""
    if config.on_bad_row not in ON_BAD_ROW:
        raise DataConfigError("on_bad_row", f"must be one of {ON_BAD_ROW}, got {config.on_bad_row!r}")
    if not 0.0 <= config.max_bad_fraction <= 1.0:
        raise DataConfigError("max_bad_fraction", f"must be between 0 and 1, got {config.max_bad_fraction}")
    if config.num_proc < 1:
        raise DataConfigError("num_proc", f"must be at least 1, got {config.num_proc}")
    if config.loss_window_buckets < 1:
        raise DataConfigError("loss_window_buckets", f"must be at least 1, got {config.loss_window_buckets}")


def enforce_bad_row_policy(errors: list[RowError], num_rows: int, *, on_bad_row: str, max_bad_fraction: float) -> None:
    """Raises if bad rows are not allowed, or if there are more than the allowed fraction."""
    if not errors:
        return
    if on_bad_row == "error":
        raise BadRowsError(errors, num_rows)
    if len(errors) > max_bad_fraction * num_rows:
        raise TooManyBadRowsError(errors, num_rows, max_bad_fraction)


def load_tokenizer_and_format(config: config_dict.ConfigDict):
    """The tokenizer named by ``data.tokenizer_path`` (with the configured special ids) and the chat
    format ``data.chat_format`` over it; the train loop needs both (e.g. EOS and pad ids, decoding)."""
    from easyppo.data.tokenizer import load_tokenizer

    if not config.tokenizer_path:
        raise DataConfigError("tokenizer_path", "is empty: set it to a tokenizer file or directory")
    try:
        source = hub.local_source(config.tokenizer_path, key="")  # DataConfigError names the key
        tokenizer = load_tokenizer(source, bos_id=config.bos_id, eos_id=config.eos_id, pad_id=config.pad_id)
    except (OSError, ValueError) as e:
        raise DataConfigError("tokenizer_path", str(e)) from e
    return tokenizer, _chat_format(config, tokenizer)


def _chat_format(config: config_dict.ConfigDict, tokenizer):
    from easyppo.data.chat import make_chat_format

    try:
        return make_chat_format(config.chat_format, tokenizer)
    except ValueError as e:
        raise DataConfigError("chat_format", str(e)) from e


def prepare_data(config: config_dict.ConfigDict, *, tokenizer=None, chat_format=None) -> PreparedData:
    """Reads, validates and tokenises the data described by ``config`` (see :func:`default_config`).

    Args:
      config: the data config.
      tokenizer: an already loaded tokenizer; when None it is loaded from ``data.tokenizer_path`` with
        the configured special ids (or taken from ``chat_format``).
      chat_format: an already built chat format; made from ``data.chat_format`` when None.

    Raises:
      DataConfigError: an invalid option (the message names the key).
      RowError: a source that cannot be read at all.
      BadRowsError / TooManyBadRowsError: malformed rows, per ``on_bad_row`` / ``max_bad_fraction``.
    """
    check_policy(config)
    settings = example_settings(config)
    policy = dict(on_bad_row=config.on_bad_row, max_bad_fraction=config.max_bad_fraction)

    validated = validate_records(read_records(source_spec(config)), settings.kind, answer_field=config.answer_field)
    enforce_bad_row_policy(validated.errors, validated.num_read, **policy)  # Fail before tokenising.
    if not validated.records:
        where = config.path or f"{config.hf_dataset} ({config.split})"
        headline = f"{where}: no valid rows among {validated.num_read}"
        raise BadRowsError(validated.errors, validated.num_read, headline=headline)

    if chat_format is not None:
        tokenizer = chat_format.tokenizer if tokenizer is None else tokenizer
    elif tokenizer is not None:
        chat_format = _chat_format(config, tokenizer)
    else:
        tokenizer, chat_format = load_tokenizer_and_format(config)
    fingerprint = dataset_fingerprint(
        validated.records, chat_format_fingerprint=chat_format.fingerprint, settings=settings
    )
    tokenized, cache_hit = tokenize_records(
        validated.records,
        RowEncoder(chat_format, settings, bos_id=tokenizer.bos_id),
        cache_dir=os.path.expanduser(config.cache_dir),
        fingerprint=fingerprint,
        num_proc=config.num_proc,
    )

    errors = validated.errors + row_errors(tokenized, validated.locations)
    enforce_bad_row_policy(errors, validated.num_read, **policy)
    status = tokenized.data.column("status").to_numpy()
    usable = np.flatnonzero(status <= Status.TRUNCATED)
    stats = _stats(validated, errors, status, len(usable), cache_hit)
    logger.info("data %s: %s", fingerprint, stats)
    if not len(usable):
        headline = (
            f"no usable rows among {stats.rows_read}: {stats.rows_dropped} over-long rows were dropped "
            f"(data.truncation='drop') and {stats.rows_bad} are malformed"
        )
        raise BadRowsError(errors, validated.num_read, headline=headline)
    batcher = ExampleBatcher(
        tokenized, settings, pad_id=tokenizer.pad_id, rows=usable, loss_window_buckets=config.loss_window_buckets
    )
    return PreparedData(batcher=batcher, fingerprint=fingerprint, stats=stats, settings=settings)


def make_iterator(
    data: PreparedData,
    config: config_dict.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """A fresh iterator (at epoch 0, batch 0) over prepared data; call ``restore`` to resume."""
    if process_index is None or process_count is None:
        import jax  # Only for the defaults, so the data layer stays usable without a backend.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return BatchIterator(
        len(data.batcher),
        data.batcher,
        global_batch_size=config.global_batch_size,
        seed=config.seed,
        shuffle=config.shuffle,
        drop_remainder=config.drop_remainder,
        num_epochs=config.num_epochs,
        process_index=process_index,
        process_count=process_count,
        fingerprint=data.fingerprint,
        stats=data.stats.as_dict(),
    )


def build_iterator(
    config: config_dict.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    tokenizer=None,
    chat_format=None,
) -> BatchIterator:
    """The train loop's entry point: ``prepare_data`` followed by ``make_iterator``."""
    data = prepare_data(config, tokenizer=tokenizer, chat_format=chat_format)
    return make_iterator(data, config, process_index=process_index, process_count=process_count)


def _stats(
    validated: ValidatedRows, errors: list[RowError], status: np.ndarray, used: int, cache_hit: bool
) -> DataStats:
    return DataStats(
        rows_read=validated.num_read,
        rows_bad=len(errors),
        bad_by_reason=dict(collections.Counter(error.reason for error in errors)),
        rows_truncated=int(np.sum(status == Status.TRUNCATED)),
        rows_dropped=int(np.sum(status == Status.DROPPED)),
        rows_used=used,
        cache_hit=cache_hit,
    )
