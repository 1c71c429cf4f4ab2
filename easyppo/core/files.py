"""Files that behave the same on a local disk and in an object store (``gs://``, ``s3://`` ...).

Everything easyppo writes goes through ``etils.epath``, which speaks to object stores through fsspec
(``gcsfs`` for ``gs://``: the ``gcs`` extra). Three things an object store cannot do the way a disk
does are bridged here, and nowhere else:

* **Appending.** A bucket object is written whole. ``AppendFile`` keeps the lines in a local file
  and uploads the whole file at most every ``sync_every_s`` seconds and on ``close()``; opening an
  existing remote file first downloads it, so a resumed run keeps appending to it.
* **Libraries that need a local file** (``safetensors``' memory map, ``transformers``): a remote
  directory is mirrored into a local cache once (``local_mirror``), keyed by its listing, so a
  rewritten directory is fetched again.
* **Writing a directory with such libraries**: ``staged_directory`` hands out a local directory and
  uploads it to its remote place when it is complete.

A local path never takes any of these detours.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

from etils import epath

from easyppo.core import paths

_CHUNK = 16 << 20


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies one file, streaming (weight shards are many GB), between any two epath locations."""
    with epath.Path(src).open("rb") as reader, epath.Path(dst).open("wb") as writer:
        shutil.copyfileobj(reader, writer, _CHUNK)


def files_below(root: epath.Path) -> list[tuple[str, epath.Path]]:
    """(relative name, path) of every file below ``root``, walked level by level (no ``**`` remotely)."""
    found, pending = [], [("", root)]
    while pending:
        prefix, directory = pending.pop()
        for child in sorted(directory.iterdir(), key=lambda p: p.name):
            name = f"{prefix}{child.name}"
            if child.is_dir():
                pending.append((name + "/", child))
            else:
                found.append((name, child))
    return sorted(found)


def upload_tree(local_dir: str, remote_dir: str) -> None:
    """Copies every file below ``local_dir`` to the same place below ``remote_dir``."""
    target = epath.Path(remote_dir)
    for name, source in files_below(epath.Path(local_dir)):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        copy_file(source, target / name)


@contextlib.contextmanager
def local_stand_in(path: str) -> Iterator[str]:
    """``path`` itself when local; for a remote one, a local path of the same name in a temporary
    directory (not yet created), removed with everything below it when the block ends."""
    if not paths.is_remote(path):
        yield path
        return
    root = tempfile.mkdtemp(prefix="easyppo-staged-")
    try:
        yield os.path.join(root, epath.Path(path).name)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(path: str) -> Iterator[str]:
    """A directory to write ``path``'s contents into: ``path`` itself when local; for a remote one
    (which must be empty or absent) a local stand-in, uploaded to ``path`` when the block completes
    (nothing is uploaded if it raises)."""
    if paths.is_remote(path) and epath.Path(path).exists() and any(epath.Path(path).iterdir()):
        raise FileExistsError(f"{path} already holds files; write into an empty or new directory")
    with local_stand_in(path) as local:
        if local != path:
            os.makedirs(local)
        yield local
        if local != path:
            upload_tree(local, path)


def default_cache_root() -> str:
    """Where remote directories are mirrored: ``$EASYPPO_CACHE`` or ``~/.cache/easyppo``."""
    return os.environ.get("EASYPPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "easyppo")


def local_mirror(path: str, cache_root: str | None = None) -> str:
    """``path`` itself when local; a remote directory's local copy otherwise (module doc).

    The copy lives below ``<cache_root>/remote/<digest of the URL and listing>``: unchanged
    directories are fetched once, and a rewritten one (other names or sizes) is fetched again. The
    copy is assembled beside its final name and renamed into place, so a kill mid-download leaves no
    half copy behind for the next run to trust.
    """
    if not paths.is_remote(path):
        return path
    root = epath.Path(path)
    found = files_below(root)
    listing = [(name, file.stat().length) for name, file in found]
    digest = hashlib.sha256(repr((path.rstrip("/"), listing)).encode()).hexdigest()[:24]
    final = os.path.join(cache_root or default_cache_root(), "remote", f"{root.name}-{digest}")
    if os.path.isdir(final):
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{root.name}-", dir=os.path.dirname(final))
    try:
        for name, file in found:
            os.makedirs(os.path.dirname(os.path.join(staging, name)), exist_ok=True)
            copy_file(file, os.path.join(staging, name))
        os.rename(staging, final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not os.path.isdir(final):
            raise
        # else another process of this host finished the same copy first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


class AppendFile:
    """A text file that only grows, line by line, at a local or remote path (module doc).

    Local: every ``write`` reaches the file at once. Remote: writes reach the bucket at most
    ``sync_every_s`` seconds apart and at ``close()`` (a hard kill loses at most that much).
    """

    def __init__(self, path: str, *, sync_every_s: float = 30.0):
        self.path = path
        self._remote = epath.Path(path) if paths.is_remote(path) else None
        self._sync_every_s = sync_every_s
        self._last_sync = time.monotonic()
        if self._remote is None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (held open until close)
            self._staging = None
            return
        fd, self._staging = tempfile.mkstemp(prefix="easyppo-append-", suffix=f"-{self._remote.name}")
        self._file = os.fdopen(fd, "w+", encoding="utf-8")
        if self._remote.exists():
            self._file.write(self._remote.read_text())
        self._dirty = False

    def write(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()
        if self._remote is not None:
            self._dirty = True
            if time.monotonic() - self._last_sync >= self._sync_every_s:
                self.sync()

    def sync(self) -> None:
        """Uploads what was written so far (remote paths; a no-op for local ones)."""
        if self._remote is None or not self._dirty:
            return
        self._remote.parent.mkdir(parents=True, exist_ok=True)
        copy_file(self._staging, self._remote)
        self._dirty, self._last_sync = False, time.monotonic()

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._file.flush()
            self.sync()
        finally:
            self._file.close()
            if self._staging is not None:
                os.remove(self._staging)
