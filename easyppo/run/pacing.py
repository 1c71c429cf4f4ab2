"""What keeps the host ahead of the device: batches prepared in the background, step results read one
step late, and a preemption flag that hosts agree on without a collective every step.

JAX dispatches a jitted step and returns at once; the host only waits when it reads a result. The
loop therefore reads nothing of the step it has just dispatched: ``StepTracker`` settles step n's
skipped flag and token count after step n + 1 is queued (step n is finished or nearly so by then), and
``Prefetcher`` has the next batch read, collated and placed on the devices while the step runs.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax

from easyppo.core import multihost

logger = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps had a non-finite loss, gradient or update."""


class StepTracker:
    """Counts tokens and non-finite steps from each step's results, read one step late."""

    def __init__(self, max_consecutive_nonfinite: int):
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self._pending: collections.deque = collections.deque()
        self.streak = 0  # non-finite steps in a row, up to the last settled step
        self.nonfinite_steps = 0
        self.tokens = 0.0  # since the last ``take_tokens``

    def push(self, step: int, skipped: jax.Array, num_tokens: jax.Array) -> None:
        """Records the step just dispatched and settles the ones before it."""
        self._pending.append((step, skipped, num_tokens))
        while len(self._pending) > 1:
            self._settle(*self._pending.popleft())

    def settle(self) -> None:
        """Reads every pending step (before a log line, a checkpoint or the end of the run)."""
        while self._pending:
            self._settle(*self._pending.popleft())

    def take_tokens(self) -> float:
        tokens, self.tokens = self.tokens, 0.0
        return tokens

    def _settle(self, step: int, skipped: jax.Array, num_tokens: jax.Array) -> None:
        skipped, num_tokens = jax.device_get((skipped, num_tokens))  # one transfer for both
        self.tokens += float(num_tokens)
        if not bool(skipped):
            self.streak = 0
            return
        self.streak += 1
        self.nonfinite_steps += 1
        logger.warning("step %d: non-finite loss, gradient or update; the update was discarded", step)
        if self.streak >= self.max_consecutive_nonfinite:
            raise NonFiniteTrainingError(
                f"{self.streak} consecutive steps (up to step {step}) had a non-finite loss or gradient "
                f"(train.max_consecutive_nonfinite={self.max_consecutive_nonfinite}); "
                f"parameters are those of step {step - self.streak}"
            )


class Prefetcher(Iterator[tuple[Any, dict]]):
    """Yields ``(device batch, iterator state after it)``, prepared ``depth`` batches ahead in a thread.

    The iterator state travels with its batch, so a checkpoint records the position of the last batch
    a step consumed, not of the batches read ahead: a resumed run sees exactly the same rows.
    ``depth=0`` prepares each batch when it is asked for.
    """

    def __init__(self, iterator: Any, to_device: Callable[[Any], Any], depth: int):
        self._iterator, self._to_device, self._depth = iterator, to_device, depth
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Prefetcher:
        if self._depth > 0:
            self._thread = threading.Thread(target=self._fill, name="easyppo-prefetch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            with contextlib.suppress(queue.Empty):
                while True:  # unblock a producer waiting on a full queue
                    self._queue.get_nowait()
            self._thread.join()

    def _next_item(self) -> tuple[Any, dict]:
        host_batch = next(self._iterator)
        return self._to_device(host_batch), self._iterator.state()

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._next_item()
            except BaseException as error:  # StopIteration included: handed to the consumer
                item = error
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __next__(self) -> tuple[Any, dict]:
        if self._thread is None:
            return self._next_item()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class PreemptionFlag:
    """Set by SIGTERM or a first Ctrl-C (when the loop runs in the main thread), or by ``request()``.

    A second Ctrl-C aborts at once (``KeyboardInterrupt``): the first asks for a save and a clean stop.
    """

    def __init__(self):
        self._event = threading.Event()
        self._interrupts = 0

    def request(self, *_: Any) -> None:
        self._event.set()

    def _interrupt(self, *_: Any) -> None:
        self._interrupts += 1
        if self._interrupts > 1:
            raise KeyboardInterrupt
        logger.warning("Ctrl-C: saving and stopping after this step (press it again to abort)")
        self.request()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def agreed(self, step: int, *, every: int) -> bool:
        """Whether every host stops after ``step``.

        One process decides alone, every step. Several agree (one small collective) every ``every``
        steps only: a host that stopped alone would leave the others waiting in a collective forever,
        and a collective every step would make every host wait for the slowest one each step.
        """
        if jax.process_count() == 1:
            return self.requested
        if step % every:
            return False
        return multihost.any_process(self.requested)

    @contextlib.contextmanager
    def installed(self) -> Iterator[PreemptionFlag]:
        """SIGTERM and SIGINT handled by this flag inside the block (from start-up to the end of export)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {
            sig: signal.signal(sig, handler)
            for sig, handler in ((signal.SIGTERM, self.request), (signal.SIGINT, self._interrupt))
        }
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
