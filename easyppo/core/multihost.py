"""Decisions every process of a multi-host job must take together.

A host that acts alone on a local fact (a SIGTERM that reached only it, a cache entry only it lacks)
leaves the others waiting in a collective forever; these helpers turn a local flag into an agreed one.
Each is itself a collective: every process must call it at the same point.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on at least one.

    For decisions all hosts must take at the same step, such as stopping after a SIGTERM that reached
    some hosts a moment before the others: a host that stops alone leaves the rest waiting in a
    collective forever. It is itself a collective, so every process must call it at the same point.
    """
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def barrier(name: str) -> None:
    """Waits until every process reaches this point (a no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
