"""The resumable, deterministic, per-host batch iterator.

The order of rows is a pure function of ``(seed, epoch)``: epoch ``e`` visits the rows in the
permutation :func:`epoch_order` returns, cut into consecutive *global* batches of
``global_batch_size`` rows. Host ``p`` of ``P`` takes the ``p``-th contiguous ``1/P`` slice of every
global batch, so the hosts together see each global batch exactly once and never overlap, and no
host needs to talk to another to agree on the order.

The position (epoch, batch within the epoch) is the whole state. It is the same on every host and
independent of the number of hosts, so a checkpoint taken on 8 hosts resumes on 4 with the very same
sequence of global batches. ``state()`` returns it as a small JSON-serialisable dict together with
what it is only valid for (dataset fingerprint, seed, batch size, ...), and ``restore`` refuses a
state from a different dataset or order instead of silently replaying different rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from easyppo.data.errors import DataConfigError

STATE_VERSION = 1

#: ``make_batch(positions, example_mask, *, batch_positions) -> dict of arrays``: this host's rows of
#: a global batch; ``batch_positions`` are the rows of the whole global batch (the same on every host,
#: for decisions all hosts must agree on, such as padded widths). Positions index ``range(num_rows)``.
MakeBatch = Callable[..., dict[str, np.ndarray]]

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def epoch_order(num_rows: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order in which epoch ``epoch`` visits rows ``0 .. num_rows - 1``.

    Sorting rows by a SplitMix64 hash of (seed, epoch, row) gives a uniformly random permutation
    that is defined by this function alone, not by a NumPy generator whose stream could change
    between NumPy releases and silently alter the order a resumed run replays.
    """
    rows = np.arange(num_rows, dtype=np.uint64)
    if not shuffle:
        return rows.astype(np.int64)
    stream = _splitmix64(_splitmix64(np.uint64(seed % 2**64)) ^ np.uint64(epoch % 2**64))
    with np.errstate(over="ignore"):
        keys = _splitmix64(stream + rows * _GOLDEN_GAMMA)
    return np.argsort(keys, kind="stable").astype(np.int64)


def _splitmix64(x):
    """SplitMix64's finaliser: a bijective, well-mixing hash of 64-bit integers (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint64) + _GOLDEN_GAMMA
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Yields this host's share of every global batch: dicts of arrays with leading dim ``B / P``.

    Args:
      num_rows: rows in the dataset (after dropping bad / over-long ones).
      make_batch: builds the arrays for given row positions; see :data:`MakeBatch`.
      global_batch_size: rows per step across all hosts; must be divisible by ``process_count``.
      seed: shuffling seed.
      shuffle: visit rows in a fresh random order every epoch (else in file order).
      drop_remainder: skip the last incomplete global batch of each epoch. Otherwise it is completed
        with copies of its first row marked ``example_mask = 0`` so every batch keeps its shape.
      num_epochs: stop after this many epochs; None repeats forever.
      process_index, process_count: this host and the number of hosts (normally
        ``jax.process_index()`` / ``jax.process_count()``).
      fingerprint: identifies the dataset; stored in and checked against restored states.
      stats: a summary of the data (rows read, skipped, truncated, ...) for logging.
    """

    def __init__(
        self,
        num_rows: int,
        make_batch: MakeBatch,
        *,
        global_batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_remainder: bool = True,
        num_epochs: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
        fingerprint: str = "",
        stats: Mapping[str, Any] | None = None,
    ) -> None:
        if global_batch_size < 1:
            raise DataConfigError("global_batch_size", f"must be positive, got {global_batch_size}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is not in range(process_count={process_count})")
        if global_batch_size % process_count:
            raise DataConfigError(
                "global_batch_size",
                f"{global_batch_size} is not divisible by the number of hosts ({process_count}); "
                "every host must get the same number of rows",
            )
        if num_epochs is not None and num_epochs < 1:
            raise DataConfigError("num_epochs", f"must be positive or None (repeat forever), got {num_epochs}")
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self.num_epochs = num_epochs
        self.process_index = process_index
        self.process_count = process_count
        self.fingerprint = fingerprint
        self.stats = dict(stats or {})
        self._make_batch = make_batch
        if self.batches_per_epoch == 0:
            raise DataConfigError(
                "global_batch_size",
                f"{global_batch_size} is larger than the dataset ({num_rows} usable rows), so with "
                "data.drop_remainder=True an epoch has no batches",
            )
        self._epoch = 0
        self._batch = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def per_host_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_remainder:
            return self.num_rows // self.global_batch_size
        return math.ceil(self.num_rows / self.global_batch_size)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        positions, example_mask = self.global_batch_positions(self._epoch, self._batch)
        host = slice(self.process_index * self.per_host_batch_size, (self.process_index + 1) * self.per_host_batch_size)
        batch = self._make_batch(positions[host], example_mask[host], batch_positions=positions)
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        return batch

    def global_batch_positions(self, epoch: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Row positions of global batch ``batch`` of ``epoch`` and its example mask (all hosts)."""
        order = self._order(epoch)
        positions = order[batch * self.global_batch_size : (batch + 1) * self.global_batch_size]
        example_mask = np.ones(self.global_batch_size, dtype=np.int32)
        missing = self.global_batch_size - len(positions)
        if missing:  # Only the last batch of an epoch with drop_remainder=False.
            example_mask[len(positions) :] = 0
            positions = np.concatenate([positions, np.full(missing, positions[0], dtype=positions.dtype)])
        return positions, example_mask

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, epoch_order(self.num_rows, seed=self.seed, epoch=epoch, shuffle=self.shuffle))
        return self._order_cache[1]

    def state(self) -> dict[str, Any]:
        """The position of the next batch and what it is valid for; JSON-serialisable."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batch": self._batch,
            **self._identity(),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continues from ``state`` (from :meth:`state`, possibly saved with a different host count).

        Raises:
          ValueError: if the state belongs to another dataset, seed, batch size or order, which would
            make the resumed run see different rows than the interrupted one.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"unsupported data iterator state version {state.get('version')!r} (expected {STATE_VERSION})"
            )
        mismatched = [
            f"{key}: checkpoint has {state.get(key)!r}, this run has {value!r}"
            for key, value in self._identity().items()
            if state.get(key) != value
        ]
        if mismatched:
            raise ValueError(
                "the data iterator state does not match this dataset/config, so resuming would replay "
                "different rows:\n  " + "\n  ".join(mismatched)
            )
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if not 0 <= batch < self.batches_per_epoch or epoch < 0:
            raise ValueError(f"invalid data iterator position epoch={epoch}, batch={batch}")
        self._epoch, self._batch = epoch, batch

    def _identity(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "num_rows": self.num_rows,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "global_batch_size": self.global_batch_size,
            "drop_remainder": self.drop_remainder,
        }
