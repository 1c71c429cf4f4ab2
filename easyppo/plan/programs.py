"""The programs a run executes, built abstractly on a target's devices: no weights, no data.

Gradient algorithms (SFT, reward model, DPO with the reference on the fly) run one program per step,
the trainer's jitted train step. It is lowered with the trainer's abstract state (what a resumed run
restores into) and the worst-case batch: every row at full length, so the loss window takes its
widest bucket. That batch is made by the real batcher from synthetic rows, so its keys, shapes and
dtypes are exactly what training feeds.
"""

from __future__ import annotations

import types
from typing import Any

import datasets
import jax
import ml_collections
import numpy as np

from easyppo.algorithms import get_algorithm
from easyppo.algorithms.contract import RunInputs
from easyppo.core import sharding
from easyppo.data import pipeline
from easyppo.data.batcher import ExampleBatcher
from easyppo.plan.report import ProgramReport, report_of
from easyppo.plan.topology import Target


def worst_case_batch(config: ml_collections.ConfigDict, rows: int) -> dict[str, np.ndarray]:
    """A batch of ``rows`` full-length rows of the run's data kind, collated by the real batcher."""
    settings = pipeline.example_settings(config.data)
    width = settings.max_seq_len
    if settings.kind == "sft":
        columns = {"input_ids": [[5] * width] * rows, "loss_mask": [[1] * width] * rows}
    elif settings.kind == "preference":
        prompt = width // 2
        columns = {
            "prompt_ids": [[5] * prompt] * rows,
            "chosen_ids": [[6] * (width - prompt)] * rows,
            "rejected_ids": [[7] * (width - prompt)] * rows,
            "margin": [0.0] * rows,
        }
    else:
        columns = {"prompt_ids": [[5] * settings.max_prompt_len] * rows, "answer": ["0"] * rows}
    batcher = ExampleBatcher(
        datasets.Dataset.from_dict(columns),
        settings,
        pad_id=config.data.pad_id or 0,
        loss_window_buckets=config.data.loss_window_buckets,
    )
    return batcher(np.arange(rows), np.ones(rows, np.int32))


def _abstract_trainer(config: ml_collections.ConfigDict, target: Target, total_steps: int):
    """(trainer, mesh, abstract worst-case batch) of ``config`` on ``target``, reading nothing."""
    algorithm = get_algorithm(config.algorithm)
    options = algorithm.options(config)
    mesh = sharding.make_mesh(config.mesh, devices=target.devices)
    tokenizer = types.SimpleNamespace(pad_id=config.data.pad_id or 0)
    inputs = RunInputs(tokenizer=tokenizer, chat_format=None, train_data=None, abstract=True)
    trainer = algorithm.make_trainer(config, options, mesh, total_steps, inputs=inputs, resuming=True)
    batch = worst_case_batch(config, config.data.global_batch_size)
    abstract_batch = {
        key: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding.batch_sharding(mesh))
        for key, value in batch.items()
    }
    return trainer, mesh, abstract_batch


def gradient_train_step(config: ml_collections.ConfigDict, target: Target, total_steps: int = 1) -> ProgramReport:
    """Compiles a gradient algorithm's train step for ``target`` and reports it (module doc)."""
    trainer, _, abstract_batch = _abstract_trainer(config, target, total_steps)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    lowered = trainer.lower_train_step(trainer.abstract_state(), abstract_batch, rng)
    return report_of("train_step", lowered.compile())


def describe(report: ProgramReport, target: Target) -> dict[str, Any]:
    return report.as_dict(target.chip)


def _outputs(compiled: Any) -> Any:
    """A compiled program's outputs as ShapeDtypeStructs with the shardings XLA chose: the next
    program's abstract inputs."""
    shapes = compiled.out_info
    return jax.tree.map(
        lambda info, placed: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=placed),
        shapes,
        compiled.output_shardings,
    )


def rl_iteration(config: ml_collections.ConfigDict, target: Target, total_steps: int = 1) -> list[ProgramReport]:
    """Compiles one RL iteration's programs in order (rollout, judge, assemble, update), each on the
    abstract outputs of the one before, and reports them."""
    trainer, mesh, batch = _abstract_trainer(config, target, total_steps)
    options = trainer.options
    state = trainer.abstract_state()
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    reports = []
    with jax.set_mesh(mesh):
        compiled = trainer.rollout.lower(
            state.params, batch, rng, sampling=trainer.sampling, samples_per_prompt=options.samples_per_prompt
        ).compile()
        reports.append(report_of("rollout", compiled))
        sampled = _outputs(compiled)
        compiled = trainer.judge.lower(
            state.params, state.value_params, trainer.frozen, sampled, recompute_policy=True
        ).compile()
        reports.append(report_of("judge", compiled))
        judged = _outputs(compiled)
        rows = sampled.row_mask.shape[0]
        rewards = jax.ShapeDtypeStruct((rows,), np.float32, sharding=sharding.batch_sharding(mesh))
        kl_coef = jax.ShapeDtypeStruct((), np.float32, sharding=replicated)
        compiled = trainer.assemble.lower(judged, sampled, rewards, kl_coef).compile()
        reports.append(report_of("assemble", compiled))
        scored = _outputs(compiled)
        kl = jax.ShapeDtypeStruct((), np.float32, sharding=replicated)
        compiled = trainer.update.lower(state, scored.experience, kl, rng, train_policy=True).compile()
        reports.append(report_of("update", compiled))
    return reports


def online_dpo_iteration(
    config: ml_collections.ConfigDict, target: Target, total_steps: int = 1
) -> list[ProgramReport]:
    """Compiles one online-DPO iteration's programs (rollout, the reward model's scores when it has
    one, the pairs with their reference log-probs, the update) and reports them."""
    trainer, mesh, batch = _abstract_trainer(config, target, total_steps)
    state = trainer.abstract_state()
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    group = trainer.options.samples_per_prompt
    rows_sharding = sharding.batch_sharding(mesh)
    reports = []
    with jax.set_mesh(mesh):
        compiled = trainer.rollout.lower(
            state.params, batch, rng, sampling=trainer.sampling, samples_per_prompt=group
        ).compile()
        reports.append(report_of("rollout", compiled))
        sampled = _outputs(compiled)
        if trainer.frozen.get("reward") is not None:
            compiled = trainer._reward_model_scores.lower(trainer.frozen["reward"], sampled).compile()
            reports.append(report_of("reward_model", compiled))
        prompts = sampled.row_mask.shape[0] // group
        index = jax.ShapeDtypeStruct((prompts,), np.int32, sharding=rows_sharding)
        mask = jax.ShapeDtypeStruct((prompts,), np.float32, sharding=rows_sharding)
        compiled = trainer._pairs.lower(trainer.frozen, sampled, index, index, mask).compile()
        reports.append(report_of("pairs", compiled))
        pairs = _outputs(compiled)
        compiled = trainer.update.lower(state, pairs, rng).compile()
        reports.append(report_of("update", compiled))
    return reports
