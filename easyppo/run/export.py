"""Exporting a finished run's models to Hugging Face directories: atomically, once, checked up front.

The trainer writes into ``<export_hf_dir>.partial`` (and its siblings, such as PPO's
``<export_hf_dir>.partial_value``); each directory gets the tokenizer files and an
``easyppo_export.json`` naming the run, its step and its tokenizer's fingerprint, and only then is renamed to its final name, the main
directory last. So a kill during export leaves no half-written export under the final name, and a
rerun starts the export afresh. A complete export of the same run is recognised, so running a
finished run again reports that it is complete instead of failing; an export directory that holds
something else is refused before training starts.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import jax
from etils import epath

from easyppo.core import files
from easyppo.run.config import ConfigError

MARKER_FILE = "easyppo_export.json"
STAGING_SUFFIX = ".partial"


class ExportDirectoryError(ConfigError):
    """``train.export_hf_dir`` holds something other than this run's export."""

    def __init__(self, detail: str):
        super().__init__("train.export_hf_dir", detail)


def is_complete(export_dir: str, checkpoint_directory: str) -> bool:
    """Whether ``export_dir`` holds this run's finished export (else it is absent or empty).

    Raises ``ExportDirectoryError`` if it holds anything else, so a run fails before training rather
    than at the export hours later.
    """
    path = epath.Path(export_dir)
    if not path.exists() or not any(path.iterdir()):
        return False
    if _holds_export_of(path, checkpoint_directory):
        return True
    raise ExportDirectoryError(
        f"{export_dir} already holds files that are not this run's export; export into an empty or new directory"
    )


def _holds_export_of(path: epath.Path, checkpoint_directory: str) -> bool:
    marker = path / MARKER_FILE
    return marker.exists() and json.loads(marker.read_text()).get("checkpoint_directory") == str(checkpoint_directory)


def export_run(
    export: Callable[[str], list[str]],
    export_dir: str,
    *,
    finish: Callable[[str], None],
    checkpoint_directory: str,
    step: int,
    tokenizer_fingerprint: str,
) -> list[str]:
    """Runs ``export(staging_dir) -> directories`` and publishes each directory atomically.

    ``finish(directory)`` completes each one before it is published (the tokenizer files). Every
    process runs the export (saving gathers sharded parameters); process 0 alone publishes. A remote
    ``export_dir`` (``gs://...``) is written on local disk first (the weight writers need local
    files), uploaded to the remote staging name, and published from there by the same renames.
    """
    base = export_dir.rstrip("/")
    staging = base + STAGING_SUFFIX
    writer = jax.process_index() == 0
    if writer:
        _remove_staging(base)
    with files.local_stand_in(staging) as local:
        directories = export(local)
        suffixes = [directory[len(local) :] for directory in directories]
        if not writer:
            return [base + suffix for suffix in suffixes]
        for directory in directories:
            finish(directory)
            marker = {
                "checkpoint_directory": str(checkpoint_directory),
                "step": step,
                "tokenizer_fingerprint": tokenizer_fingerprint,
            }
            (epath.Path(directory) / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        if local != staging:
            for directory, suffix in zip(directories, suffixes):
                files.upload_tree(directory, staging + suffix)
    for suffix in reversed(suffixes):  # the main directory last
        final, target = base + suffix, epath.Path(base + suffix)
        if target.exists():  # empty, or this run's own from an interrupted publish; never anything else
            if any(target.iterdir()) and not _holds_export_of(target, checkpoint_directory):
                raise ExportDirectoryError(f"{final} already holds files that are not this run's export")
            target.rmtree()
        epath.Path(staging + suffix).rename(target)
    return [base + suffix for suffix in suffixes]


def _remove_staging(base: str) -> None:
    """Removes what an interrupted export left (``<base>.partial`` and its siblings)."""
    path = epath.Path(base)
    parent = path.parent
    if not parent.exists():
        return
    for child in parent.iterdir():
        if child.name.startswith(path.name + STAGING_SUFFIX):
            child.rmtree() if child.is_dir() else child.unlink()
