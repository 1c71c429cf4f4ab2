"""The programs a run executes, built abstractly on a target's devices: no weights, no data.

Gradient algorithms (SFT, reward model, DPO) run one program per step, the trainer's jitted train
step, and DPO with ``reference=precomputed`` runs its reference pass once over the data first. A
program is lowered with the trainer's abstract state (what a resumed run restores into) and the
worst-case batch: every row at full length, so the loss window takes its widest bucket. That batch
is made by the real batcher from synthetic rows, so its keys, shapes and dtypes are exactly what
training feeds.

RL algorithms run several programs per iteration (rollout, judge, assemble, update for PPO and the
group family; rollout, reward model, pairs, update for online DPO). Each is compiled on the abstract
outputs of the one before, with the shardings XLA chose for them, as the real iteration chains them.

Every report carries the program's analytic work (``easyppo.plan.work``) for the roofline time.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import datasets
import jax
import ml_collections
import numpy as np

from easyppo.algorithms import dpo, get_algorithm
from easyppo.algorithms.contract import RunInputs
from easyppo.algorithms.dpo_reference import make_reference_forward
from easyppo.core import sharding
from easyppo.data import pipeline
from easyppo.data.batcher import ExampleBatcher
from easyppo.plan import work
from easyppo.plan.report import ProgramReport, refused_report, report_of
from easyppo.plan.topology import Target
from easyppo.weights import loading


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


def _abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rows: int) -> dict:
    return {
        key: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding.batch_sharding(mesh))
        for key, value in worst_case_batch(config, rows).items()
    }


def _abstract_trainer(config: ml_collections.ConfigDict, target: Target, total_steps: int):
    """(trainer, its options, mesh) of ``config`` on ``target``, reading nothing."""
    algorithm = get_algorithm(config.algorithm)
    options = algorithm.options(config)
    mesh = sharding.make_mesh(config.mesh, devices=target.devices)
    tokenizer = types.SimpleNamespace(pad_id=config.data.pad_id or 0)
    inputs = RunInputs(tokenizer=tokenizer, chat_format=None, train_data=None, abstract=True)
    trainer = algorithm.make_trainer(config, options, mesh, total_steps, inputs=inputs, resuming=True)
    return trainer, options, mesh


class _Chain:
    """Compiles a run's programs in order and collects their reports.

    A program the TPU compiler refuses for lack of memory is reported with what it said it needs;
    the programs after it are reported uncompiled (their inputs are its outputs), with their work,
    so the plan still shows every program and its time.
    """

    def __init__(self) -> None:
        self.reports: list[ProgramReport] = []
        self.refused = ""

    def compile(
        self, name: str, lower: Callable[[], Any], work_done: work.Work | None = None, *, per_iteration: bool = True
    ) -> Any | None:
        """``lower()``'s program compiled (None when refused or skipped), its report appended."""
        if self.refused:
            reason = f"not compiled: it runs on the outputs of {self.refused}, which does not fit"
            self.reports.append(refused_report(name, reason, work_done, per_iteration=per_iteration))
            return None
        try:
            compiled = lower().compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            self.refused = name
            self.reports.append(refused_report(name, e, work_done, per_iteration=per_iteration))
            return None
        self.reports.append(report_of(name, compiled, work_done, per_iteration=per_iteration))
        return compiled


def _outputs(compiled: Any) -> Any:
    """A compiled program's outputs as ShapeDtypeStructs with the shardings XLA chose: the next
    program's abstract inputs."""
    return jax.tree.map(
        lambda info, placed: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=placed),
        compiled.out_info,
        compiled.output_shardings,
    )


# ------------------------------------------------------------------------------ gradient algorithms


def _gradient_step_work(config: ml_collections.ConfigDict, options: Any, mesh: work.MeshShape) -> work.Work:
    model = loading.resolve_architecture(config.model)
    settings = pipeline.example_settings(config.data)
    seq = settings.max_seq_len
    rows, microbatches = config.data.global_batch_size, config.train.grad_accum_steps
    if config.algorithm == "sft":
        return work.training_pass(
            model, mesh, rows=rows, seq_len=seq, head_positions=seq, head="lm", microbatches=microbatches
        )
    response = seq - seq // 2  # the worst-case batch's split (worst_case_batch)
    if config.algorithm == "rm":
        return work.training_pass(
            model, mesh, rows=2 * rows, seq_len=seq, head_positions=1, head="score", microbatches=microbatches
        )
    step = work.training_pass(
        model, mesh, rows=2 * rows, seq_len=seq, head_positions=response, head="lm", microbatches=microbatches
    )
    if options.uses_reference and options.reference == "on_the_fly":
        reference = loading.resolve_architecture(dpo.reference_model_config(config, options))
        step += work.forward_pass(
            reference, mesh, rows=2 * rows, seq_len=seq, head_positions=response, head="lm", microbatches=microbatches
        )
    return step


def gradient_programs(config: ml_collections.ConfigDict, target: Target, total_steps: int = 1) -> list[ProgramReport]:
    """Compiles a gradient algorithm's train step (and DPO's precomputed reference pass) for ``target``."""
    trainer, options, mesh = _abstract_trainer(config, target, total_steps)
    shape = work.mesh_shape(mesh)
    batch = _abstract_batch(config, mesh, config.data.global_batch_size)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    chain = _Chain()
    chain.compile(
        "train_step",
        lambda: trainer.lower_train_step(trainer.abstract_state(), batch, rng),
        _gradient_step_work(config, options, shape),
    )
    reports = chain.reports
    if config.algorithm == "dpo" and options.uses_reference and options.reference == "precomputed":
        reports += _reference_pass(config, options, mesh, shape)  # its own chain: it needs no train step
    return reports


def _reference_pass(
    config: ml_collections.ConfigDict, options: Any, mesh: jax.sharding.Mesh, shape
) -> list[ProgramReport]:
    """DPO's precomputed reference pass over one batch: it runs before training, once per dataset."""
    model_config, module, params = loading.load_model(
        dpo.reference_model_config(config, options), "causal_lm", mesh=mesh, rng=jax.random.key(0), abstract=True
    )
    forward = make_reference_forward(module, model_config, mesh, chunk_size=options.logprob_chunk_size)
    rows = dpo.reference_batch_size(config, options)
    seq = config.data.max_seq_len
    pass_work = work.forward_pass(
        model_config, shape, rows=2 * rows, seq_len=seq, head_positions=seq - seq // 2, head="lm"
    )
    chain = _Chain()
    with jax.set_mesh(mesh):
        chain.compile(
            "reference_pass",
            lambda: forward.lower(params, _abstract_batch(config, mesh, rows)),
            pass_work,
            per_iteration=False,
        )
    return chain.reports


# ------------------------------------------------------------------------------------ RL algorithms


def _rollout_work(
    config: ml_collections.ConfigDict, options: Any, policy, shape: work.MeshShape, *, prompts: int | None = None
) -> work.Work:
    """One rollout of ``prompts`` (default: the whole batch)."""
    rollout_dtype = getattr(options, "rollout_dtype", "") or policy.dtype
    return work.generation(
        policy.replace(dtype=rollout_dtype),
        shape,
        rows=(prompts or config.data.global_batch_size) * options.samples_per_prompt,
        prompt_len=config.data.max_prompt_len,
        new_tokens=options.sampling.max_new_tokens,
    )


def _with_rows(tree: Any, rows: int) -> Any:
    """Abstract arrays like ``tree``'s with ``rows`` rows: a chunk's outputs, concatenated."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((rows, *x.shape[1:]), x.dtype, sharding=x.sharding), tree)


def rl_iteration(config: ml_collections.ConfigDict, target: Target, total_steps: int = 1) -> list[ProgramReport]:
    """Compiles one RL iteration's programs in order (rollout, judge, assemble, update), each on the
    abstract outputs of the one before, and reports them.

    With ``rollout_batch_size`` the rollout and the judge run chunk by chunk (``RLTrainer.sample``):
    each is compiled for one chunk, and its work counts every chunk.
    """
    trainer, options, mesh = _abstract_trainer(config, target, total_steps)
    models, shape = trainer.models, work.mesh_shape(mesh)
    state = trainer.abstract_state()
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    prompts = config.data.global_batch_size
    chunk = options.rollout_batch_size or prompts
    chunks = prompts // chunk
    rows = prompts * options.samples_per_prompt
    prompt, new = config.data.max_prompt_len, options.sampling.max_new_tokens
    sequence = dict(rows=rows, seq_len=prompt + new)
    chunk_sequence = dict(rows=chunk * options.samples_per_prompt, seq_len=prompt + new)
    recompute = options.old_logprobs == "recompute"

    judge_work = work.Work()
    if options.uses_reference or recompute:
        policy_pass = work.forward_pass(models.policy, shape, **chunk_sequence, head_positions=new, head="lm")
        judge_work += policy_pass.times(int(options.uses_reference) + int(recompute))
    if models.value is not None:
        judge_work += work.forward_pass(models.value, shape, **chunk_sequence, head_positions=new, head="score")
    if models.reward is not None:
        judge_work += work.forward_pass(models.reward, shape, **chunk_sequence, head_positions=1, head="score")
    judge_work = judge_work.times(chunks)
    # Every epoch passes over all rows in minibatches (each split into microbatches), one optimizer
    # step per minibatch, for the policy and the critic alike.
    passes = dict(
        **sequence,
        head_positions=new,
        microbatches=options.num_minibatches * config.train.grad_accum_steps,
        optimizer_steps=options.num_minibatches,
    )
    update_work = work.Work()
    for model, head in ((models.policy, "lm"), (models.value, "score")):
        if model is not None:
            update_work += work.training_pass(model, shape, head=head, **passes).times(options.ppo_epochs)

    rewards = jax.ShapeDtypeStruct((rows,), np.float32, sharding=sharding.batch_sharding(mesh))
    scalar = jax.ShapeDtypeStruct((), np.float32, sharding=replicated)
    chain, out = _Chain(), {}
    batch = _abstract_batch(config, mesh, chunk)
    with jax.set_mesh(mesh):
        out["sampled"] = chain.compile(
            "rollout",
            lambda: trainer.rollout.lower(
                trainer.policy_params(state),
                batch,
                rng,
                sampling=trainer.sampling,
                samples_per_prompt=options.samples_per_prompt,
            ),
            _rollout_work(config, options, models.policy, shape, prompts=chunk).times(chunks),
        )
        out["judged"] = chain.compile(
            "judge",
            lambda: trainer.judge.lower(
                trainer.policy_params(state),
                trainer.value_params(state),
                trainer.frozen,
                _outputs(out["sampled"]),
                recompute_policy=recompute,
            ),
            judge_work,
        )
        out["scored"] = chain.compile(
            "assemble",
            lambda: trainer.assemble.lower(
                _with_rows(_outputs(out["judged"]), rows), _with_rows(_outputs(out["sampled"]), rows), rewards, scalar
            ),
        )
        chain.compile(
            "update",
            lambda: trainer.update.lower(
                state, _outputs(out["scored"]).experience, scalar, rng, train_policy=True, bases=trainer.bases
            ),
            update_work,
        )
    return chain.reports


def online_dpo_iteration(
    config: ml_collections.ConfigDict, target: Target, total_steps: int = 1
) -> list[ProgramReport]:
    """Compiles one online-DPO iteration's programs (rollout, the reward model's scores when it has
    one, the pairs with their reference log-probs, the update) and reports them."""
    trainer, options, mesh = _abstract_trainer(config, target, total_steps)
    shape = work.mesh_shape(mesh)
    batch = _abstract_batch(config, mesh, config.data.global_batch_size)
    policy = loading.resolve_architecture(config.model)
    state = trainer.abstract_state()
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    group = options.samples_per_prompt
    prompts = config.data.global_batch_size
    prompt, new = config.data.max_prompt_len, options.sampling.max_new_tokens
    rows_sharding = sharding.batch_sharding(mesh)
    pair_rows = dict(rows=2 * prompts, seq_len=prompt + new, head_positions=new, head="lm")
    index = jax.ShapeDtypeStruct((prompts,), np.int32, sharding=rows_sharding)
    mask = jax.ShapeDtypeStruct((prompts,), np.float32, sharding=rows_sharding)
    pairs_work = work.forward_pass(policy, shape, **pair_rows) if options.uses_reference else work.Work()
    update_work = work.training_pass(policy, shape, **pair_rows, microbatches=config.train.grad_accum_steps)
    chain, out = _Chain(), {}
    with jax.set_mesh(mesh):
        out["sampled"] = chain.compile(
            "rollout",
            lambda: trainer.rollout.lower(
                trainer.policy_params(state), batch, rng, sampling=trainer.sampling, samples_per_prompt=group
            ),
            _rollout_work(config, options, policy, shape),
        )
        if trainer.frozen.get("reward") is not None:
            reward = loading.resolve_architecture(loading.frozen_config(config.online_dpo.reward_model))
            reward_work = work.forward_pass(
                reward, shape, rows=prompts * group, seq_len=prompt + new, head_positions=1, head="score"
            )
            chain.compile(
                "reward_model",
                lambda: trainer.reward_model_scores.lower(trainer.frozen["reward"], _outputs(out["sampled"])),
                reward_work,
            )
        out["pairs"] = chain.compile(
            "pairs",
            lambda: trainer.pairs.lower(trainer.frozen, _outputs(out["sampled"]), index, index, mask),
            pairs_work,
        )
        chain.compile(
            "update", lambda: trainer.update.lower(state, _outputs(out["pairs"]), rng, trainer.base_params), update_work
        )
    return chain.reports
