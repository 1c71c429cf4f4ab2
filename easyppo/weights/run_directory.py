"""Reading another run's checkpoint directory, read-only: whether it is one, its saved config and
metadata, the names and values of its parameters. How a policy starts from an SFT run, a value model
from a reward-model run, and how ``easyppo generate`` finds a run's tokenizer and chat format."""

from __future__ import annotations

import json
from typing import Any

from etils import epath

from easyppo.core import paths
from easyppo.weights import checkpoint_trees as trees
from easyppo.weights.run_checkpoint import (
    CONFIG_FILENAME,
    CONFIG_ITEM,
    METADATA_FILENAME,
    METADATA_ITEM,
    STATE_ITEM,
    Checkpointer,
    default_config,
)

PyTree = Any


def restore_subtree(directory: str | epath.Path, abstract_subtree: PyTree, step: int | None = None) -> PyTree:
    """Reads part of another run's checkpoint (read-only), e.g. the params of an SFT or reward model."""
    config = default_config()
    config.directory = paths.resolve(str(directory))  # orbax needs an absolute path
    with Checkpointer(config, read_only=True) as checkpointer:
        return checkpointer.restore_subtree(abstract_subtree, step=step)


def read_run_config(directory: str | epath.Path, step: int | None = None) -> dict[str, Any]:
    """The resolved run config saved with `step` (default: the latest) of a run's checkpoints."""
    config = default_config()
    config.directory = str(directory)
    with Checkpointer(config, read_only=True) as checkpointer:
        step = checkpointer._resolve_step(step)
    return json.loads((epath.Path(directory) / str(step) / CONFIG_ITEM / CONFIG_FILENAME).read_text())


def read_run_metadata(directory: str | epath.Path, step: int | None = None) -> dict[str, Any]:
    """The metadata saved with `step` (default: the latest): step, wall time, versions, topology, and
    (for runs since they were recorded) ``model_kind`` and ``tokenizer_fingerprint``."""
    config = default_config()
    config.directory = str(directory)
    with Checkpointer(config, read_only=True) as checkpointer:
        step = checkpointer._resolve_step(step)
    return json.loads((epath.Path(directory) / str(step) / METADATA_ITEM / METADATA_FILENAME).read_text())


def stored_leaves(directory: str | epath.Path, step: int | None = None) -> set[tuple[str, ...]]:
    """The key path of every leaf of the stored state (``("params", "model", ..., "kernel")``, ...)."""
    config = default_config()
    config.directory = str(directory)
    with Checkpointer(config, read_only=True) as checkpointer:
        step = checkpointer._resolve_step(step)
        return set(trees.leaf_shapes(checkpointer._manager.metadata(step).item_metadata[STATE_ITEM].tree))


def stored_param_names(directory: str | epath.Path, step: int | None = None) -> set[str]:
    """The top-level names under the stored state's ``params`` (e.g. ``{"model", "lm_head"}``)."""
    return {key[1] for key in stored_leaves(directory, step) if len(key) > 1 and key[0] == "params"}


def is_run_directory(directory: str | epath.Path) -> bool:
    """True when `directory` holds at least one finalised train-run checkpoint step."""
    path = epath.Path(directory)
    return path.is_dir() and any(
        child.name.isdigit() and (child / CONFIG_ITEM / CONFIG_FILENAME).exists() for child in path.iterdir()
    )
