"""The run configuration: one ConfigDict assembled from every component's own defaults.

Each component owns its defaults (``easyppo.weights.loading.default_config``,
``easyppo.data.pipeline.default_config``, ``easyppo.core.optim.default_config`` ...); this module only
puts them side by side and adds the loop's own options. Config files in ``configs/`` start from
``base_config(algorithm)`` and change values; the command line changes them again
(``--config.optim.learning_rate=1e-6``). Nothing here reads flags.

``validate`` is the one validation pass of a run: every check that needs no weights and no data
(the algorithm's options, the mesh, batch splits, lengths against the model's architecture), so a
typo or an impossible mesh fails in a second, naming the key, before anything is read, tokenised,
loaded or compiled. It returns the ``RunPlan`` the loop goes on with.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any

import ml_collections
from ml_collections import config_dict

from easyppo.algorithms import get_algorithm
from easyppo.algorithms.contract import Algorithm
from easyppo.core import optim, paths, sharding
from easyppo.core.options import OptionError
from easyppo.data import pipeline
from easyppo.data.errors import DataConfigError
from easyppo.run import metrics as metrics_lib
from easyppo.weights import loading, run_checkpoint


class ConfigError(OptionError):
    """A config value is invalid; the message names the key as ``config.<key>: ...``."""

    def __init__(self, key: str, message: str):
        super().__init__(key, message)
        self.args = (f"config.{key}: {message}",)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What validation established, so nothing is resolved twice: the algorithm's registry entry,
    its validated options and the trained model's architecture."""

    algorithm: Algorithm
    options: Any
    architecture: Any  # easyppo.models.llama.LlamaConfig


def train_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_steps = 0  # 0: data.num_epochs epochs.
    c.grad_accum_steps = 1  # Microbatches per step (the global batch is split, not multiplied).
    c.log_every_steps = 10  # write metrics (and fetch them from the device) every N steps
    c.max_consecutive_nonfinite = 5  # Skipped (NaN/Inf) steps in a row before the run stops.
    c.preemption_sync_every_steps = 10  # Multi-host: hosts agree on a SIGTERM every N steps (one collective).
    c.prefetch_batches = 2  # Host batches prepared (and placed on the devices) ahead of the step.
    c.resume_with_changes = ""  # Keys (comma-separated; "a." for a section, "*" for any) that may differ on resume.
    c.export_hf_dir = ""  # Write the final model here as a Hugging Face directory.
    c.stop_at_step = 0  # >0: save and stop at this step (split a run into bounded jobs); resume later.
    return c


def eval_defaults() -> ml_collections.ConfigDict:
    """A held-out split read with the training data's format, tokenizer and lengths."""
    c = ml_collections.ConfigDict()
    c.path = ""  # Files of held-out rows; "" with hf_dataset "" means no evaluation.
    c.hf_dataset = ""
    c.split = "test"  # For hf_dataset.
    c.every_steps = 0  # 0: only at the end of the run.
    c.at_start = False  # Also evaluate before the first step (a baseline to compare against).
    c.batch_size = config_dict.placeholder(int)  # None: data.global_batch_size.
    c.max_batches = 0  # 0: the whole split.
    return c


def base_config(algorithm: str) -> ml_collections.ConfigDict:
    """Every option of a run of ``algorithm`` with its default."""
    entry = get_algorithm(algorithm)
    c = ml_collections.ConfigDict()
    c.algorithm = algorithm  # sft, rm, dpo, ppo, grpo or online_dpo; decides the sections below
    c.seed = 0  # initialisation, dropout-free sampling and data order all derive from it
    c.output_dir = ""  # Checkpoints, metrics and exports go below it unless set individually.
    c.model = loading.default_config()
    c.mesh = sharding.default_config()
    c.data = pipeline.default_config()
    c.data.kind = entry.data_kind
    c.eval = eval_defaults()
    c.optim = optim.default_config()
    c.train = train_defaults()
    c.checkpoint = run_checkpoint.default_config()
    c.logging = metrics_lib.default_config()
    c[entry.name] = entry.default_config()
    if entry.progress_bar_metrics is not None:
        c.logging.progress_bar_metrics = entry.progress_bar_metrics
    return c


def resolve_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fills checkpoint and logging directories from ``output_dir`` where they are unset."""
    if not config.output_dir and not (config.checkpoint.directory and config.logging.directory):
        raise ConfigError("output_dir", "set output_dir (or both checkpoint.directory and logging.directory)")
    with config.unlocked():
        if not config.checkpoint.directory:
            config.checkpoint.directory = os.path.join(config.output_dir, "checkpoints")
        if not config.logging.directory:
            config.logging.directory = os.path.join(config.output_dir, "logs")
        # Orbax needs absolute paths, and a run should not change meaning with the working directory.
        config.checkpoint.directory = paths.resolve(config.checkpoint.directory)
        config.logging.directory = paths.resolve(config.logging.directory)
        config.train.export_hf_dir = paths.resolve(config.train.export_hf_dir)
    return config


def validate(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int = 1) -> RunPlan:
    """The run's one validation pass (module doc); raises ConfigError naming the key."""
    try:
        algorithm = get_algorithm(config.algorithm)
    except ValueError as e:
        raise ConfigError("algorithm", str(e)) from None
    try:
        options = algorithm.options(config)
        if algorithm.check_run is not None:
            algorithm.check_run(config, options)
        _check_run(config, algorithm, options, num_devices=num_devices, process_count=process_count)
        optim.check_config(config.optim)
        run_checkpoint.check_config(config.checkpoint)
        architecture = loading.resolve_architecture(config.model)
    except ConfigError:
        raise
    except OptionError as e:
        raise ConfigError(e.key, e.message) from None
    try:
        pipeline.check_policy(config.data)
    except DataConfigError as e:
        raise ConfigError(f"data.{e.key}", e.detail) from None
    _check_lengths(config, architecture)
    return RunPlan(algorithm=algorithm, options=options, architecture=architecture)


def _check_run(config, algorithm: Algorithm, options, *, num_devices: int, process_count: int) -> None:
    local_caches = {"data.cache_dir": config.data.cache_dir}
    if hasattr(options, "reference_cache_dir"):
        local_caches[f"{config.algorithm}.reference_cache_dir"] = options.reference_cache_dir
    for key, value in local_caches.items():
        if value and paths.is_remote(value):
            raise ConfigError(key, f"{value!r} must be a local directory: it caches this host's own data")
    if config.data.kind != algorithm.data_kind:
        raise ConfigError(
            "data.kind", f"{config.algorithm} trains on {algorithm.data_kind!r} rows, not {config.data.kind!r}"
        )
    try:
        mesh_shape = dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(config.mesh, num_devices)))
    except ValueError as e:
        raise ConfigError("mesh", str(e)) from e
    batch_ways = mesh_shape["data"] * mesh_shape["fsdp"]
    batch, accum = config.data.global_batch_size, config.train.grad_accum_steps
    if accum < 1:
        raise ConfigError("train.grad_accum_steps", f"must be >= 1, got {accum}")
    if batch % batch_ways:
        raise ConfigError("data.global_batch_size", f"{batch} is not divisible by mesh.data * mesh.fsdp = {batch_ways}")
    update_rows = algorithm.update_rows(config, options)
    if update_rows % (accum * batch_ways):
        raise ConfigError(
            "data.global_batch_size",
            f"each optimizer step's {update_rows} rows must split into train.grad_accum_steps={accum} "
            f"microbatches, each divisible by mesh.data * mesh.fsdp = {batch_ways}",
        )
    if batch % process_count:
        raise ConfigError("data.global_batch_size", f"{batch} is not divisible by the {process_count} processes")
    eval_batch = config.eval.batch_size or batch
    if eval_batch % batch_ways or eval_batch % process_count:
        raise ConfigError("eval.batch_size", f"{eval_batch} must be divisible by mesh.data * mesh.fsdp = {batch_ways}")
    reference_rows = getattr(options, "reference_batch_size", None)  # DPO's precomputed reference pass
    if reference_rows and (reference_rows % batch_ways or reference_rows % process_count):
        raise ConfigError(
            f"{config.algorithm}.reference_batch_size",
            f"{reference_rows} must be divisible by mesh.data * mesh.fsdp = {batch_ways}",
        )
    if config.train.num_steps < 0:
        raise ConfigError("train.num_steps", f"must be >= 0, got {config.train.num_steps}")
    if not config.train.num_steps and not config.data.num_epochs:
        raise ConfigError("train.num_steps", "set train.num_steps or data.num_epochs so the run has an end")
    for key in ("max_consecutive_nonfinite", "preemption_sync_every_steps", "log_every_steps"):
        if config.train[key] < 1:
            raise ConfigError(f"train.{key}", f"must be >= 1, got {config.train[key]}")
    if config.train.prefetch_batches < 0:
        raise ConfigError("train.prefetch_batches", f"must be >= 0, got {config.train.prefetch_batches}")
    for key in ("samples_every_steps", "samples_to_log"):
        if config.logging[key] < 0:
            raise ConfigError(f"logging.{key}", f"must be >= 0, got {config.logging[key]}")


def _check_lengths(config: ml_collections.ConfigDict, architecture) -> None:
    # Prompt rows have no max_seq_len (PPO checks prompt + generated length against the model).
    if config.data.kind != "prompt" and config.data.max_seq_len > architecture.max_position_embeddings:
        raise ConfigError(
            "data.max_seq_len",
            f"{config.data.max_seq_len} exceeds the model's max_position_embeddings={architecture.max_position_embeddings}",
        )
    prompt_len = config.data.max_prompt_len
    if prompt_len is not None and config.data.kind != "prompt" and prompt_len >= config.data.max_seq_len:
        raise ConfigError(
            "data.max_prompt_len",
            f"{prompt_len} leaves no room for a response in max_seq_len={config.data.max_seq_len}",
        )


def check_override_keys(config: ml_collections.ConfigDict, dotted_keys: list[str]) -> None:
    """Fails on an unknown ``a.b.c`` key with the closest existing key as a suggestion."""
    flat = set(_flatten_keys(config))
    for key in dotted_keys:
        if key not in flat:
            close = difflib.get_close_matches(key, sorted(flat), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(key, f"unknown key{hint}")


def _flatten_keys(config: ml_collections.ConfigDict, prefix: str = ""):
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        yield dotted
        if isinstance(value, ml_collections.ConfigDict):
            yield from _flatten_keys(value, dotted + ".")
