"""Collating tokenised examples into fixed-shape NumPy batches: right-padded sequences (SFT, preference
pairs) or left-padded prompts (PPO), with attention masks and position ids, and filler rows
(``example_mask = 0``) that complete a partial last batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from easyppo.data import windows
from easyppo.data.examples import ExampleSettings


class ExampleBatcher:
    """Pads tokenised rows into the fixed-shape arrays one training step consumes.

    Batch keys (all ``[B, ...]`` NumPy arrays; integer arrays are int32):

    * sft: ``input_ids``, ``attention_mask``, ``loss_mask``, ``position_ids`` — ``[B, max_seq_len]``,
      right-padded.
    * preference: ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_loss_mask``,
      ``chosen_position_ids``, the same four ``rejected_*`` keys (``[B, max_seq_len]``, right-padded),
      and ``margin`` (float32 ``[B]``, 0 where the row has none).
    * prompt: ``prompt_input_ids``, ``prompt_attention_mask``, ``prompt_position_ids`` —
      ``[B, max_prompt_len]``, *left*-padded so generation appends at the same column in every row.
    * every kind: ``example_mask`` ``[B]``, 1 for real rows and 0 for the filler rows that complete the
      final batch when ``drop_remainder=False`` (their loss masks are all zero too); and
      ``example_index`` ``[B]``, each row's position in this batcher (``0 .. len(self) - 1``), which
      identifies the row across epochs and runs, e.g. to look up values precomputed per row (DPO's
      reference log-probs). Filler rows repeat a real row's index and must be ignored by their mask.
    * sft and preference: the loss window of each sequence (``window_start``, ``window_targets``,
      ``window_mask``; ``chosen_`` / ``rejected_`` prefixed for pairs, one width for both sides), the
      only target positions the loss reads; see :mod:`easyppo.data.windows`.

    ``loss_mask[t] = 1`` marks tokens the model is trained to *predict* (assistant content and its
    end-of-turn token), aligned with ``input_ids``: the loss at ``t`` uses the logits at ``t - 1``.
    Position ids count real tokens from 0 (``cumsum(attention_mask) - 1``) and are 0 on padding.
    """

    def __init__(
        self,
        tokenized,
        settings: ExampleSettings,
        *,
        pad_id: int,
        rows: np.ndarray | None = None,
        loss_window_buckets: int = 1,
    ) -> None:
        """
        Args:
          tokenized: the ``datasets.Dataset`` from :func:`tokenize_records`.
          settings: the settings it was tokenised with (widths come from here).
          pad_id: token id written into padding positions.
          rows: indices of the usable rows (status OK or TRUNCATED); batch positions index this.
          loss_window_buckets: how many loss-window widths a run may use (1: the full width).
        """
        self.settings = settings
        self.pad_id = pad_id
        self.window_widths = (
            windows.window_widths(settings.max_seq_len, loss_window_buckets) if settings.kind != "prompt" else ()
        )
        self._table = tokenized.data.table
        self.rows = np.arange(self._table.num_rows) if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def table(self):
        """The tokenised rows as a (memory-mapped) ``pyarrow.Table``, one row per source record."""
        return self._table

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(
        self, positions: np.ndarray, example_mask: np.ndarray, *, batch_positions: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """The batch made of usable rows ``positions`` (indices into ``self.rows``).

        ``batch_positions``: every row of the global batch this host's ``positions`` belong to (all
        hosts pass the same), which sizes the loss window so that every host builds the same shapes;
        None: ``positions`` alone.
        """
        make = {"sft": self._sft, "preference": self._preference, "prompt": self._prompt}[self.settings.kind]
        batch = make(self.rows[np.asarray(positions, dtype=np.int64)])
        example_mask = np.asarray(example_mask, dtype=np.int32)
        for key in [k for k in batch if k.endswith("loss_mask")]:
            batch[key] = batch[key] * example_mask[:, None]
        if self.window_widths:
            width = self.loss_window_width(positions if batch_positions is None else batch_positions)
            prefixes = ("",) if self.settings.kind == "sft" else ("chosen_", "rejected_")
            for prefix in prefixes:
                batch.update(
                    windows.target_window(batch[f"{prefix}input_ids"], batch[f"{prefix}loss_mask"], width, prefix)
                )
        batch["example_mask"] = example_mask
        batch["example_index"] = np.asarray(positions, dtype=np.int32)
        return batch

    def loss_window_width(self, positions: np.ndarray) -> int:
        """The loss-window width of a batch of usable rows ``positions``: the smallest allowed width
        that covers every row's scored tokens (both responses of a pair)."""
        rows = self.rows[np.asarray(positions, dtype=np.int64)]
        if self.settings.kind == "sft":
            spans = windows.ragged_spans(*self._ragged("loss_mask", rows))
        else:
            spans = np.maximum(*(np.diff(self._ragged(f"{side}_ids", rows)[1]) for side in ("chosen", "rejected")))
        return windows.pick_width(spans, self.window_widths)

    def answers(self, positions: Sequence[int] | np.ndarray) -> list[str | None]:
        """The ground-truth ``answer`` of prompt rows at batch ``positions`` (None where a row has none).

        Kept on the host: verifiable rewards compare decoded responses with it, so it never becomes an
        array. ``positions`` are a batch's ``example_index`` values.
        """
        if self.settings.kind != "prompt":
            raise ValueError(f"answers: only prompt rows carry answers, these are {self.settings.kind!r} rows")
        rows = self.rows[np.asarray(positions, dtype=np.int64)]
        return self._table.column("answer").take(rows).to_pylist()

    def _ragged(self, column: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import pyarrow as pa

        taken = self._table.column(column).take(pa.array(rows)).combine_chunks()
        offsets = np.asarray(taken.offsets, dtype=np.int64)
        return np.asarray(taken.flatten()), offsets - offsets[0]

    def _sft(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        width = self.settings.max_seq_len
        ids, offsets = self._ragged("input_ids", rows)
        mask_values, _ = self._ragged("loss_mask", rows)
        input_ids, attention = _pad_right([(ids, offsets)], width, self.pad_id)
        loss_mask, _ = _pad_right([(mask_values, offsets)], width, 0)
        return _with_positions("", input_ids, attention, loss_mask)

    def _preference(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        width = self.settings.max_seq_len
        prompt = self._ragged("prompt_ids", rows)
        batch: dict[str, np.ndarray] = {}
        for side in ("chosen", "rejected"):
            response = self._ragged(f"{side}_ids", rows)
            input_ids, attention = _pad_right([prompt, response], width, self.pad_id)
            zeros = (np.zeros_like(prompt[0], dtype=np.int32), prompt[1])
            ones = (np.ones_like(response[0], dtype=np.int32), response[1])
            loss_mask, _ = _pad_right([zeros, ones], width, 0)
            batch.update(_with_positions(f"{side}_", input_ids, attention, loss_mask))
        batch["margin"] = self._table.column("margin").take(rows).to_numpy().astype(np.float32)
        return batch

    def _prompt(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        ids, offsets = self._ragged("prompt_ids", rows)
        input_ids, attention = _pad_left(ids, offsets, self.settings.max_prompt_len, self.pad_id)
        return {
            "prompt_input_ids": input_ids,
            "prompt_attention_mask": attention,
            "prompt_position_ids": _positions(attention),
        }


def _pad_right(
    segments: Sequence[tuple[np.ndarray, np.ndarray]], width: int, pad_value: int
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates per-row ragged segments and right-pads to ``width``; returns (values, mask).

    Each segment is (flat values, offsets) over the same rows; row ``i`` of the result is
    ``seg0[i] + seg1[i] + ...`` followed by ``pad_value``. Lengths are guaranteed to fit by truncation.
    """
    num_rows = len(segments[0][1]) - 1
    out = np.full((num_rows, width), pad_value, dtype=np.int32)
    columns = np.arange(width)[None, :]
    start = np.zeros((num_rows, 1), dtype=np.int64)
    for values, offsets in segments:
        lengths = np.diff(offsets)[:, None]
        inside = (columns >= start) & (columns < start + lengths)
        source = offsets[:-1, None] + columns - start
        out[inside] = values[source[inside]]
        start = start + lengths
    return out, (columns < start).astype(np.int32)


def _pad_left(values: np.ndarray, offsets: np.ndarray, width: int, pad_value: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligns each ragged row in ``width`` columns, padding on the left; returns (values, mask)."""
    lengths = np.diff(offsets)[:, None]
    columns = np.arange(width)[None, :]
    shift = width - lengths
    inside = columns >= shift
    out = np.full((len(lengths), width), pad_value, dtype=np.int32)
    out[inside] = values[(offsets[:-1, None] + columns - shift)[inside]]
    return out, inside.astype(np.int32)


def _with_positions(
    prefix: str, input_ids: np.ndarray, attention: np.ndarray, loss_mask: np.ndarray
) -> dict[str, np.ndarray]:
    return {
        f"{prefix}input_ids": input_ids,
        f"{prefix}attention_mask": attention,
        f"{prefix}loss_mask": loss_mask.astype(np.int32),
        f"{prefix}position_ids": _positions(attention),
    }


def _positions(attention: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... over the real tokens of each row and 0 on padding, on either side."""
    return ((np.cumsum(attention, axis=1) - 1) * attention).astype(np.int32)
