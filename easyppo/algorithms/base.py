"""The shared trainer of algorithms that minimise one loss over one model's parameters.

SFT, the reward model and the DPO family differ only in their loss function
``loss_fn(params, frozen, batch, rng) -> (loss_sum, {name: (sum, count)})``; frozen inputs (a DPO
reference's parameters or precomputed log-probs) are a jit argument, never checkpointed. PPO brings
its own trainer (``easyppo.algorithms.ppo``) behind the same contract (``easyppo.algorithms.contract``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from easyppo.algorithms.contract import MetricPairs, StepResult
from easyppo.core import grad_accum, optim, sharding
from easyppo.models import llama, lora, partitioning
from easyppo.weights import huggingface, loading, peft_adapters

PyTree = Any
# loss_fn(params, frozen, batch, rng) -> (loss_sum, {name: (sum, count)}); see easyppo.core.grad_accum.
LossFn = Callable[[PyTree, PyTree, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, MetricPairs]]


@flax.struct.dataclass
class TrainState:
    """Everything a gradient algorithm checkpoints: the step, the parameters and the optimizer state.

    Frozen models (a DPO reference) are not part of it: they are reloaded from their source, never
    written again with every checkpoint. With LoRA, ``params`` are only the trained adapters (and a
    scalar head); the frozen base is the trainer's ``base_params``, reloaded the same way.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree


def count_tokens(batch: Mapping[str, jax.Array]) -> jax.Array:
    """Real (non-pad) tokens of a global batch, whatever its kind, on the device."""
    masks = [value for key, value in batch.items() if key.endswith("attention_mask")]
    return sum(jnp.sum(mask, dtype=jnp.float32) for mask in masks)


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """How a LoRA model is exported: ``lora`` is its ``model.lora.export`` ('merged', 'peft' or
    'both'); ``base_model`` the base's source, recorded in a peft adapter."""

    lora: str = "merged"
    base_model: str = ""

    @classmethod
    def of(cls, model_cfg: ml_collections.ConfigDict) -> ExportSettings:
        return cls(lora=model_cfg.lora.export, base_model=model_cfg.init_from)


@dataclasses.dataclass
class GradientTrainer:
    """A trainer for algorithms that minimise ``loss_fn`` over one model's parameters.

    Built by ``make_gradient_trainer``; holds the model, the optimizer (built once: a new optax
    object per call would change the state's tree structure) and its schedule, the frozen pytree
    passed to the loss, and the jitted steps with explicit shardings.
    """

    kind: str
    model_config: llama.LlamaConfig
    mesh: jax.sharding.Mesh
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
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
    # LoRA (``model_config.lora``): the frozen base the trained ``params`` are merged with in every
    # forward pass (``easyppo.models.lora``); None trains the whole model.
    base_params: PyTree = None
    exports: ExportSettings = ExportSettings()  # how a LoRA model is exported

    def __post_init__(self):
        params_shardings = jax.tree.map(lambda x: x.sharding, self.initial_params)
        opt_shardings = sharding.optimizer_state_shardings(self.optimizer, self.initial_params, self.mesh, self.rules)
        replicated = NamedSharding(self.mesh, P())
        self.state_shardings = TrainState(step=replicated, params=params_shardings, opt_state=opt_shardings)
        self._replicated = replicated
        self._train_step = jax.jit(
            self._train_step_impl,
            in_shardings=(self.state_shardings, sharding.batch_sharding(self.mesh), replicated, None, None),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )
        self._eval_step = jax.jit(
            self._eval_step_impl,
            in_shardings=(params_shardings, sharding.batch_sharding(self.mesh), None, None),
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
        params = sharding.abstract_tree(self.initial_params)
        state = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=params,
            opt_state=jax.eval_shape(self.optimizer.init, params),
        )
        return sharding.with_shardings(state, self.state_shardings)

    # -------------------------------------------------------------------------------- steps

    def _train_step_impl(self, state: TrainState, batch, rng, frozen, base_params):
        loss_fn = functools.partial(_bind_frozen, self.loss_fn, frozen, base_params)
        update = grad_accum.gradient_update(
            loss_fn, self.optimizer, state.params, state.opt_state, batch, rng, self.num_microbatches
        )
        new_state = TrainState(step=state.step + 1, params=update.params, opt_state=update.opt_state)
        report = {
            "metrics": dict(
                update.metrics, grad_norm=update.grad_norm, learning_rate=self.schedule(state.step).astype(jnp.float32)
            ),
            "skipped": ~update.finite,
            "num_tokens": count_tokens(batch),
        }
        return new_state, report

    def train_step(self, state: TrainState, batch, rng, *, step: int) -> StepResult:
        del step  # the state's own step drives the schedule, inside the program
        with jax.set_mesh(self.mesh):  # activation constraints inside the model refer to this mesh
            state, report = self._train_step(state, batch, rng, self.frozen, self.base_params)
        return StepResult(state=state, **report)

    def lower_train_step(self, state: TrainState, batch, rng) -> jax.stages.Lowered:
        """The jitted step lowered for these inputs (compile time, memory plan); the compiled executable
        is the one ``train_step`` runs, and JAX caches it, so the first real call compiles nothing."""
        with jax.set_mesh(self.mesh):
            return self._train_step.lower(state, batch, rng, self.frozen, self.base_params)

    def _eval_step_impl(self, params, batch, frozen, base_params):
        _, metrics = self.loss_fn(lora.merge(params, base_params), frozen, batch, None)  # no dropout
        return metrics

    def eval_step(self, state: TrainState, batch) -> MetricPairs:
        frozen = self.frozen if self.eval_frozen is None else self.eval_frozen
        with jax.set_mesh(self.mesh):
            return self._eval_step(state.params, batch, frozen, self.base_params)

    def finalize_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return self.metric_finalizer(means) if self.metric_finalizer else means

    def export(self, state: TrainState, directory: str) -> list[str]:
        return export_model(
            directory,
            self.model_config,
            lora.merge(state.params, self.base_params),
            self.kind,
            pad_token_id=self.pad_token_id,
            settings=self.exports,
        )


def export_model(
    directory: str,
    model_config: llama.LlamaConfig,
    params: PyTree,
    kind: str,
    *,
    pad_token_id: int | None,
    settings: ExportSettings = ExportSettings(),
) -> list[str]:
    """A trained model to ``directory`` in Hugging Face form; returns the directories written.

    Without LoRA: the weights. With LoRA, ``settings.lora`` picks the adapters folded into the
    weights ('merged'), a peft adapter ('peft'), or both (the adapter in ``<directory>_adapter``).
    """
    spec, lora_export = model_config.lora, settings.lora
    if spec is None:
        huggingface.save_hf(directory, model_config, params, kind=kind, pad_token_id=pad_token_id)
        return [directory]
    written = []
    if lora_export in ("merged", "both"):
        plain = model_config.replace(lora=None)
        merged = lora.merged_weights(params, spec)
        huggingface.save_hf(directory, plain, merged, kind=kind, pad_token_id=pad_token_id)
        written.append(directory)
    if lora_export in ("peft", "both"):
        adapter_dir = directory if lora_export == "peft" else adapter_export_dir(directory)
        peft_adapters.save_adapter(adapter_dir, model_config, params, kind, base_model=settings.base_model)
        written.append(adapter_dir)
    return written


def adapter_export_dir(directory: str) -> str:
    """Where ``model.lora.export='both'`` writes the peft adapter: a sibling of the merged model."""
    return directory.rstrip("/") + "_adapter"


def _bind_frozen(loss_fn: LossFn, frozen: PyTree, base_params: PyTree, params, batch, rng):
    return loss_fn(lora.merge(params, base_params), frozen, batch, rng)


def make_gradient_trainer(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    total_steps: int,
    *,
    kind: str,
    loss_fn_for: Callable[[Any, llama.LlamaConfig], LossFn],
    pad_token_id: int,
    frozen: PyTree = None,
    eval_frozen: PyTree = None,
    metric_finalizer: Callable[[dict[str, float]], dict[str, float]] | None = None,
    resuming: bool = False,
    abstract: bool = False,
    loaded: tuple[llama.LlamaConfig, Any, PyTree, PyTree] | None = None,
) -> GradientTrainer:
    """The usual recipe: load the model named by ``config.model``, build the optimizer, jit the step.

    ``loss_fn_for(module, model_config)`` makes the loss once the model is known; ``pad_token_id`` (the
    run's, ``tokenizer.pad_id``) is written into the export's config. ``resuming``: the
    run continues from a checkpoint, so the trained weights are not read (the trainer only needs
    their shapes and shardings, for ``abstract_state``); a LoRA run still reads its frozen base.
    ``abstract`` (planning): no weights at all. ``loaded``: the model, when the caller loaded it
    (``load_trained_model``).
    """
    model_config, module, params, base_params = loaded or load_trained_model(
        config, kind, mesh, resuming=resuming, abstract=abstract
    )
    return GradientTrainer(
        kind=kind,
        model_config=model_config,
        mesh=mesh,
        optimizer=optim.make_optimizer(config.optim, total_steps),
        schedule=optim.make_schedule(config.optim, total_steps),
        loss_fn=loss_fn_for(module, model_config),
        frozen=frozen,
        initial_params=params,
        num_microbatches=config.train.grad_accum_steps,
        pad_token_id=pad_token_id,
        metric_finalizer=metric_finalizer,
        eval_frozen=eval_frozen,
        base_params=base_params,
        exports=ExportSettings.of(config.model),
    )


def load_trained_model(
    config: ml_collections.ConfigDict, kind: str, mesh: jax.sharding.Mesh, *, resuming: bool, abstract: bool = False
) -> tuple[llama.LlamaConfig, Any, PyTree, PyTree]:
    """The run's ``config.model`` as ``(config, module, trained params, frozen base)``, at the run's seed
    (``loading.load_trained``)."""
    rng = jax.random.key(config.seed)
    return loading.load_trained(config.model, kind, mesh=mesh, rng=rng, resuming=resuming, abstract=abstract)


def std_from_moments(means: dict[str, float], name: str) -> float:
    """Standard deviation from aggregated ``name`` and ``name_sq`` means (population formula)."""
    return float(np.sqrt(max(means[f"{name}_sq"] - means[name] ** 2, 0.0)))
