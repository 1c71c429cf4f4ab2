"""Loss windows: the few columns of a right-padded batch whose next-token log-probs a loss reads.

An SFT or preference row is ``prompt + response + padding`` in ``max_seq_len`` columns, but only the
response (loss-masked) tokens are scored. Projecting every column onto the vocabulary wastes most of
the LM head's work, which dominates a token's forward pass at small widths (see
docs/performance.md). So the batcher also emits, per row, a *window* of ``W`` consecutive target
positions that covers every scored position:

* ``window_start`` [B]: the first target position of the window (target position ``t`` scores token
  ``t + 1``, as in ``ops.shift_for_next_token``);
* ``window_targets`` [B, W]: the token ids those positions predict;
* ``window_mask`` [B, W]: 1 where the position is scored.

``W`` has to be a static shape, yet it should follow the data. It is therefore picked per global
batch from a few *buckets* (``data.loss_window_buckets`` widths between ``max_seq_len / buckets``
and ``max_seq_len``, each a multiple of 64 columns): the smallest that covers the widest row of the
whole global batch. Every host computes it from the same global row positions, so all hosts build
the same shapes, and a run compiles at most one program per bucket. One bucket means the full width.
"""

from __future__ import annotations

import numpy as np

WIDTH_GRANULE = 64  # columns; window widths are multiples of this (or the full width)


def window_widths(seq_len: int, buckets: int) -> tuple[int, ...]:
    """The allowed window widths for ``seq_len`` columns, smallest first; the last is ``seq_len``."""
    if buckets < 1:
        raise ValueError(f"loss_window_buckets must be >= 1, got {buckets}")
    widths = set()
    for k in range(1, buckets + 1):
        width = -(-seq_len * k // buckets)
        widths.add(min(seq_len, -(-width // WIDTH_GRANULE) * WIDTH_GRANULE))
    return tuple(sorted(widths))


def ragged_spans(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per row of a ragged 0/1 mask: ``last one - first one + 1`` (0 for a row without ones).

    An upper bound on the row's span of scored target positions, which is all a width needs.
    """
    lengths = np.diff(offsets)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    index = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
    ones = np.asarray(values) != 0
    first = np.full(len(lengths), np.iinfo(np.int64).max)
    last = np.full(len(lengths), -1)
    np.minimum.at(first, rows[ones], index[ones])
    np.maximum.at(last, rows[ones], index[ones])
    return np.where(last >= 0, last - first + 1, 0)


def pick_width(spans: np.ndarray, widths: tuple[int, ...]) -> int:
    """The smallest allowed width that covers the widest span."""
    widest = int(np.max(spans, initial=0))
    for width in widths:
        if width >= widest:
            return width
    raise ValueError(f"a row spans {widest} scored positions, more than the widest window {widths[-1]}")


def target_window(input_ids: np.ndarray, loss_mask: np.ndarray, width: int, prefix: str = "") -> dict[str, np.ndarray]:
    """The ``{prefix}window_*`` arrays of a right-padded [B, T] batch for windows of ``width`` positions.

    Each row's window starts at its first scored target position, moved left where needed so that it
    ends inside the row. Raises if a window would miss a scored position (``width`` too small).
    """
    num_rows, seq_len = input_ids.shape
    if not 1 <= width <= seq_len:
        raise ValueError(f"window width {width} is not in [1, {seq_len}]")
    targets = np.zeros_like(input_ids, dtype=np.int32)
    targets[:, :-1] = input_ids[:, 1:]
    scored = np.zeros_like(loss_mask, dtype=np.int32)
    scored[:, :-1] = loss_mask[:, 1:]
    first = np.where(scored.any(axis=1), np.argmax(scored != 0, axis=1), 0)
    start = np.minimum(first, seq_len - width).astype(np.int32)
    columns = start[:, None] + np.arange(width)[None, :]
    window_mask = np.take_along_axis(scored, columns, axis=1)
    if int(window_mask.sum()) != int(scored.sum()):
        raise ValueError(f"a loss window of {width} positions misses scored tokens; the batch needs a wider one")
    return {
        f"{prefix}window_start": start,
        f"{prefix}window_targets": np.take_along_axis(targets, columns, axis=1),
        f"{prefix}window_mask": window_mask,
    }
