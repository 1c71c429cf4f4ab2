"""One run per output directory: a lock file beside the checkpoints, naming its holder.

Two runs started into one directory would resume from each other's checkpoints and leave one run's
export next to the other's metrics. ``RunLock`` makes the second one fail at start-up, naming the
host and process that hold the directory. A lock is stale, and taken over with a warning, when its
holder is gone: a process that no longer exists on this host, or a holder on another host (a pod
worker) whose heartbeat, refreshed every ``heartbeat_s`` seconds while it runs, is older than
``stale_after_s``. Only one process of a multi-host job (process 0) holds the lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from typing import Any

from etils import epath

from easyppo.core import paths

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"


class RunLockedError(RuntimeError):
    """Another live run holds the output directory."""


def lock_path(checkpoint_directory: str) -> epath.Path:
    """The lock of a run: a sibling of its checkpoint directory (Orbax owns the directory itself)."""
    return epath.Path(str(checkpoint_directory).rstrip("/") + LOCK_SUFFIX)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


class RunLock:
    """Held from ``acquire()`` to ``release()`` (or the end of a ``with`` block)."""

    def __init__(self, checkpoint_directory: str, *, heartbeat_s: float = 60.0, stale_after_s: float = 600.0):
        self.path = lock_path(checkpoint_directory)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._identity = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------ holding

    def acquire(self) -> None:
        """Takes the lock, or raises ``RunLockedError`` naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._create_exclusively():
            holder = self._read()
            for _ in range(5):  # a lock being created right now reads empty for a moment
                if holder != {}:
                    break
                time.sleep(0.1)
                holder = self._read()
            if holder is not None and not self._stale(holder):
                raise RunLockedError(
                    f"{self.path.parent} is in use by the run of process {holder.get('pid')} on host "
                    f"{holder.get('host')!r}, started {time.ctime(holder.get('started') or 0)} (lock {self.path}); "
                    "wait for it to finish, or give this run another output_dir"
                )
            if holder:
                logger.warning(
                    "taking over the stale lock %s of process %s on %s",
                    self.path,
                    holder.get("pid"),
                    holder.get("host"),
                )
            self._write(time.time())
            time.sleep(0.2)  # let a run taking over the same stale lock at the same moment write too
            if not self._owned():
                raise RunLockedError(
                    f"{self.path.parent} was taken by another run at the same moment (lock {self.path})"
                )
        self._thread = threading.Thread(target=self._beat, name="easyppo-run-lock", daemon=True)
        self._thread.start()

    def _create_exclusively(self) -> bool:
        """Creates the lock if none exists, atomically where the filesystem allows (local paths)."""
        if paths.is_remote(str(self.path)):
            if self.path.exists():
                return False
            self._write(time.time())
            return self._owned()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({**self._identity, "heartbeat": time.time()}))
        return True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._owned():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    # ----------------------------------------------------------------------------------- helpers

    def _write(self, heartbeat: float) -> None:
        text = json.dumps({**self._identity, "heartbeat": heartbeat})
        if paths.is_remote(str(self.path)):  # an object store publishes each write whole: no rename needed
            self.path.write_text(text)
            return
        staging = epath.Path(f"{self.path}.{self._identity['pid']}.tmp")
        staging.write_text(text)
        staging.replace(self.path)  # atomic: a reader sees the old lock or the new one, never half of one

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            return {}  # unreadable: treated as stale

    def _owned(self) -> bool:
        holder = self._read() or {}
        return all(holder.get(key) == value for key, value in self._identity.items())

    def _stale(self, holder: dict[str, Any]) -> bool:
        if not holder or holder.get("pid") is None:
            return True
        if holder.get("host") == self._identity["host"]:
            return not _process_alive(int(holder["pid"]))
        return time.time() - float(holder.get("heartbeat") or 0) > self.stale_after_s

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):
                self._write(time.time())
