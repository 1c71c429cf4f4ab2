"""Tokenised examples: rows -> token ids once (cached on disk), then fixed-shape NumPy batches.

Two stages with different costs are kept apart:

1. :class:`RowEncoder` turns each normalised record (see :mod:`easyppo.data.schema`) into *unpadded*
   token lists with the chat format, applying the over-length policy. It runs once over the whole
   dataset through ``datasets.map`` (several processes) and :func:`tokenize_records` stores the result
   as an Arrow dataset keyed by the dataset fingerprint, so a restarted run reads it back instead of
   tokenising again.
2. :class:`easyppo.data.batcher.ExampleBatcher` pads a handful of those rows into fixed-shape arrays whenever the iterator
   asks for a batch. Storing unpadded ids keeps the cache small, and padding with vectorised NumPy
   gathers on memory-mapped Arrow columns costs well under a millisecond per batch.

Each row is split into a prompt ``P`` (every token up to and including the final assistant header)
and a response ``R`` (the final assistant content and its end-of-turn / EOS tokens). A row is
*over-long* when ``len(P) > prompt budget``, ``len(R) > max_response_len`` or
``len(P) + len(R) > max_seq_len``; the prompt budget is ``max_prompt_len``, or ``max_seq_len - 1`` when
that is unset. With ``truncation="truncate"`` the prompt loses tokens from the left (keeping a leading
BOS, so the model still sees a sequence start) and the response loses tokens from the right; with
``"drop"`` the row is left out; with ``"error"`` it is a bad row. All three are counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from easyppo.data.chat import TRAIN_ON
from easyppo.data.errors import DataConfigError, RowError

#: Bumped whenever the stored token layout or the truncation rules change, to invalidate caches.
CACHE_FORMAT_VERSION = 2  # 2: prompt rows keep their ground-truth answer
TRUNCATION_MODES = ("truncate", "drop", "error")
_COMPLETE_MARKER = "COMPLETE"
_MAP_BATCH_SIZE = 256


class Status:
    """Per-row outcome of tokenisation, stored as an int8 column next to the ids."""

    OK = 0
    TRUNCATED = 1
    DROPPED = 2  # Over-long with truncation="drop".
    ERROR = 3  # Over-long with truncation="error", or rejected by the chat format.


class ChatFormatLike(Protocol):
    """The part of :class:`easyppo.data.chat.ChatFormat` this module relies on.

    Invariant relied upon: for a conversation ``m`` ending in an assistant turn,
    ``encode_conversation(m).ids == encode_prompt(m[:-1]) + encode_response(m[-1]["content"])``.
    """

    fingerprint: str

    def encode_prompt(self, messages: list[dict]) -> list[int]: ...

    def encode_response(self, content: str) -> list[int]: ...

    def encode_conversation(self, messages: list[dict], *, train_on: str = ...) -> Any: ...


@dataclasses.dataclass(frozen=True)
class ExampleSettings:
    """Everything besides the rows and the tokenizer that determines the tokenised examples.

    Attributes:
      kind: "sft", "preference" or "prompt".
      chat_format: name of the chat format (recorded with the other settings in the fingerprint).
      max_seq_len: padded length of sft / preference sequences (prompt + response).
      max_prompt_len: prompt budget; for kind "prompt" also the left-padded width (required there).
      max_response_len: response budget; None means "whatever fits in max_seq_len".
      truncation: "truncate", "drop" or "error" for over-long rows.
      train_on: for sft, "all_assistant" or "last_assistant" turns carry loss. Preference rows always
        train on the final assistant turn only.
    """

    kind: str
    chat_format: str
    max_seq_len: int | None
    max_prompt_len: int | None = None
    max_response_len: int | None = None
    truncation: str = "truncate"
    train_on: str = "all_assistant"

    def __post_init__(self) -> None:
        if self.truncation not in TRUNCATION_MODES:
            raise DataConfigError("truncation", f"must be one of {TRUNCATION_MODES}, got {self.truncation!r}")
        if self.train_on not in TRAIN_ON:
            raise DataConfigError("train_on", f"must be one of {TRAIN_ON}, got {self.train_on!r}")
        for key in ("max_seq_len", "max_prompt_len", "max_response_len"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise DataConfigError(key, f"must be a positive number of tokens, got {value}")
        if self.kind == "prompt":
            if self.max_prompt_len is None:
                raise DataConfigError(
                    "max_prompt_len", "is required for kind='prompt' (the width of left-padded prompts)"
                )
            return
        if self.max_seq_len is None:
            raise DataConfigError("max_seq_len", f"is required for kind={self.kind!r}")
        if self.max_prompt_len is not None and self.max_prompt_len >= self.max_seq_len:
            raise DataConfigError(
                "max_prompt_len",
                f"must be smaller than data.max_seq_len={self.max_seq_len} to leave room for a response, "
                f"got {self.max_prompt_len}",
            )

    @property
    def prompt_budget(self) -> int:
        if self.max_prompt_len is not None:
            return self.max_prompt_len
        assert self.max_seq_len is not None
        return self.max_seq_len - 1


@dataclasses.dataclass(frozen=True)
class _Fit:
    """Result of fitting one (prompt, response) pair into the length budget."""

    status: int
    prompt_keep: int  # Prompt tokens kept, counting a preserved BOS.
    response_keep: int  # Response tokens kept, from the left.
    field: str = ""
    detail: str = ""


class RowEncoder:
    """Tokenises normalised records; a batched ``datasets.map`` function.

    Holds the chat format (and through it the tokenizer), so it must pickle for ``num_proc > 1``.
    """

    def __init__(self, chat_format: ChatFormatLike, settings: ExampleSettings, *, bos_id: int | None) -> None:
        self.chat_format = chat_format
        self.settings = settings
        self.bos_id = bos_id

    def output_columns(self) -> dict[str, str]:
        """Column name -> Arrow element type of what :meth:`encode` returns (lists are ragged)."""
        columns = {
            "sft": {"input_ids": "list<int32>", "loss_mask": "list<int8>"},
            "preference": {
                "prompt_ids": "list<int32>",
                "chosen_ids": "list<int32>",
                "rejected_ids": "list<int32>",
                "margin": "float32",
            },
            "prompt": {"prompt_ids": "list<int32>", "answer": "string"},
        }[self.settings.kind]
        errors = {"error_field": "string", "error_reason": "string", "error_detail": "string"}
        return {**columns, "status": "int8", **errors}

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
        names = list(batch)
        out: dict[str, list[Any]] = {name: [] for name in self.output_columns()}
        for values in zip(*(batch[name] for name in names), strict=True):
            for key, value in self.encode(dict(zip(names, values, strict=True))).items():
                out[key].append(value)
        return out

    def encode(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """One record -> one output row (token lists, status and, for bad rows, the error)."""
        encode = {"sft": self._encode_sft, "preference": self._encode_preference, "prompt": self._encode_prompt}
        try:
            row = encode[self.settings.kind](record)
        except ValueError as e:  # The chat format rejects something the schema could not know about.
            field = "messages" if self.settings.kind == "sft" else "prompt"
            row = self._failed(Status.ERROR, field, "chat_format", str(e))
        row.setdefault("status", Status.OK)
        for key in ("error_field", "error_reason", "error_detail"):
            row.setdefault(key, "")
        return row

    def _encode_sft(self, record: Mapping[str, Any]) -> dict[str, Any]:
        messages = list(record["messages"])
        conversation = self.chat_format.encode_conversation(messages, train_on=self.settings.train_on)
        ids, mask = list(conversation.ids), list(conversation.loss_mask)
        split = len(ids) - len(self.chat_format.encode_response(messages[-1]["content"]))
        fit = self._fit(split, len(ids) - split, "response")
        if fit.status in (Status.DROPPED, Status.ERROR):
            return self._failed(fit.status, fit.field, "too_long", fit.detail)
        cut = self._prompt_cut(ids[:split], fit.prompt_keep)
        return {
            "input_ids": cut(ids[:split]) + ids[split : split + fit.response_keep],
            "loss_mask": cut(mask[:split]) + mask[split : split + fit.response_keep],
            "status": fit.status,
        }

    def _encode_preference(self, record: Mapping[str, Any]) -> dict[str, Any]:
        prompt = self.chat_format.encode_prompt(list(record["prompt"]))
        chosen = self.chat_format.encode_response(record["chosen"])
        rejected = self.chat_format.encode_response(record["rejected"])
        fits = [self._fit(len(prompt), len(chosen), "chosen"), self._fit(len(prompt), len(rejected), "rejected")]
        for fit in fits:
            if fit.status in (Status.DROPPED, Status.ERROR):
                return self._failed(fit.status, fit.field, "too_long", fit.detail)
        # Truncation only ever keeps min(len(prompt), budget) prompt tokens, so both sides agree.
        cut = self._prompt_cut(prompt, min(fit.prompt_keep for fit in fits))
        return {
            "prompt_ids": cut(prompt),
            "chosen_ids": chosen[: fits[0].response_keep],
            "rejected_ids": rejected[: fits[1].response_keep],
            "margin": float(record["margin"]),
            "status": max(fit.status for fit in fits),
        }

    def _encode_prompt(self, record: Mapping[str, Any]) -> dict[str, Any]:
        prompt = self.chat_format.encode_prompt(list(record["prompt"]))
        fit = self._fit(len(prompt), 0, "prompt")
        if fit.status in (Status.DROPPED, Status.ERROR):
            return self._failed(fit.status, fit.field, "too_long", fit.detail)
        return {
            "prompt_ids": self._prompt_cut(prompt, fit.prompt_keep)(prompt),
            "answer": record.get("answer"),
            "status": fit.status,
        }

    def _fit(self, prompt_len: int, response_len: int, response_field: str) -> _Fit:
        """Decides whether (and how much of) a prompt and its response fit the length budget."""
        s = self.settings
        seq_len = s.max_seq_len if s.kind != "prompt" else None
        if prompt_len > s.prompt_budget:
            limit_key = "max_prompt_len" if s.max_prompt_len is not None else "max_seq_len - 1"
            problem = ("prompt", f"the prompt is {prompt_len} tokens, more than data.{limit_key}={s.prompt_budget}")
        elif s.max_response_len is not None and response_len > s.max_response_len:
            problem = (
                response_field,
                f"the response is {response_len} tokens, more than data.max_response_len={s.max_response_len}",
            )
        elif seq_len is not None and prompt_len + response_len > seq_len:
            problem = (
                response_field,
                f"prompt + response is {prompt_len + response_len} tokens, more than data.max_seq_len={seq_len}",
            )
        else:
            return _Fit(Status.OK, prompt_len, response_len)
        if s.truncation == "drop":
            return _Fit(Status.DROPPED, 0, 0, *problem)
        if s.truncation == "error":
            return _Fit(Status.ERROR, 0, 0, *problem)
        prompt_keep = min(prompt_len, s.prompt_budget)
        response_keep = response_len
        if s.max_response_len is not None:
            response_keep = min(response_keep, s.max_response_len)
        if seq_len is not None:
            response_keep = min(response_keep, seq_len - prompt_keep)
        return _Fit(Status.TRUNCATED, prompt_keep, response_keep)

    def _prompt_cut(self, prompt_ids: Sequence[int], keep: int) -> Callable[[Sequence[Any]], list[Any]]:
        """Left truncation of a prompt to ``keep`` tokens, as a function applicable to aligned lists.

        A leading BOS survives (the model was trained to see it at position 0): the result is BOS
        followed by the last ``keep - 1`` tokens. The same cut is applied to the loss mask.
        """
        length = len(prompt_ids)
        if length <= keep:
            return list
        if self.bos_id is not None and prompt_ids[0] == self.bos_id:
            return lambda values: [values[0], *values[length - keep + 1 :]]
        return lambda values: list(values[length - keep :])

    def _failed(self, status: int, field: str, reason: str, detail: str) -> dict[str, Any]:
        row: dict[str, Any] = {name: [] for name, kind in self.output_columns().items() if kind.startswith("list")}
        if self.settings.kind == "preference":
            row["margin"] = 0.0
        if self.settings.kind == "prompt":
            row["answer"] = None
        row.update(status=status, error_field=field, error_reason=reason, error_detail=detail)
        return row


def dataset_fingerprint(
    records: Sequence[Mapping[str, Any]], *, chat_format_fingerprint: str, settings: ExampleSettings
) -> str:
    """A hash of the normalised rows, the tokenizer and chat format, and the format settings.

    ``chat_format_fingerprint`` is ``ChatFormat.fingerprint``, which covers the tokenizer model, its
    special ids, the format and any Jinja template. Anything that changes the tokenised examples
    changes the result, so caches keyed on it (the tokenised dataset, precomputed reference
    log-probs) never serve stale data. Where the rows came from (paths, JSON vs Parquet) does not
    enter: the same rows give the same hash.
    """
    digest = hashlib.blake2b(digest_size=16)
    header = {
        "version": CACHE_FORMAT_VERSION,
        "settings": dataclasses.asdict(settings),
        "chat_format": chat_format_fingerprint,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def tokenize_records(
    records: Sequence[Mapping[str, Any]],
    encoder: RowEncoder,
    *,
    cache_dir: str,
    fingerprint: str,
    num_proc: int = 1,
):
    """Tokenises ``records`` with ``encoder``, or loads the result cached under ``fingerprint``.

    Args:
      records: normalised rows (at least one).
      encoder: the row encoder; pickled to the worker processes when ``num_proc > 1``.
      cache_dir: local directory holding one ``tokenized-<fingerprint>`` entry per dataset.
      fingerprint: :func:`dataset_fingerprint` of exactly these records and this encoder.
      num_proc: worker processes for ``datasets.map``.

    Returns:
      (dataset, cache_hit): a memory-mapped ``datasets.Dataset`` with one row per record (dropped and
      failed ones included, so row indices line up with ``records``) and whether it was cached.

    An entry is built in a private staging directory and renamed into place when complete, so a
    crash half-way, or several processes racing on one host, never leave a half-written entry.
    """
    import datasets  # Heavy import, only needed when preparing data.

    if not records:
        raise ValueError("there are no records to tokenise")
    final = os.path.join(cache_dir, f"tokenized-{fingerprint}")
    if os.path.exists(os.path.join(final, _COMPLETE_MARKER)):
        return datasets.load_from_disk(final), True

    os.makedirs(cache_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".staging-{fingerprint}-", dir=cache_dir)
    try:
        raw = datasets.Dataset.from_list(list(records))
        workers = min(num_proc, len(raw))
        tokenized = raw.map(
            encoder,
            batched=True,
            batch_size=_MAP_BATCH_SIZE,
            num_proc=workers if workers > 1 else None,
            remove_columns=raw.column_names,
            features=datasets.Features({name: _feature(kind) for name, kind in encoder.output_columns().items()}),
            new_fingerprint=fingerprint,  # Skips hashing the encoder (and the tokenizer inside it).
            cache_file_name=os.path.join(staging, "map", "tokens.arrow"),
            desc="tokenising",
        )
        entry = os.path.join(staging, "entry")
        tokenized.save_to_disk(entry)
        with open(os.path.join(entry, _COMPLETE_MARKER), "w") as f:
            f.write(fingerprint)
        _publish(entry, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return datasets.load_from_disk(final), False


def _publish(entry: str, final: str) -> None:
    """Moves a complete cache entry into place, unless another process already published one."""
    if os.path.exists(os.path.join(final, _COMPLETE_MARKER)):
        return
    shutil.rmtree(final, ignore_errors=True)  # Left behind by a crash before the marker existed.
    try:
        os.rename(entry, final)
    except OSError:
        if not os.path.exists(os.path.join(final, _COMPLETE_MARKER)):
            raise


def _feature(kind: str):
    import datasets

    if kind.startswith("list<"):
        return datasets.List(datasets.Value(kind[len("list<") : -1]))
    return datasets.Value(kind)


def row_errors(tokenized, locations: Sequence[tuple[str, int]]) -> list[RowError]:
    """Rows that tokenisation marked as errors, as :class:`RowError` s with their original location."""
    status = tokenized.data.column("status").to_numpy()
    bad = np.flatnonzero(status == Status.ERROR)
    if not len(bad):
        return []
    details = tokenized.select_columns(["error_field", "error_reason", "error_detail"])[bad]
    return [
        RowError(*locations[index], field, reason, detail)
        for index, field, reason, detail in zip(
            bad.tolist(), details["error_field"], details["error_reason"], details["error_detail"], strict=True
        )
    ]
