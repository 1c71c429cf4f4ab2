"""An on-disk cache of per-row arrays computed once from a frozen model (DPO's reference log-probs).

A DPO run needs, for every preference pair, the reference model's summed log-probs of the chosen and
rejected responses. They never change during training, so they can be computed in one forward pass
over the dataset and reused by every later step, by a resumed run and by later runs (another beta,
another loss) on the same data and reference model. Reusing them is only correct if *nothing that
determines them* has changed, so an entry is keyed by all of it:

* the dataset fingerprint (``PreparedData.fingerprint``: the normalised rows, the tokenizer and chat
  format, the tokenisation and truncation settings) and the number of usable rows;
* the reference model's identity (:func:`model_identity`): its architecture and compute dtype, and
  either the random-init seed or a digest of the checkpoint's file listing (relative path, size and
  modification time of every file). Overwriting a checkpoint in place changes sizes or mtimes, so the
  key changes; copying a checkpoint without preserving mtimes also changes it, which costs one
  recomputation but never serves stale values;
* whatever else the caller adds (e.g. the tokenisation settings, spelled out for readability).

Layout: ``<cache_dir>/<hash of the components>/{values.npy, meta.json}``. ``meta.json`` repeats the
components and a digest of ``values.npy``; :func:`load` checks both, so an entry whose contents do
not match its key (copied by hand, half-synced, edited) is rejected with a message saying which
component differs, and recomputed. Entries are written in a staging directory and renamed into place,
so a crash never leaves a partial entry, and concurrent writers (several hosts on a shared disk)
simply keep whichever complete entry landed first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from easyppo.core import multihost
from easyppo.weights import loading

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
VALUES_FILE = "values.npy"
META_FILE = "meta.json"
# Model settings that change how values are computed but not the values: left out of the identity.
_VALUE_NEUTRAL_SETTINGS = ("remat", "scan_layers")


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _canonical(components: Mapping[str, Any]) -> str:
    return json.dumps(components, sort_keys=True, separators=(",", ":"))


def cache_key(components: Mapping[str, Any]) -> str:
    """A short hash of JSON-serialisable ``components``; equal components give equal keys."""
    return _digest(_canonical({"format_version": FORMAT_VERSION, **components}).encode())


def entry_path(cache_dir: str, components: Mapping[str, Any]) -> str:
    return os.path.join(os.path.expanduser(cache_dir), cache_key(components))


# --------------------------------------------------------------------------------- model identity


def _file_listing(root: epath.Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime) of every file below ``root``; mtimes in ns where the FS has them."""
    if "://" not in str(root):
        listing = []
        for directory, _, files in os.walk(root):
            for name in files:
                path = os.path.join(directory, name)
                stat = os.stat(path)
                listing.append((os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns))
        return sorted(listing)
    return sorted(
        (str(path.relative_to(root)), (stat := path.stat()).length, int(stat.mtime))
        for path in root.rglob("*")
        if not path.is_dir()
    )


def model_identity(model_cfg: ml_collections.ConfigDict, *, seed: int) -> dict[str, Any]:
    """What weights ``easyppo.weights.loading.load_model(model_cfg, ...)`` produces, without loading them.

    Cheap (a directory listing, no tensor is read), so a cache hit never has to load the reference
    model at all. See the module docstring for what the identity covers and why.
    """
    architecture = dataclasses.asdict(loading.resolve_architecture(model_cfg))
    for name in _VALUE_NEUTRAL_SETTINGS:
        architecture.pop(name, None)
    if architecture.get("lora") is None:  # a reference never has adapters: keys from before LoRA stay valid
        architecture.pop("lora", None)
    if not model_cfg.init_from:
        # Random init is a pure function of the architecture, the seed and JAX's PRNG implementation.
        return {"source": "random_init", "seed": seed, "jax": jax.__version__, "architecture": architecture}
    root = epath.Path(model_cfg.init_from)
    if "://" not in model_cfg.init_from:
        root = epath.Path(os.path.abspath(os.path.expanduser(model_cfg.init_from)))
    listing = _file_listing(root)
    return {
        "source": str(root),
        "files_digest": _digest(json.dumps(listing).encode()),
        "num_files": len(listing),
        "total_bytes": sum(size for _, size, _ in listing),
        "architecture": architecture,
    }


# -------------------------------------------------------------------------------------- entries


def _mismatches(stored: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two component dicts, by dotted key."""
    problems = []
    for key in sorted(set(stored) | set(expected)):
        name = f"{prefix}{key}"
        if key not in stored or key not in expected:
            problems.append(f"{name} is {'missing' if key not in stored else 'unexpected'} in the stored entry")
        elif isinstance(stored[key], Mapping) and isinstance(expected[key], Mapping):
            problems.extend(_mismatches(stored[key], expected[key], prefix=f"{name}."))
        elif stored[key] != expected[key]:
            problems.append(f"{name}: stored {stored[key]!r}, expected {expected[key]!r}")
    return problems


def _validate(path: str, components: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[np.ndarray | None, list[str]]:
    """The entry's values and an empty list, or None and what is wrong with the entry."""
    meta_path, values_path = os.path.join(path, META_FILE), os.path.join(path, VALUES_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        with open(values_path, "rb") as f:
            raw = f.read()
        problems = _mismatches(meta.get("components", {}), json.loads(_canonical(components)))
        if meta.get("values_digest") != _digest(raw):
            problems.append(f"{VALUES_FILE} does not match the digest recorded in {META_FILE}")
        values = np.load(values_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        return None, [f"unreadable: {e}"]
    if values.shape != tuple(shape):
        problems.append(f"values have shape {values.shape}, expected {tuple(shape)}")
    elif not np.all(np.isfinite(values)):
        problems.append("values contain NaN or Inf")
    return (None, problems) if problems else (values, [])


def load(cache_dir: str, components: Mapping[str, Any], *, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached array for ``components``, or None if there is none or it cannot be trusted.

    A present but unusable entry (its recorded components, shape, content digest or finiteness differ
    from what is expected) is reported with a warning naming each difference, and None is returned so
    that the caller recomputes: stale values are never returned.
    """
    path = entry_path(cache_dir, components)
    if not os.path.exists(os.path.join(path, META_FILE)):
        return None
    values, problems = _validate(path, components, shape)
    if problems:
        logger.warning("ignoring stale or damaged cache entry %s (%s); recomputing", path, "; ".join(problems))
    return values


def store(cache_dir: str, components: Mapping[str, Any], values: np.ndarray) -> str:
    """Writes ``values`` as the entry for ``components`` atomically; returns the entry's directory.

    An existing valid entry (another host won the race) is kept; an existing entry that is stale or
    damaged is replaced.
    """
    values = np.ascontiguousarray(values)
    path = entry_path(cache_dir, components)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".staging-{os.path.basename(path)}-", dir=parent)
    try:
        values_path = os.path.join(staging, VALUES_FILE)
        np.save(values_path, values, allow_pickle=False)
        with open(values_path, "rb") as f:
            values_digest = _digest(f.read())
        meta = {
            "components": components,
            "values_digest": values_digest,
            "shape": list(values.shape),
            "dtype": str(values.dtype),
            "format_version": FORMAT_VERSION,
        }
        with open(os.path.join(staging, META_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        _publish(staging, path, components, values.shape)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _publish(staging: str, path: str, components: Mapping[str, Any], shape: tuple[int, ...]) -> None:
    if os.path.exists(path):
        if _validate(path, components, shape)[0] is not None:
            return  # a valid entry landed first (another host)
        stale = tempfile.mkdtemp(prefix=f".stale-{os.path.basename(path)}-", dir=os.path.dirname(path))
        os.rename(path, os.path.join(stale, "entry"))
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(staging, path)
    except OSError:
        if not os.path.exists(os.path.join(path, META_FILE)):
            raise


def load_or_compute(
    cache_dir: str,
    components: Mapping[str, Any],
    compute: Callable[[], np.ndarray],
    *,
    shape: tuple[int, ...],
) -> tuple[np.ndarray, bool]:
    """``(values, cache_hit)``: the cached entry if it is valid, else ``compute()`` stored for next time.

    In a multi-host job every host computes as soon as one misses its cache (each host may have its
    own local cache directory): ``compute`` runs collective programs, which need every host.
    """
    cached = load(cache_dir, components, shape=shape)
    if not multihost.any_process(cached is None):
        logger.info("loaded cached values from %s", entry_path(cache_dir, components))
        return cached, True
    values = np.asarray(compute())
    if values.shape != tuple(shape):
        raise ValueError(f"computed values have shape {values.shape}, expected {tuple(shape)}")
    path = store(cache_dir, components, values)
    logger.info("computed and cached values in %s", path)
    return values, False
