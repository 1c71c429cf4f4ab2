"""The one train loop for every algorithm (the command line is ``easyppo.cli.train``).

The loop owns everything that is not the algorithm: the mesh, data, initialisation or resumption,
logging, evaluation, checkpoints, preemption and export. An algorithm only supplies its registry
entry and a trainer (``easyppo.algorithms.contract``).

The hot path, per step: the next batch is already on the devices (``pacing.Prefetcher`` reads,
collates and places it in a background thread); the step is dispatched; the previous step's skipped
flag and token count are read (``pacing.StepTracker``), which waits only for that earlier step while
this one runs; metrics are read only on steps that log them, evaluation and checkpoints only when due.

Guarantees:

* **Exact resume.** The train state, the data iterator's position and the step are checkpointed
  together, and the step's RNG is ``fold_in(seed, step)``; a resumed run computes bit for bit what
  the uninterrupted run would have.
* **Preemption.** SIGTERM makes the loop finish the current step, save a checkpoint and return
  normally (exit status 0), so a pod scheduler's preemption costs no work. Several hosts agree on
  stopping every ``train.preemption_sync_every_steps`` steps.
* **Non-finite steps.** A NaN/Inf loss or gradient leaves the state untouched (the step's update is
  discarded on device); it is counted and logged, and ``train.max_consecutive_nonfinite`` of them in
  a row stop the run with ``NonFiniteTrainingError``. A non-finite parameter is never checkpointed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator

import jax
import ml_collections

from easyppo.algorithms import get_algorithm
from easyppo.algorithms.contract import RunInputs
from easyppo.core import multihost, sharding
from easyppo.core.options import OptionError
from easyppo.data import pipeline
from easyppo.data.export import save_tokenizer_files
from easyppo.run import config as run_config
from easyppo.run import export as export_lib
from easyppo.run import metrics as metrics_lib
from easyppo.run import resume
from easyppo.run.lock import RunLock, RunLockedError
from easyppo.run.pacing import NonFiniteTrainingError, PreemptionFlag, Prefetcher, StepTracker
from easyppo.weights import run_directory
from easyppo.weights.run_checkpoint import Checkpointer

logger = logging.getLogger(__name__)


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
    data_stats: dict = dataclasses.field(default_factory=dict)  # rows read, used, bad, truncated, dropped


def evaluate(trainer, state, data: pipeline.PreparedData, config: ml_collections.ConfigDict, mesh) -> dict[str, float]:
    """Held-out metrics: (sum, count) pairs added on the device over every batch, read and divided once."""
    totals = None
    for i, host_batch in enumerate(pipeline.make_iterator(data, _eval_data_config(config))):
        if config.eval.max_batches and i >= config.eval.max_batches:
            break
        pairs = trainer.eval_step(state, sharding.host_local_to_global(host_batch, mesh))
        totals = pairs if totals is None else jax.tree.map(lambda a, b: a + b, totals, pairs)
    sums = jax.device_get(totals) if totals is not None else {}
    means = {name: (float(total) / float(count) if count else float("nan")) for name, (total, count) in sums.items()}
    return trainer.finalize_metrics(means)


def _eval_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(config.data.to_dict())
    cfg.path, cfg.hf_dataset = config.eval.path, config.eval.hf_dataset
    cfg.split = config.eval.split if config.eval.hf_dataset else cfg.split
    cfg.shuffle, cfg.num_epochs, cfg.drop_remainder = False, 1, False
    cfg.global_batch_size = config.eval.batch_size or config.data.global_batch_size
    return cfg


def samples_due(config: ml_collections.ConfigDict, step: int) -> bool:
    """Whether to log a table of the algorithm's samples after ``step`` (``logging.samples_every_steps``)."""
    every = config.logging.samples_every_steps
    return bool(every) and step % every == 0


def _check_tokenizer_fits_model(tokenizer, architecture) -> None:
    if tokenizer.vocab_size > architecture.vocab_size:
        raise run_config.ConfigError(
            "data.tokenizer_path",
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {architecture.vocab_size}",
        )


def train(config: ml_collections.ConfigDict, *, preemption: PreemptionFlag | None = None) -> RunResult:
    """Runs (or resumes) the run that ``config`` describes; see the module docstring.

    SIGTERM and Ctrl-C are handled from here to the end of the export; the output directory is
    locked against a second run for as long.
    """
    config = run_config.resolve_paths(ml_collections.ConfigDict(config.to_dict()))
    plan = run_config.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    preemption = preemption or PreemptionFlag()
    with preemption.installed(), _run_lock(config):
        return _train(config, plan, preemption)


@contextlib.contextmanager
def _run_lock(config: ml_collections.ConfigDict) -> Iterator[None]:
    """The output directory's lock, held by process 0; every host stops if it is taken."""
    lock = RunLock(config.checkpoint.directory) if jax.process_index() == 0 else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except RunLockedError as e:
            error = e
    if multihost.any_process(error is not None):
        raise error or RunLockedError(f"{config.checkpoint.directory} is in use by another run (see process 0)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _model_sources(config: ml_collections.ConfigDict, algorithm) -> list[tuple[str, str]]:
    """``(config key, init_from)`` of every model section: the policy's and the algorithm's own."""
    sources = [("model", config.model.init_from)]
    for name in algorithm.sections:
        section = config[algorithm.name][name]
        if "init_from" in section:
            sources.append((f"{algorithm.name}.{name}", section.init_from))
    return sources


def _check_resume(checkpointer: Checkpointer, config: ml_collections.ConfigDict, tokenizer) -> None:
    """A resumed run's config and tokenizer against the newest checkpoint that records them (``run.resume``)."""
    directory = str(checkpointer.directory)
    for step in reversed(checkpointer.all_steps()):
        try:
            saved_config = run_directory.read_run_config(directory, step)
            metadata = run_directory.read_run_metadata(directory, step)
        except (OSError, ValueError, KeyError):
            continue  # a damaged step: the restore falls back past it too
        resume.check_config(saved_config, config, step=step, directory=directory)
        resume.check_tokenizer(metadata.get("tokenizer_fingerprint"), tokenizer, step=step)
        return


def _train(config: ml_collections.ConfigDict, plan: run_config.RunPlan, preemption: PreemptionFlag) -> RunResult:
    algorithm = plan.algorithm
    export_dir = config.train.export_hf_dir or None
    # Before anything is read: a directory holding something else fails now, not after training.
    exported = export_dir is not None and export_lib.is_complete(export_dir, config.checkpoint.directory)
    mesh = sharding.make_mesh(config.mesh)

    tokenizer, chat_format = pipeline.load_tokenizer_and_format(config.data)
    _check_tokenizer_fits_model(tokenizer, plan.architecture)
    checkpointer = Checkpointer(
        config.checkpoint,
        run_config=config,
        model_kind=algorithm.model_kind,
        tokenizer_fingerprint=tokenizer.fingerprint,
    )
    _check_resume(checkpointer, config, tokenizer)  # before any data is tokenised or weights read
    resume.check_tokenizer_matches_models(tokenizer, _model_sources(config, algorithm))
    latest = checkpointer.latest_step()

    train_data = pipeline.prepare_data(config.data, tokenizer=tokenizer, chat_format=chat_format)
    eval_data = None
    if config.eval.path or config.eval.hf_dataset:
        eval_data = pipeline.prepare_data(_eval_data_config(config), tokenizer=tokenizer, chat_format=chat_format)
    train_iter = pipeline.make_iterator(train_data, config.data)
    total_steps = config.train.num_steps or config.data.num_epochs * train_iter.batches_per_epoch
    logger.info("data: %s; %d steps", train_data.stats, total_steps)
    if exported and latest is not None and latest >= total_steps:
        logger.info("this run is complete: step %d of %d, exported to %s", latest, total_steps, export_dir)
        checkpointer.close()
        return RunResult(
            step=latest,
            total_steps=total_steps,
            status="completed",
            train_metrics={},
            eval_metrics={},
            initial_eval_metrics={},
            checkpoint_dir=str(config.checkpoint.directory),
            export_dir=export_dir,
            nonfinite_steps=0,
        )
    resuming = latest is not None
    inputs = RunInputs(tokenizer=tokenizer, chat_format=chat_format, train_data=train_data, eval_data=eval_data)
    trainer = algorithm.make_trainer(config, plan.options, mesh, total_steps, inputs=inputs, resuming=resuming)
    if resuming:
        restored = checkpointer.restore_latest_intact(trainer.abstract_state())
        state, latest = restored.state, int(restored.metadata["step"])
        train_iter.restore(restored.data_state)
        logger.info("resumed from step %d of %s", latest, checkpointer.directory)
    else:
        state = trainer.init_state()
    step = int(jax.device_get(state.step))  # the one read of the step; the host counts from here
    base_rng = jax.random.key(config.seed)
    tracker = StepTracker(config.train.max_consecutive_nonfinite)

    status, initial_eval = "completed", {}
    last_saved, train_metrics, eval_metrics = latest, {}, {}
    data_state, window_start = train_iter.state(), time.perf_counter()

    def save(force: bool) -> None:
        nonlocal last_saved
        if last_saved == step or not (force or checkpointer.should_save(step)):
            return
        tracker.settle()  # a streak that must stop the run stops it before anything is written
        if checkpointer.save(step, state, data_state, force=True):
            last_saved = step

    batches = Prefetcher(
        train_iter, lambda batch: sharding.host_local_to_global(batch, mesh), config.train.prefetch_batches
    )
    with (
        metrics_lib.MetricLogger(config.logging, total_steps=total_steps, start_step=step, run_config=config) as log,
        batches,
    ):
        stats = train_data.stats
        log.log(
            step,
            {
                f"data/{key}": getattr(stats, key)
                for key in ("rows_read", "rows_used", "rows_bad", "rows_truncated", "rows_dropped")
            },
        )
        if eval_data is not None and config.eval.at_start and step == 0:
            initial_eval = evaluate(trainer, state, eval_data, config, mesh)
            log.log(step, {f"eval/{k}": v for k, v in initial_eval.items()})
        try:
            while step < total_steps:
                batch, data_state = next(batches)
                result = trainer.train_step(state, batch, jax.random.fold_in(base_rng, step), step=step)
                state, step = result.state, step + 1
                tracker.push(step, result.skipped, result.num_tokens)
                if step % config.train.log_every_steps == 0 or step == total_steps:
                    tracker.settle()
                    train_metrics = trainer.finalize_metrics(
                        {k: float(v) for k, v in jax.device_get(result.metrics).items()}
                    )
                    elapsed, window_start = time.perf_counter() - window_start, time.perf_counter()
                    row = {
                        **train_metrics,
                        "tokens_per_second": tracker.take_tokens() / max(elapsed, 1e-9),
                        "epoch": data_state.get("epoch", 0),
                        "nonfinite_steps": tracker.nonfinite_steps,
                    }
                    log.log(step, row)
                if result.samples is not None and samples_due(config, step):
                    log.log_samples(step, result.samples.columns(tokenizer, config.logging.samples_to_log))
                eval_due = config.eval.every_steps and step % config.eval.every_steps == 0
                if eval_data is not None and (eval_due or step == total_steps):
                    eval_metrics = evaluate(trainer, state, eval_data, config, mesh)
                    log.log(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
                save(force=False)
                preempted = preemption.agreed(step, every=config.train.preemption_sync_every_steps)
                if preempted or step == config.train.stop_at_step:
                    status = "preempted" if preempted else "stopped"
                    break
            tracker.settle()
        except NonFiniteTrainingError as e:
            log.log(step, {"nonfinite_steps": tracker.nonfinite_steps})
            raise NonFiniteTrainingError(f"{e}, last checkpoint: step {last_saved}") from None
        save(force=True)
        checkpointer.wait_until_finished()

    if status == "completed" and export_dir is not None:
        export_lib.export_run(
            lambda directory: trainer.export(state, directory),
            export_dir,
            finish=lambda directory: save_tokenizer_files(
                config.data.tokenizer_path, tokenizer, directory, chat_format
            ),
            checkpoint_directory=str(config.checkpoint.directory),
            step=step,
            tokenizer_fingerprint=tokenizer.fingerprint,
        )
    checkpointer.close()
    return RunResult(
        step=step,
        total_steps=total_steps,
        status=status,
        train_metrics=train_metrics,
        eval_metrics=eval_metrics,
        initial_eval_metrics=initial_eval,
        checkpoint_dir=str(config.checkpoint.directory),
        export_dir=export_dir if status == "completed" else None,
        nonfinite_steps=tracker.nonfinite_steps,
        data_stats=train_data.stats.as_dict(),
    )


def trainer_for(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    total_steps: int,
    *,
    train_data: pipeline.PreparedData | None = None,
    eval_data: pipeline.PreparedData | None = None,
    resuming: bool = False,
):
    """The trainer ``train`` would build for ``config``, outside the loop (tests, benchmarks, notebooks).

    Validates the algorithm's options and loads the run's tokenizer and chat format as ``train`` does.
    """
    algorithm = get_algorithm(config.algorithm)
    try:
        options = algorithm.options(config)
    except OptionError as e:
        raise run_config.ConfigError(e.key, e.message) from None
    tokenizer, chat_format = pipeline.load_tokenizer_and_format(config.data)
    inputs = RunInputs(tokenizer=tokenizer, chat_format=chat_format, train_data=train_data, eval_data=eval_data)
    return algorithm.make_trainer(config, options, mesh, total_steps, inputs=inputs, resuming=resuming)
