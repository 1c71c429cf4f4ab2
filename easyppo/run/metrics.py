"""Metric sinks for the train loop: a JSONL file always, W&B and TensorBoard when asked, a progress bar.

Why it looks like this:
- JSONL is the record of a run: plain text, one object per `log` call, flushed line by line (a crash
  loses at most the line being written), opened in append mode so a resumed run continues the same
  file. After a crash the steps between the last checkpoint and the crash appear twice; the later
  line (larger `wall_time`) belongs to the resumed run.
- Non-finite numbers are written as the strings "nan", "inf" and "-inf". Strict JSON has no NaN,
  and `null` would hide whether a diverged loss was NaN or infinite. `float(value)` reads both these
  strings and ordinary numbers back. W&B and TensorBoard receive the raw float.
- Only process 0 writes anything. Other processes may call every method with the same arguments; it
  costs them nothing, so the train loop needs no `if jax.process_index() == 0` of its own.
- W&B and TensorBoard are imported only when enabled, and a missing package is reported with the
  config key that enabled it, at start-up rather than at the first log call.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
import tqdm
from etils import epath
from ml_collections import config_dict

from easyppo.core import files

Scalar = bool | int | float | str

_RESERVED_KEYS = ("step", "wall_time")
WANDB_RUN_ID_FILENAME = "wandb_run_id.txt"
RUN_CONFIG_FILENAME = "config.json"
logger = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    """Logging options, with their defaults.

    directory: local directory for metrics.jsonl, samples.jsonl and TensorBoard events. Required.
    metrics_filename / samples_filename: file names inside `directory`.
    remote_sync_every_s: a remote `directory` (gs://...) cannot be appended to; the metrics and
      samples files are uploaded whole this often and when the run ends.
    progress_bar: show a tqdm bar (step, ETA and the metrics named in `progress_bar_metrics`).
    samples_every_steps / samples_to_log: a table of the algorithm's samples (PPO's prompts,
      responses and scores) every N steps (0: never), with this many rows.
    wandb.*: Weights & Biases run options; `run_id` unset means one is made up and kept in
      `directory/wandb_run_id.txt`, so a resumed run continues the same W&B run.
    tensorboard.*: TensorBoard event files (via tensorboardX) in `directory/<subdirectory>`.
    """
    config = ml_collections.ConfigDict()
    config.directory = config_dict.placeholder(str)  # metrics, samples, config.json, TensorBoard events
    config.metrics_filename = "metrics.jsonl"  # one JSON object per logged step, inside `directory`
    config.samples_filename = "samples.jsonl"  # the samples table (RL prompts, responses, scores)
    config.remote_sync_every_s = 30.0  # gs:// logs: seconds between uploads (a kill loses at most this)
    config.progress_bar = True  # a tqdm bar with the step, ETA and `progress_bar_metrics`
    config.progress_bar_metrics = ("loss", "tokens_per_second")  # metrics shown on the progress bar
    config.samples_every_steps = 0  # log a table of samples every N steps (0: never)
    config.samples_to_log = 8  # rows of each samples table
    config.wandb = ml_collections.ConfigDict()
    config.wandb.enabled = False  # log to Weights & Biases (pip install wandb)
    config.wandb.project = "easyppo"  # W&B project
    config.wandb.entity = config_dict.placeholder(str)  # W&B entity (team or user); None: your default
    config.wandb.name = config_dict.placeholder(str)  # W&B run name; None: W&B picks one
    config.wandb.group = config_dict.placeholder(str)  # W&B run group
    config.wandb.run_id = config_dict.placeholder(str)  # None: made up once, kept in directory/wandb_run_id.txt
    config.wandb.mode = ""  # "online", "offline" (write locally, `wandb sync` later); "": $WANDB_MODE, else online
    config.tensorboard = ml_collections.ConfigDict()
    config.tensorboard.enabled = False  # write TensorBoard event files (pip install tensorboardX)
    config.tensorboard.subdirectory = "tensorboard"  # event files go to directory/<this>
    return config


class JsonlWriter:
    """Appends one JSON object per line to a file: a local one gets each line at once, a remote one
    (``gs://...``) at most every ``sync_every_s`` seconds and at ``close()``."""

    def __init__(self, path: str | os.PathLike[str], *, sync_every_s: float = 30.0):
        self._file = files.AppendFile(os.fspath(path), sync_every_s=sync_every_s)

    def write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps({k: _json_value(v) for k, v in record.items()}, allow_nan=False) + "\n")

    def close(self) -> None:
        self._file.close()


class JsonlTable:
    """A table of samples (e.g. PPO prompts, responses and scores) as JSONL: one line per row.

    Each line is `{"step": step, <column>: <value>, ...}`, so `pandas.read_json(path, lines=True)`
    gives back the table of every logged step.
    """

    def __init__(self, path: str | os.PathLike[str], *, sync_every_s: float = 30.0):
        self._writer = JsonlWriter(path, sync_every_s=sync_every_s)

    def write(self, step: int, columns: Mapping[str, Sequence[Any]]) -> None:
        for row in _rows(columns):
            self._writer.write({"step": int(step), **row})

    def close(self) -> None:
        self._writer.close()


class MetricSink(Protocol):
    """Where `MetricLogger` sends each log call. Values are already host scalars."""

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar], wall_time: float) -> None: ...

    def write_samples(self, step: int, columns: Mapping[str, list[Any]]) -> None: ...

    def close(self) -> None: ...


class MetricLogger:
    """Sends metrics of the train loop to every configured sink; only on process 0.

    Args:
      config: options from `default_config()`.
      total_steps: the run's last step, for the progress bar's ETA (None: no ETA).
      start_step: the step the run (re)starts from; the progress bar begins there and TensorBoard
        hides events of a crashed earlier attempt beyond it.
      run_config: the resolved run config, recorded by W&B.
      process_index: this process's index; defaults to `jax.process_index()`.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        *,
        total_steps: int | None = None,
        start_step: int = 0,
        run_config: ml_collections.ConfigDict | Mapping[str, Any] | None = None,
        process_index: int | None = None,
    ):
        self.is_writer = (jax.process_index() if process_index is None else process_index) == 0
        self._sinks: list[MetricSink] = []
        if not self.is_writer:
            return
        if not config.directory:
            raise ValueError("Logging config key 'directory' is not set (e.g. --config.logging.directory=...).")
        try:
            self._sinks.append(
                _JsonlSink(
                    os.path.join(config.directory, config.metrics_filename),
                    os.path.join(config.directory, config.samples_filename),
                    config.remote_sync_every_s,
                )
            )
            if config.wandb.enabled:
                self._sinks.append(_WandbSink(config.wandb, config.directory, run_config))
            if config.tensorboard.enabled:
                self._sinks.append(
                    _TensorBoardSink(os.path.join(config.directory, config.tensorboard.subdirectory), start_step)
                )
            if config.progress_bar:
                self._sinks.append(_ProgressBar(tuple(config.progress_bar_metrics), total_steps, start_step))
            if isinstance(run_config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
                path = epath.Path(config.directory) / RUN_CONFIG_FILENAME
                # Rewritten on resume: the config this attempt runs.
                path.write_text(run_config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
                logger.info("resolved config: %s", path)
        except BaseException:
            self.close()  # release what was opened before the failing sink
            raise

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records scalar metrics (numbers, bools, strings or 0-d host/device arrays) for `step`."""
        if not self.is_writer:
            return
        scalars = _host_scalars(metrics)
        wall_time = time.time()
        for sink in self._sinks:
            sink.write_scalars(int(step), scalars, wall_time)

    def log_samples(self, step: int, columns: Mapping[str, Sequence[Any]]) -> None:
        """Records a table of samples given as equally long columns, e.g. {"prompt": [...], "score": [...]}."""
        if not self.is_writer:
            return
        host_columns = {name: list(jax.device_get(values)) for name, values in columns.items()}
        _check_columns(host_columns)
        for sink in self._sinks:
            sink.write_samples(int(step), host_columns)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
        self._sinks = []

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _JsonlSink:
    def __init__(self, metrics_path: str, samples_path: str, sync_every_s: float):
        self._metrics = JsonlWriter(metrics_path, sync_every_s=sync_every_s)
        self._samples_path, self._sync_every_s = samples_path, sync_every_s
        self._samples: JsonlTable | None = None  # opened on first use: most runs never log samples

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar], wall_time: float) -> None:
        self._metrics.write({"step": step, "wall_time": wall_time, **scalars})

    def write_samples(self, step: int, columns: Mapping[str, list[Any]]) -> None:
        if self._samples is None:
            self._samples = JsonlTable(self._samples_path, sync_every_s=self._sync_every_s)
        self._samples.write(step, columns)

    def close(self) -> None:
        self._metrics.close()
        if self._samples is not None:
            self._samples.close()


class _WandbSink:
    def __init__(
        self,
        config: ml_collections.ConfigDict,
        directory: str,
        run_config: ml_collections.ConfigDict | Mapping[str, Any] | None,
    ):
        self._wandb = _import_optional("wandb", config_key="wandb.enabled", install="wandb")
        if isinstance(run_config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
            run_config = run_config.to_dict()
        self._run = self._wandb.init(
            project=config.project,
            entity=config.entity,
            name=config.name,
            group=config.group,
            mode=config.mode or None,  # None: wandb reads WANDB_MODE (and its other variables) itself
            id=config.run_id or _persistent_run_id(directory),
            resume="allow",
            dir=directory,
            config=dict(run_config or {}),
        )

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar], wall_time: float) -> None:
        self._run.log(dict(scalars), step=step)

    def write_samples(self, step: int, columns: Mapping[str, list[Any]]) -> None:
        names = list(columns)
        table = self._wandb.Table(columns=names, data=[list(row) for row in zip(*columns.values(), strict=True)])
        self._run.log({"samples": table}, step=step)

    def close(self) -> None:
        self._run.finish()


class _TensorBoardSink:
    def __init__(self, logdir: str, start_step: int):
        tensorboardx = _import_optional("tensorboardX", config_key="tensorboard.enabled", install="tensorboardX")
        # purge_step makes TensorBoard drop events a crashed attempt logged after the resumed step.
        self._writer = tensorboardx.SummaryWriter(logdir=logdir, purge_step=start_step + 1 if start_step else None)

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar], wall_time: float) -> None:
        for name, value in scalars.items():
            if not isinstance(value, str):
                self._writer.add_scalar(name, float(value), global_step=step, walltime=wall_time)
        self._writer.flush()

    def write_samples(self, step: int, columns: Mapping[str, list[Any]]) -> None:
        """Samples live in the JSONL table (and W&B); TensorBoard text panels add nothing to that."""

    def close(self) -> None:
        self._writer.close()


class _ProgressBar:
    def __init__(self, metric_names: tuple[str, ...], total_steps: int | None, start_step: int):
        self._metric_names = metric_names
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar], wall_time: float) -> None:
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        shown = [f"{name}={_short(scalars[name])}" for name in self._metric_names if name in scalars]
        self._bar.set_postfix_str(", ".join(shown))  # also refreshes, whatever tqdm's rate limit

    def write_samples(self, step: int, columns: Mapping[str, list[Any]]) -> None:
        """The bar shows progress only."""

    def close(self) -> None:
        self._bar.close()


def _import_optional(module: str, *, config_key: str, install: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"Logging config key '{config_key}' is True but the '{module}' package is not installed: "
            f"`pip install {install}`, or set {config_key}=False."
        ) from error


def _persistent_run_id(directory: str) -> str:
    """The W&B run id kept in `directory`, made up on first use, so a resumed run logs to the same run."""
    path = epath.Path(directory) / WANDB_RUN_ID_FILENAME
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def _host_scalars(metrics: Mapping[str, Any]) -> dict[str, Scalar]:
    """Metric values as Python scalars, in the caller's order; device arrays come over in one transfer."""
    for name in metrics:
        if not isinstance(name, str):
            raise TypeError(f"Metric names must be strings, got {name!r}.")
        if name in _RESERVED_KEYS:
            raise ValueError(f"Metric name {name!r} is reserved for the record itself; rename the metric.")
    host_values = jax.device_get(dict(metrics))
    scalars = {}
    for name in metrics:
        value = host_values[name]
        if isinstance(value, (np.ndarray, np.generic)):
            if value.ndim != 0:
                raise ValueError(f"Metric {name!r} must be a scalar, got an array of shape {value.shape}.")
            value = value.item()
        if not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"Metric {name!r} must be a number, bool or string, got {type(value).__name__}.")
        scalars[name] = value
    return scalars


def _check_columns(columns: Mapping[str, list[Any]]) -> None:
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"Sample columns must have equal lengths, got {lengths}.")


def _rows(columns: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    host_columns = {name: list(values) for name, values in columns.items()}
    _check_columns(host_columns)
    return [dict(zip(host_columns, row, strict=True)) for row in zip(*host_columns.values(), strict=True)]


def _json_value(value: Any) -> Any:
    """A JSON-representable copy of `value`: non-finite floats become "nan"/"inf"/"-inf" strings."""
    if isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def _short(value: Scalar) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
