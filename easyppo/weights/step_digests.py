"""Content digests of a saved checkpoint step, so that corruption which still reads is caught.

A truncated or missing file fails the restore by itself; a flipped byte inside an array file does not.
After a step is finalised, ``record`` writes ``easyppo_digests.json`` into it (a SHA-256 of every
file, by relative path); ``check`` recomputes them before a resume and names the first file that
differs, is missing or is new. A step without the file (written before digests, or killed between
finalising and recording) is not checked.

In an object store (``gs://...``) the files are not read back: that would download every saved
state again. The store already checksums each object on upload, so the digest of a remote file is
its size and the store's own checksum (GCS's CRC32C or MD5, S3's ETag), read from its listing.
"""

from __future__ import annotations

import hashlib
import json

import fsspec
from etils import epath

from easyppo.core import files, paths

DIGESTS_FILE = "easyppo_digests.json"
_CHUNK = 1 << 22


def compute(step_dir: epath.Path) -> dict[str, str]:
    """SHA-256 of every file below ``step_dir`` (except the digests file), by relative path; the
    store's checksums for a remote one (module doc)."""
    digests = {}
    for name, path in files.files_below(step_dir):
        if name == DIGESTS_FILE:
            continue
        if paths.is_remote(str(path)):
            digests[name] = _stored_checksum(str(path))
            continue
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        digests[name] = digest.hexdigest()
    return digests


def _stored_checksum(url: str) -> str:
    """``size:checksum`` of a remote object, from the store's metadata (no download)."""
    filesystem, path = fsspec.core.url_to_fs(url)
    info = filesystem.info(path)
    checksum = next((str(info[key]) for key in ("crc32c", "md5Hash", "ETag", "etag") if info.get(key)), "")
    return f"{info.get('size')}:{checksum}"


def record(step_dir: epath.Path) -> None:
    """Writes the step's digests unless they are already there (written atomically)."""
    target = step_dir / DIGESTS_FILE
    if target.exists():
        return
    text = json.dumps(compute(step_dir), indent=1, sort_keys=True)
    if paths.is_remote(str(step_dir)):  # an object appears whole: no staging name needed
        target.write_text(text)
        return
    staging = step_dir / (DIGESTS_FILE + ".tmp")
    staging.write_text(text)
    staging.rename(target)


def check(step_dir: epath.Path) -> str | None:
    """None when the step's files match its recorded digests (or none were recorded), else what differs.

    A step copied between a disk and a bucket since it was saved (``gcloud storage cp -r``) carries
    digests of the other kind: one saved in a bucket and now on disk is checked by size; one saved
    on disk and now in a bucket by its file names (the copy itself was checksummed by the store).
    """
    target = step_dir / DIGESTS_FILE
    if not target.exists():
        return None
    recorded, actual = json.loads(target.read_text()), compute(step_dir)
    for name in sorted(set(recorded) | set(actual)):
        if name not in actual:
            return f"{name} is missing"
        if name not in recorded:
            return f"{name} was not part of the saved step"
        saved_in_store, in_store = _is_store_digest(recorded[name]), _is_store_digest(actual[name])
        if saved_in_store == in_store:
            if recorded[name] != actual[name]:
                return f"{name} differs from its recorded digest"
        elif saved_in_store:
            size = recorded[name].split(":", 1)[0]
            if size != str((step_dir / name).stat().length):
                return f"{name} differs in size from the saved step"
    return None


def _is_store_digest(value: str) -> bool:
    """Whether a recorded digest is a store's ``size:checksum`` (else a local SHA-256)."""
    return ":" in value
