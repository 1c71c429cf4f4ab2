"""Checkpoints of a training run: train state, data-iterator position and metadata, via Orbax.

One `Checkpointer` per run wraps an Orbax `CheckpointManager`. Every saved step is a directory

    <directory>/<step>/
        state/                      the train state pytree (Orbax PyTree format, sharded, OCDBT)
        data_state/data_state.json  the data iterator's position (a JSON object)
        metadata/metadata.json      step, wall time, library versions, device topology
        config/config.json          the resolved run config, readable without easyppo

        easyppo_digests.json        SHA-256 of every file (easyppo.weights.step_digests)

Why these choices:
- Saves are asynchronous: `save` returns once the arrays are off the devices; `wait_until_finished()`
  (or `close()`) before the process exits.
- Saves are atomic: Orbax writes `<step>.orbax-checkpoint-tmp` and renames it when every item is
  complete; a partial directory is never a step and is deleted before the next save.
- A state with a NaN or Inf in any floating leaf is refused before anything is written.
- Restores take an abstract target carrying the *new* run's shardings, so a checkpoint saved on one
  mesh restores onto any other; structure mismatches are reported by key path before any array is
  read; a step that cannot be restored, or whose bytes differ from its digests, is moved aside and the
  previous one used (`restore_latest_intact`).
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import logging
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from ml_collections import config_dict

from easyppo.core import multihost
from easyppo.core.options import require
from easyppo.weights import checkpoint_trees as trees
from easyppo.weights import step_digests

PyTree = Any

logger = logging.getLogger(__name__)

STATE_ITEM = "state"
DATA_STATE_ITEM = "data_state"
METADATA_ITEM = "metadata"
CONFIG_ITEM = "config"
CONFIG_FILENAME = "config.json"
METADATA_FILENAME = "metadata.json"
DAMAGED_SUFFIX = ".damaged"  # a step directory that could not be restored, kept for inspection


class NonFiniteStateError(ValueError):
    """The train state holds NaN or Inf values and was therefore not checkpointed."""


class TreeMismatchError(ValueError):
    """The requested restore target does not match the tree stored in the checkpoint."""


class RestoredCheckpoint(NamedTuple):
    """What `Checkpointer.restore` returns; unpacks as `(state, data_state, metadata)`."""

    state: PyTree
    data_state: dict[str, Any]
    metadata: dict[str, Any]


def default_config() -> ml_collections.ConfigDict:
    """Checkpointing options, with their defaults.

    directory: where step directories are written (local path or gs://...). Required.
    save_every_steps: save when `step % save_every_steps == 0` (and on a preemption signal).
    max_to_keep: how many of the most recent checkpoints to keep; 0 keeps every checkpoint.
    async_save: write files in a background thread while training continues.
    digests: after each step is finalised, record a SHA-256 of its files (process 0 reads the step
      once, at the next save), and check them before resuming, so corruption that still reads (a
      flipped byte) is caught; turn off for very large checkpoints on slow storage.
    """
    config = ml_collections.ConfigDict()
    config.directory = config_dict.placeholder(str)
    config.save_every_steps = 1000
    config.max_to_keep = 3
    config.async_save = True
    config.digests = True
    return config


def check_config(config: ml_collections.ConfigDict, *, section: str = "checkpoint") -> None:
    """The checkpoint options, checked before a run starts; errors name ``<section>.<key>``. (A run
    derives an unset ``directory`` from its ``output_dir``; the ``Checkpointer`` requires one.)"""
    require(config.save_every_steps >= 1, f"{section}.save_every_steps", f"must be >= 1, got {config.save_every_steps}")
    require(config.max_to_keep >= 0, f"{section}.max_to_keep", f"must be >= 0 (0 keeps all), got {config.max_to_keep}")


class Checkpointer:
    """Saves and restores one run's checkpoints. Every process must make the same calls.

    Args:
      config: options from `default_config()`.
      run_config: the run's resolved configuration, written as `config.json` and into the returned
        metadata of every checkpoint. Checked for JSON-compatibility here, at start-up, rather than
        at the first save hours into a run.
      read_only: open someone else's checkpoints (e.g. an SFT run to initialise a policy from):
        never saves, deletes or cleans up anything in `config.directory`.
      model_kind: what the state's ``params`` are ("causal_lm", "reward" or "value"), recorded in
        every step's metadata so that a loader knows what a run directory holds without asking which
        algorithm wrote it.
      tokenizer_fingerprint: ``Tokenizer.fingerprint`` of the run's tokenizer, recorded likewise.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        *,
        run_config: ml_collections.ConfigDict | Mapping[str, Any] | None = None,
        read_only: bool = False,
        model_kind: str | None = None,
        tokenizer_fingerprint: str | None = None,
    ):
        require(bool(config.directory), "checkpoint.directory", "is not set (e.g. --config.checkpoint.directory=...)")
        check_config(config)
        self._run_config = trees.json_compatible_config(run_config)
        self._read_only = read_only
        self._digests = bool(config.get("digests", True))
        self._identity = {"model_kind": model_kind, "tokenizer_fingerprint": tokenizer_fingerprint}
        self._manager = ocp.CheckpointManager(
            epath.Path(config.directory),
            options=ocp.CheckpointManagerOptions(
                save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(
                    [
                        ocp.checkpoint_managers.FixedIntervalPolicy(config.save_every_steps),
                        ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
                    ]
                ),
                preservation_policy=ocp.checkpoint_managers.LatestN(n=config.max_to_keep or None),
                enable_async_checkpointing=config.async_save,
                cleanup_tmp_directories=not read_only,
                create=not read_only,
                read_only=read_only,
            ),
            handler_registry=_handler_registry(),
        )

    @property
    def directory(self) -> epath.Path:
        return self._manager.directory

    def all_steps(self) -> list[int]:
        """Steps of all finalised checkpoints, ascending. Partial (tmp) directories are not steps."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finalised step, or None when the directory holds no checkpoint."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """True at multiples of `save_every_steps` and when a preemption signal has arrived."""
        return self._manager.should_save(step)

    def save(
        self,
        step: int,
        state: PyTree,
        data_state: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Checkpoints `state` and `data_state` as `step` if `should_save(step)` or `force`.

        Returns whether a save was started (it may still be running: see `wait_until_finished`).

        Raises:
          NonFiniteStateError: a floating leaf of `state` holds NaN or Inf; nothing is written.
          TypeError: `data_state` is not a JSON object; nothing is written.
        """
        if self._read_only:
            raise ValueError(f"This Checkpointer opened {self.directory} read-only; it cannot save.")
        if not force and not self.should_save(step):
            return False
        data_state = {} if data_state is None else data_state
        trees.check_json_object(data_state, what="data_state")
        bad_paths = trees.non_finite_leaf_paths(state)
        if bad_paths:
            latest = self.latest_step()
            raise NonFiniteStateError(
                f"Refusing to checkpoint step {step}: non-finite values (NaN/Inf) in {', '.join(bad_paths[:5])}"
                + (f" and {len(bad_paths) - 5} more leaves" if len(bad_paths) > 5 else "")
                + (f". The latest good checkpoint is step {latest}." if latest is not None else "")
                + (". No earlier checkpoint exists." if latest is None else "")
            )
        metadata = {
            "step": int(step),
            "wall_time": time.time(),
            **self._identity,
            "versions": trees.library_versions(),
            "topology": {
                "process_count": jax.process_count(),
                "device_count": jax.device_count(),
                "platform": jax.devices()[0].platform,
            },
        }
        self._record_digests()  # of the steps finalised since the last save
        # The save decision was made above (evaluating it again would hit the preemption sync point
        # twice), so Orbax is told to save unconditionally. It still refuses to overwrite a step.
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.PyTreeSave(state),
                    DATA_STATE_ITEM: ocp.args.JsonSave(dict(data_state)),
                    METADATA_ITEM: ocp.args.JsonSave(metadata),
                    CONFIG_ITEM: ocp.args.JsonSave(self._run_config),
                }
            ),
            force=True,
        )

    def wait_until_finished(self) -> None:
        """Blocks until every started save is finalised on disk (and old steps are deleted)."""
        self._manager.wait_until_finished()
        self._record_digests()

    def _record_digests(self) -> None:
        if self._digests and not self._read_only and jax.process_index() == 0:
            for step in self.all_steps():
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile (max_to_keep)
                    step_digests.record(self.directory / str(step))

    def restore(self, abstract_state: PyTree, step: int | None = None) -> RestoredCheckpoint:
        """Restores the whole checkpoint of `step` (default: the latest) onto `abstract_state`'s shardings.

        `abstract_state` has the structure of the saved state with `jax.ShapeDtypeStruct` leaves that
        carry the new run's shardings (e.g. from `jax.eval_shape` plus partition rules). Shapes must
        match the checkpoint; a different dtype is cast on load. The returned metadata holds the
        saved `step`, `wall_time`, `versions`, `topology` and the run `config`.

        Raises:
          FileNotFoundError: no finalised checkpoint (or not `step`) in the directory.
          TreeMismatchError: key paths or shapes differ; the first mismatching key path is named.
        """
        step = self._resolve_step(step)
        self._check_target(step, abstract_state, partial=False)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: _pytree_restore_args(abstract_state, partial=False),
                    DATA_STATE_ITEM: ocp.args.JsonRestore(),
                    METADATA_ITEM: ocp.args.JsonRestore(),
                    CONFIG_ITEM: ocp.args.JsonRestore(),
                }
            ),
        )
        metadata = dict(restored[METADATA_ITEM])
        metadata["config"] = restored[CONFIG_ITEM]
        return RestoredCheckpoint(restored[STATE_ITEM], restored[DATA_STATE_ITEM], metadata)

    def restore_latest_intact(self, abstract_state: PyTree) -> RestoredCheckpoint:
        """``restore`` of the newest step that restores, falling back past damaged ones.

        A step that cannot be read (an empty or partly copied step directory, a truncated array
        chunk) is reported in one line and moved aside to ``<step>.damaged``, never deleted, so that a
        later save of that step number is possible and the bytes stay for inspection; the next older
        step is tried. A restore target that does not match the checkpoint (``TreeMismatchError``) is
        the run's own mistake, not damage, and is raised as it is. Every process of a multi-host job
        must call this; the hosts agree on each step's verdict.

        Raises:
          FileNotFoundError: no step restores (the message lists the damaged ones).
        """
        damaged = []
        for step in reversed(self.all_steps()):
            problem = None
            try:  # every process restores (a collective), then process 0 checks the bytes it read
                restored = self.restore(abstract_state, step)
                if jax.process_index() == 0:
                    problem = step_digests.check(self.directory / str(step))
            except TreeMismatchError:
                raise
            except Exception as error:
                problem, restored = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}", None
            if not multihost.any_process(problem is not None):
                return restored
            logger.warning(
                "checkpoint step %d in %s cannot be restored (%s); moved aside and falling back to the previous step",
                step,
                self.directory,
                problem or "damaged on another host",
            )
            damaged.append(step)
            self._move_aside(step)
        raise FileNotFoundError(f"No intact checkpoint in {self.directory}; damaged steps {damaged} were moved aside.")

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0 and not self._read_only:
            names = (self.directory / f"{step}{DAMAGED_SUFFIX}{n or ''}" for n in itertools.count())
            (self.directory / str(step)).rename(next(name for name in names if not name.exists()))
        multihost.barrier("easyppo-move-aside")
        self._manager.reload()

    def restore_subtree(self, abstract_subtree: PyTree, step: int | None = None) -> PyTree:
        """Restores only the leaves named by `abstract_subtree`, e.g. `{"params": abstract_params}`.

        This is how a policy starts from an SFT checkpoint or a value model from a reward model: the
        stored optimizer state (often twice the size of the parameters) is never read. Keys of
        `abstract_subtree` are matched by name against the stored tree (a dataclass attribute and a
        dict key of the same name match), and the result has `abstract_subtree`'s structure.
        """
        step = self._resolve_step(step)
        self._check_target(step, abstract_subtree, partial=True)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(**{STATE_ITEM: _pytree_restore_args(abstract_subtree, partial=True)}),
        )
        return restored[STATE_ITEM]

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's background threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"No finalised checkpoint in {self.directory}.")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; available steps: {steps}.")
        return step

    def _check_target(self, step: int, abstract: PyTree, *, partial: bool) -> None:
        stored = trees.leaf_shapes(self._manager.metadata(step).item_metadata[STATE_ITEM].tree)
        requested = {}
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
            if getattr(leaf, "sharding", None) is None:
                raise ValueError(
                    f"Restore target leaf {trees.render(trees.key_parts(path))} has no sharding: pass "
                    "jax.ShapeDtypeStruct(shape, dtype, sharding=...) leaves for the new run's mesh."
                )
            requested[trees.key_parts(path)] = tuple(leaf.shape)
        where = f"checkpoint step {step} in {self.directory}"
        missing = [key for key in requested if key not in stored]
        if missing:
            stored_names = ["/".join(key) for key in stored]
            close = difflib.get_close_matches("/".join(missing[0]), stored_names, n=3)
            raise TreeMismatchError(
                f"Restore target key {trees.render(missing[0])} is not in {where}"
                + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
                + (f"; closest stored keys: {', '.join(repr(name) for name in close)}." if close else ".")
            )
        unexpected = [] if partial else [key for key in stored if key not in requested]
        if unexpected:
            raise TreeMismatchError(
                f"{where[0].upper()}{where[1:]} holds key {trees.render(unexpected[0])} that the restore target lacks"
                + (f" ({len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                + ". Use restore_subtree to read only part of a checkpoint."
            )
        for key, shape in requested.items():
            if shape != stored[key]:
                raise TreeMismatchError(
                    f"Restore target key {trees.render(key)} has shape {shape} but {where} stores shape {stored[key]}."
                )


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """One handler per item. The state uses the PyTree handler, which alone supports partial restore."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler = ocp.PyTreeCheckpointHandler()
    registry.add(STATE_ITEM, ocp.args.PyTreeSave, state_handler)
    registry.add(STATE_ITEM, ocp.args.PyTreeRestore, state_handler)
    for item, filename in (
        (DATA_STATE_ITEM, "data_state.json"),
        (METADATA_ITEM, METADATA_FILENAME),
        (CONFIG_ITEM, CONFIG_FILENAME),
    ):
        json_handler = ocp.JsonCheckpointHandler(filename=filename)
        registry.add(item, ocp.args.JsonSave, json_handler)
        registry.add(item, ocp.args.JsonRestore, json_handler)
    return registry


def _pytree_restore_args(abstract: PyTree, *, partial: bool) -> ocp.args.PyTreeRestore:
    return ocp.args.PyTreeRestore(
        item=abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=partial,
    )
