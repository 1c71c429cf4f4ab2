"""Paths as users type them: relative local paths are resolved once, remote URLs pass untouched.

A run must not change meaning with the working directory, and Orbax refuses relative paths, so every
entry point that takes a path resolves it here first: ``~`` is expanded and a relative local path is
made absolute against the current directory. Anything with a scheme (``gs://bucket/run``,
``s3://...``, ``memory://...``) is left to ``etils.epath`` / fsspec as given.
"""

from __future__ import annotations

import os


def is_remote(path: str) -> bool:
    """Whether ``path`` names a location through a URL scheme (``gs://``, ``s3://`` ...)."""
    return "://" in path


def resolve(path: str) -> str:
    """``path`` made absolute unless it is empty or remote (module doc)."""
    if not path or is_remote(path):
        return path
    return os.path.abspath(os.path.expanduser(path))
