"""The one train loop for every algorithm (the command line is ``easyppo.cli.train``).

The loop owns everything that is not the algorithm: the mesh, data, initialisation or resumption,
logging, evaluation, checkpoints, preemption and export. An algorithm only supplies a
:class:`~easyppo.algorithms.base.Trainer` (see ``easyppo.algorithms``).

Guarantees:

* **Exact resume.** The train state, the data iterator's position and the step are checkpointed
  together, and the step's RNG is ``fold_in(seed, step)``; a resumed run computes bit for bit what
  the uninterrupted run would have.
* **Preemption.** SIGTERM makes the loop finish the current step, save a checkpoint and return
  normally (exit status 0), so a pod scheduler's preemption costs no work.
* **Non-finite steps.** A NaN/Inf loss or gradient leaves the state untouched (the step's update is
  discarded on device); it is counted and logged, and ``train.max_consecutive_nonfinite`` of them in
  a row stop the run with ``NonFiniteTrainingError``. A non-finite parameter is never checkpointed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from easyppo.algorithms import get_algorithm
from easyppo.core import multihost, optim, sharding
from easyppo.data import pipeline
from easyppo.data.export import save_tokenizer_files
from easyppo.run import config as run_config
from easyppo.run import metrics as metrics_lib
from easyppo.weights.run_checkpoint import Checkpointer

logger = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class RunResult:
    """What a call to :func:`train` did: where it stopped, why, and the last metrics."""

    step: int
    total_steps: int
    status: str  # "completed" | "preempted" | "stopped" (train.stop_at_step)
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    initial_eval_metrics: dict[str, float]  # with eval.at_start on a fresh run
    checkpoint_dir: str
    export_dir: str | None
    nonfinite_steps: int


class _PreemptionFlag:
    """Set by SIGTERM (when the loop runs in the main thread) or by ``request()``."""

    def __init__(self):
        self._event = threading.Event()

    def request(self, *_: Any) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    @contextlib.contextmanager
    def installed(self) -> Iterator[_PreemptionFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self.request)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


def _count_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Real (non-pad) tokens in a host batch, whatever its kind."""
    return int(sum(np.sum(v) for k, v in batch.items() if k.endswith("attention_mask")))


def evaluate(trainer, state, data: pipeline.PreparedData, config: ml_collections.ConfigDict, mesh) -> dict[str, float]:
    """Held-out metrics: (sum, count) pairs added over every batch, divided once at the end."""
    eval_data_cfg = _eval_data_config(config)
    sums: dict[str, list[float]] = {}
    for i, host_batch in enumerate(pipeline.make_iterator(data, eval_data_cfg)):
        if config.eval.max_batches and i >= config.eval.max_batches:
            break
        pairs = jax.device_get(trainer.eval_step(state, sharding.host_local_to_global(host_batch, mesh)))
        for name, (total, count) in pairs.items():
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(total)
            acc[1] += float(count)
    means = {name: (total / count if count else float("nan")) for name, (total, count) in sums.items()}
    return trainer.finalize_metrics(means)


def _eval_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(config.data.to_dict())
    cfg.path, cfg.hf_dataset = config.eval.path, config.eval.hf_dataset
    cfg.split = config.eval.split if config.eval.hf_dataset else cfg.split
    cfg.shuffle, cfg.num_epochs, cfg.drop_remainder = False, 1, False
    cfg.global_batch_size = config.eval.batch_size or config.data.global_batch_size
    return cfg


def samples_due(config: ml_collections.ConfigDict, step: int) -> bool:
    """Whether to log a table of the algorithm's samples after ``step`` (``<algorithm>.samples_every_steps``)."""
    every = config[config.algorithm].get("samples_every_steps", 0)
    return bool(every) and step % every == 0


def _check_tokenizer_fits_model(tokenizer, config: ml_collections.ConfigDict) -> None:
    from easyppo.run import config as run_config
    from easyppo.weights.loading import resolve_architecture

    vocab = resolve_architecture(config.model).vocab_size
    if tokenizer.vocab_size > vocab:
        raise run_config.ConfigError(
            "data.tokenizer_path",
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab}",
        )


def train(config: ml_collections.ConfigDict, *, preemption: _PreemptionFlag | None = None) -> RunResult:
    """Runs (or resumes) the run that ``config`` describes; see the module docstring."""
    config = run_config.resolve_paths(ml_collections.ConfigDict(config.to_dict()))
    run_config.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    algorithm = get_algorithm(config.algorithm)
    mesh = sharding.make_mesh(config.mesh)

    tokenizer, chat_format = pipeline.load_tokenizer_and_format(config.data)
    _check_tokenizer_fits_model(tokenizer, config)
    train_data = pipeline.prepare_data(config.data, tokenizer=tokenizer, chat_format=chat_format)
    eval_data = None
    if config.eval.path or config.eval.hf_dataset:
        eval_data = pipeline.prepare_data(_eval_data_config(config), tokenizer=tokenizer, chat_format=chat_format)
    train_iter = pipeline.make_iterator(train_data, config.data)
    total_steps = config.train.num_steps or config.data.num_epochs * train_iter.batches_per_epoch
    logger.info("data: %s; %d steps", train_data.stats, total_steps)

    checkpointer = Checkpointer(config.checkpoint, run_config=config)
    resuming = checkpointer.latest_step() is not None
    trainer = algorithm.make_trainer(
        config, mesh, total_steps, train_data=train_data, eval_data=eval_data, resuming=resuming
    )
    if resuming:
        restored = checkpointer.restore(trainer.abstract_state())
        state = restored.state
        train_iter.restore(restored.data_state)
        logger.info("resumed from step %d of %s", checkpointer.latest_step(), checkpointer.directory)
    else:
        state = trainer.init_state()
    step = int(jax.device_get(state.step))
    schedule = optim.make_schedule(config.optim, total_steps)
    base_rng = jax.random.key(config.seed)
    preemption = preemption or _PreemptionFlag()

    status, streak, nonfinite_steps, initial_eval = "completed", 0, 0, {}
    last_saved, train_metrics, eval_metrics = checkpointer.latest_step(), {}, {}
    window_tokens, window_start = 0, time.perf_counter()

    def save(force: bool) -> None:
        nonlocal last_saved
        if last_saved != step and checkpointer.save(step, state, train_iter.state(), force=force):
            last_saved = step

    with (
        metrics_lib.MetricLogger(
            config.logging, total_steps=total_steps, start_step=step, run_config=config
        ) as metrics_log,
        preemption.installed(),
    ):
        if eval_data is not None and config.eval.at_start and step == 0:
            initial_eval = evaluate(trainer, state, eval_data, config, mesh)
            metrics_log.log(step, {f"eval/{k}": v for k, v in initial_eval.items()})
        while step < total_steps:
            host_batch = next(train_iter)
            batch = sharding.host_local_to_global(host_batch, mesh)
            state, metrics = trainer.train_step(state, batch, jax.random.fold_in(base_rng, step))
            step += 1
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            # A trainer that makes tokens of its own (PPO's rollouts) counts them; else the batch's.
            window_tokens += metrics.pop("num_tokens", None) or _count_tokens(host_batch) * jax.process_count()
            if metrics["skipped"]:
                streak, nonfinite_steps = streak + 1, nonfinite_steps + 1
                logger.warning("step %d: non-finite loss or gradient; update skipped", step)
                if streak >= config.train.max_consecutive_nonfinite:
                    metrics_log.log(step, {"nonfinite_steps": nonfinite_steps})
                    raise NonFiniteTrainingError(
                        f"{streak} consecutive steps (up to step {step}) had a non-finite loss or gradient "
                        f"(train.max_consecutive_nonfinite={config.train.max_consecutive_nonfinite}); "
                        f"parameters are those of step {step - streak}, last checkpoint: step {last_saved}"
                    )
            else:
                streak = 0
            if step % config.train.log_every_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                train_metrics = trainer.finalize_metrics(metrics)
                metrics_log.log(
                    step,
                    {
                        "learning_rate": float(schedule(step - 1)),  # unless the trainer reports its own
                        **train_metrics,
                        "tokens_per_second": window_tokens / max(elapsed, 1e-9),
                        "epoch": train_iter.state().get("epoch", 0),
                        "nonfinite_steps": nonfinite_steps,
                    },
                )
                window_tokens, window_start = 0, time.perf_counter()
            if samples_due(config, step) and hasattr(trainer, "rollout_samples"):
                metrics_log.log_samples(step, trainer.rollout_samples(tokenizer))
            eval_due = config.eval.every_steps and step % config.eval.every_steps == 0
            if eval_data is not None and (eval_due or step == total_steps):
                eval_metrics = evaluate(trainer, state, eval_data, config, mesh)
                metrics_log.log(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
            save(force=False)
            # Every host must stop at the same step, even if SIGTERM reached only some of them.
            preempted = multihost.any_process(preemption.requested)
            if preempted or step == config.train.stop_at_step:
                status = "preempted" if preempted else "stopped"
                break
        save(force=True)
        checkpointer.wait_until_finished()

    export_dir = None
    if status == "completed" and config.train.export_hf_dir:
        export_dir = config.train.export_hf_dir
        for directory in trainer.export(state, export_dir):
            save_tokenizer_files(config.data.tokenizer_path, tokenizer, directory)
    checkpointer.close()
    return RunResult(
        step=step,
        total_steps=total_steps,
        status=status,
        train_metrics=train_metrics,
        eval_metrics=eval_metrics,
        initial_eval_metrics=initial_eval,
        checkpoint_dir=str(config.checkpoint.directory),
        export_dir=export_dir,
        nonfinite_steps=nonfinite_steps,
    )
