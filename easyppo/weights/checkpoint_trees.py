"""Inspecting a tree before it is checkpointed or restored: non-finite leaves, key paths, stored
shapes, and the JSON that travels beside it. Errors name the leaf or key at fault."""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

PyTree = Any

VERSIONED_PACKAGES = ("easyppo", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


@jax.jit
def finite_flags(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def non_finite_leaf_paths(state: PyTree) -> list[str]:
    """Key paths of floating leaves holding NaN or Inf.

    Device arrays are reduced where they live and only one boolean per leaf comes back. All leaves on
    the same devices are checked by one program, and the groups run one after another: several
    small collective programs in flight at once can deadlock the CPU runtime's all-reduce rendezvous
    (seen with 8 emulated devices on 2 cores), and one program is cheaper anyway.
    """
    groups: dict[tuple[int, ...], list[tuple[Any, jax.Array]]] = {}
    host_failures = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if isinstance(leaf, jax.Array):
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                devices = tuple(sorted(d.id for d in leaf.sharding.device_set))
                groups.setdefault(devices, []).append((path, leaf))
        else:
            array = np.asarray(leaf)
            if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
                host_failures.append(path)
    device_failures = []
    for members in groups.values():
        flags = jax.device_get(finite_flags([leaf for _, leaf in members]))
        device_failures += [path for (path, _), finite in zip(members, flags, strict=True) if not finite]
    return [render(key_parts(path)) for path in device_failures + host_failures]


def key_parts(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A key path as plain strings, so a dataclass attribute, a dict key and a stored key compare equal."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return tuple(parts)


def render(parts: tuple[str, ...]) -> str:
    return "'" + "/".join(parts) + "'"


def leaf_shapes(stored_tree: PyTree) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Key path -> shape for every leaf of a checkpoint's tree metadata (scalars have shape ())."""
    return {
        key_parts(path): tuple(getattr(leaf, "shape", None) or ())
        for path, leaf in jax.tree_util.tree_leaves_with_path(stored_tree)
    }


def json_compatible_config(run_config: ml_collections.ConfigDict | Mapping[str, Any] | None) -> dict[str, Any]:
    """The run config as plain JSON data (tuples become lists); an error names any value that is not."""
    if run_config is None:
        return {}
    if isinstance(run_config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        run_config = run_config.to_dict()

    def convert(value: Any, path: str) -> Any:
        if isinstance(value, Mapping):
            return {str(k): convert(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if value is None or isinstance(value, (str, bool, int)):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise TypeError(
            f"Run config key '{path}' holds {value!r} ({type(value).__name__}), which cannot be saved "
            "as JSON beside the checkpoint; use a string, number, bool, None, list or dict."
        )

    return convert(run_config, "")


def check_json_object(value: Any, *, what: str) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a JSON object (a dict), got {type(value).__name__}.")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{what} is not JSON-serialisable (strict JSON, no NaN/Inf): {error}") from error


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions
