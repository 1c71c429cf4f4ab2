"""What an algorithm hands the train loop, and the shared machinery of gradient-based algorithms.

The loop (``easyppo.run.loop``) knows nothing about SFT, reward models, DPO or PPO. It asks the
algorithm's ``make_trainer`` for a :class:`Trainer` and then only ever calls:

* ``init_state()`` / ``abstract_state()`` - the checkpointed state, born sharded / as a restore target
  (a trainer made with ``resuming=True`` has not read its initial weights and offers only the latter);
* ``train_step(state, batch, rng) -> (state, metrics)`` - one optimisation step (jitted, donating);
* ``eval_step(state, batch) -> {name: (sum, count)}`` - held-out metrics that add up across batches;
* ``export(state, directory)`` - Hugging Face directories of the trained models (returns them).

SFT, the reward model and DPO are all "minimise a loss over one parameter tree", so they share
:class:`GradientTrainer` and differ only in their loss function; PPO brings its own trainer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from easyppo.core import grad_accum, optim, sharding
from easyppo.models import llama, partitioning
from easyppo.weights import huggingface
from easyppo.weights.loading import load_model

PyTree = Any
MetricPairs = dict[str, tuple[jax.Array, jax.Array]]
# loss_fn(params, frozen, batch, rng) -> (loss_sum, {name: (sum, count)}); see easyppo.core.grad_accum.
LossFn = Callable[[PyTree, PyTree, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, MetricPairs]]


@flax.struct.dataclass
class TrainState:
    """Everything a gradient algorithm checkpoints: the step, the parameters and the optimizer state.

    Frozen models (a DPO reference) are not part of it: they are reloaded from their source, never
    written again with every checkpoint.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree


class Trainer(Protocol):
    """The interface between one algorithm and the one train loop."""

    name: str
    data_kind: str

    def init_state(self) -> PyTree: ...

    def abstract_state(self) -> PyTree: ...

    def train_step(self, state: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array) -> tuple[PyTree, dict]: ...

    def eval_step(self, state: PyTree, batch: Mapping[str, jax.Array]) -> MetricPairs: ...

    def finalize_metrics(self, means: dict[str, float]) -> dict[str, float]: ...

    def export(self, state: PyTree, directory: str) -> list[str]: ...


def finite_update(finite: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """``new`` where ``finite`` else ``old``: a non-finite step leaves the state exactly as it was."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


class GradientUpdate(NamedTuple):
    """One optimizer step's outcome (see :func:`gradient_update`)."""

    params: PyTree
    opt_state: PyTree
    metrics: dict[str, jax.Array]  # the loss_fn's metrics, divided once (easyppo.core.grad_accum)
    grad_norm: jax.Array
    finite: jax.Array  # False: the loss or gradient was NaN/Inf and the step was discarded


def gradient_update(
    loss_fn,
    optimizer: optax.GradientTransformation,
    params: PyTree,
    opt_state: PyTree,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    num_microbatches: int,
) -> GradientUpdate:
    """One optimizer step on ``loss_fn(params, batch, rng)`` with gradient accumulation.

    A non-finite loss or gradient leaves ``params`` and ``opt_state`` exactly as they were (on
    device, without a host round trip); the caller counts ``~finite``.
    """
    grads, metrics = grad_accum.accumulate_gradients(loss_fn, params, batch, rng, num_microbatches)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    return GradientUpdate(
        params=finite_update(finite, new_params, params),
        opt_state=finite_update(finite, new_opt_state, opt_state),
        metrics=metrics,
        grad_norm=grad_norm,
        finite=finite,
    )


@dataclasses.dataclass
class GradientTrainer:
    """A trainer for algorithms that minimise ``loss_fn`` over one model's parameters.

    Built by ``make_gradient_trainer``; holds the model, the optimizer (built once: a new optax
    object per call would change the state's tree structure), the frozen pytree passed to the loss
    (e.g. reference parameters), and the jitted steps with explicit shardings.
    """

    name: str
    data_kind: str
    kind: str
    model_config: llama.LlamaConfig
    mesh: jax.sharding.Mesh
    optimizer: optax.GradientTransformation
    loss_fn: LossFn
    frozen: PyTree
    initial_params: PyTree
    num_microbatches: int
    pad_token_id: int | None = None
    metric_finalizer: Callable[[dict[str, float]], dict[str, float]] | None = None
    rules: sharding.PartitionRules = partitioning.LLAMA_RULES
    # What eval_step passes as ``frozen`` when it differs from training's: per-row frozen inputs, such
    # as DPO's precomputed reference log-probs, are indexed by row of their own split. None: ``frozen``.
    eval_frozen: PyTree = None

    def __post_init__(self):
        params_shardings = jax.tree.map(lambda x: x.sharding, self.initial_params)
        opt_shardings = sharding.optimizer_state_shardings(self.optimizer, self.initial_params, self.mesh, self.rules)
        replicated = NamedSharding(self.mesh, P())
        self.state_shardings = TrainState(step=replicated, params=params_shardings, opt_state=opt_shardings)
        self._batch_sharding = sharding.batch_sharding(self.mesh)
        self._replicated = replicated
        self._train_step = jax.jit(
            self._train_step_impl,
            in_shardings=(self.state_shardings, self._batch_sharding, replicated, None),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )
        self._eval_step = jax.jit(
            self._eval_step_impl,
            in_shardings=(params_shardings, self._batch_sharding, None),
            out_shardings=replicated,
        )

    # -------------------------------------------------------------------------------- state

    def init_state(self) -> TrainState:
        opt_state = sharding.sharded_optimizer_init(
            self.optimizer, self.initial_params, mesh=self.mesh, rules=self.rules
        )
        step = jax.device_put(jnp.zeros((), jnp.int32), self._replicated)
        return TrainState(step=step, params=self.initial_params, opt_state=opt_state)

    def abstract_state(self) -> TrainState:
        params = abstract_tree(self.initial_params)
        state = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=params,
            opt_state=jax.eval_shape(self.optimizer.init, params),
        )
        return with_shardings(state, self.state_shardings)

    # -------------------------------------------------------------------------------- steps

    def _train_step_impl(self, state: TrainState, batch, rng, frozen):
        loss_fn = functools.partial(_bind_frozen, self.loss_fn, frozen)
        update = gradient_update(
            loss_fn, self.optimizer, state.params, state.opt_state, batch, rng, self.num_microbatches
        )
        new_state = TrainState(step=state.step + 1, params=update.params, opt_state=update.opt_state)
        metrics = dict(update.metrics, grad_norm=update.grad_norm, skipped=(~update.finite).astype(jnp.float32))
        return new_state, metrics

    def train_step(self, state: TrainState, batch, rng) -> tuple[TrainState, dict]:
        with jax.set_mesh(self.mesh):  # activation constraints inside the model refer to this mesh
            return self._train_step(state, batch, rng, self.frozen)

    def _eval_step_impl(self, params, batch, frozen):
        _, metrics = self.loss_fn(params, frozen, batch, jax.random.key(0))
        return metrics

    def eval_step(self, state: TrainState, batch) -> MetricPairs:
        with jax.set_mesh(self.mesh):
            return self._eval_step(state.params, batch, self.frozen if self.eval_frozen is None else self.eval_frozen)

    def finalize_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return self.metric_finalizer(means) if self.metric_finalizer else means

    def export(self, state: TrainState, directory: str) -> list[str]:
        huggingface.save_hf(directory, self.model_config, state.params, kind=self.kind, pad_token_id=self.pad_token_id)
        return [directory]


def abstract_tree(tree: PyTree) -> PyTree:
    """``ShapeDtypeStruct``s (with shardings) of arrays or of ``ShapeDtypeStruct``s alike."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
    """The restore target of a state: each leaf's shape and dtype with the sharding it must have."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _bind_frozen(loss_fn: LossFn, frozen: PyTree, params, batch, rng):
    return loss_fn(params, frozen, batch, rng)


def total_steps_from(num_steps: int, steps_per_epoch: int | None, num_epochs: int | None) -> int:
    """Steps of the run: ``train.num_steps`` if set, else epochs times batches per epoch."""
    if num_steps and num_steps > 0:
        return num_steps
    if num_epochs and steps_per_epoch:
        return num_epochs * steps_per_epoch
    raise ValueError("set train.num_steps, or data.num_epochs so the run length is known")


def make_gradient_trainer(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    total_steps: int,
    *,
    name: str,
    data_kind: str,
    kind: str,
    make_loss_fn: Callable[[Any, llama.LlamaConfig, ml_collections.ConfigDict], LossFn],
    frozen: PyTree = None,
    eval_frozen: PyTree = None,
    metric_finalizer: Callable[[dict[str, float]], dict[str, float]] | None = None,
    resuming: bool = False,
) -> GradientTrainer:
    """The usual recipe: load the model named by ``config.model``, build the optimizer, jit the step.

    ``resuming``: the run continues from a checkpoint, so the initial weights are not read (the
    trainer only needs their shapes and shardings, for ``abstract_state``).
    """
    rng = jax.random.key(config.seed)
    model_config, module, params = load_model(config.model, kind, mesh=mesh, rng=rng, abstract=resuming)
    optimizer = optim.make_optimizer(config.optim, total_steps)
    return GradientTrainer(
        name=name,
        data_kind=data_kind,
        kind=kind,
        model_config=model_config,
        mesh=mesh,
        optimizer=optimizer,
        loss_fn=make_loss_fn(module, model_config, config),
        frozen=frozen,
        initial_params=params,
        num_microbatches=config.train.grad_accum_steps,
        pad_token_id=config.data.pad_id if config.data.pad_id is not None else model_config.pad_token_id,
        metric_finalizer=metric_finalizer,
        eval_frozen=eval_frozen,
    )


def std_from_moments(means: dict[str, float], name: str) -> float:
    """Standard deviation from aggregated ``name`` and ``name_sq`` means (population formula)."""
    return float(np.sqrt(max(means[f"{name}_sq"] - means[name] ** 2, 0.0)))
