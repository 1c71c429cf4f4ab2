"""The contract between an algorithm and the one train loop: a registry entry and a step result.

An algorithm is registered as one :class:`Algorithm` (name, data kind, model kind, options type,
trainer factory, ...); the loop (``easyppo.run.loop``) knows nothing else about it. It asks
``make_trainer`` for a :class:`Trainer` and then only calls:

* ``init_state()`` / ``abstract_state()``: the checkpointed state, born sharded / as a restore target
  (a trainer made with ``resuming=True`` has not read its initial weights and offers only the latter);
* ``train_step(state, batch, rng, step=...) -> StepResult``: one optimisation step (jitted, donating
  ``state``). Everything in the result stays on the device until the loop decides to read it;
* ``eval_step(state, batch) -> {name: (sum, count)}``: held-out metrics that add up across batches;
* ``finalize_metrics(means)`` and ``export(state, directory)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import ml_collections

from easyppo.core import options as options_lib

PyTree = Any
MetricPairs = dict[str, tuple[jax.Array, jax.Array]]


class Samples(Protocol):
    """Rows an algorithm produced in a step (PPO's rollout), decoded only when the loop logs them."""

    def columns(self, tokenizer: Any, max_rows: int) -> dict[str, list]:
        """Column name -> one value per row; a collective on a multi-host job (every host calls it)."""
        ...


class StepResult(NamedTuple):
    """What one ``train_step`` returns; every array is still on the device.

    The loop reads ``skipped`` and ``num_tokens`` one step late and ``metrics`` only when it logs, so
    the host never waits for the step it has just dispatched.
    """

    state: PyTree
    metrics: dict[str, jax.Array]  # scalars, including "learning_rate" (the one the step used)
    skipped: jax.Array  # scalar bool: the update was discarded (non-finite loss, gradient or update)
    num_tokens: jax.Array  # scalar: real tokens the step processed (for tokens per second)
    samples: Samples | None = None  # rows for the samples table, when the algorithm has any


class Trainer(Protocol):
    """The interface between one algorithm and the one train loop."""

    def init_state(self) -> PyTree: ...

    def abstract_state(self) -> PyTree: ...

    def train_step(self, state: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array, *, step: int) -> StepResult:
        """One step; ``step`` is the number of steps done before it (equal to ``state.step``, known on the host)."""
        ...

    def eval_step(self, state: PyTree, batch: Mapping[str, jax.Array]) -> MetricPairs: ...

    def finalize_metrics(self, means: dict[str, float]) -> dict[str, float]: ...

    def export(self, state: PyTree, directory: str) -> list[str]: ...


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """What the loop has prepared before the trainer is made (nothing here is read twice).

    ``train_data`` / ``eval_data`` are ``easyppo.data.pipeline.PreparedData`` (the latter may be None),
    for algorithms that precompute over a dataset (DPO's reference log-probs). The run's pad id is
    ``tokenizer.pad_id``: every batch is padded with it (``data.pad_id`` overrides the tokenizer's).
    """

    tokenizer: Any
    chat_format: Any
    train_data: Any
    eval_data: Any = None
    # Planning (easyppo.plan): there is no data and no weights; frozen inputs a trainer would read or
    # precompute (a DPO reference) are ShapeDtypeStructs with their shardings instead.
    abstract: bool = False


class TrainerFactory(Protocol):
    def __call__(
        self,
        config: ml_collections.ConfigDict,
        options: Any,
        mesh: jax.sharding.Mesh,
        total_steps: int,
        *,
        inputs: RunInputs,
        resuming: bool,
    ) -> Trainer:
        """``resuming``: a checkpoint will replace the trained models' weights, so they need not be read."""
        ...


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One algorithm's registry entry; adding an algorithm is a module that defines one, plus a line
    in ``easyppo.algorithms.REGISTRY``.

    Attributes:
      name: the config's ``algorithm`` value and the name of its options section (``config.<name>``).
      data_kind: the rows it trains on ("sft", "preference" or "prompt").
      model_kind: what its checkpoints' ``params`` are ("causal_lm", "reward" or "value").
      options_type: a frozen dataclass of its options that validates itself; the config section's
        defaults are derived from it.
      make_trainer: builds the trainer (loads models, jits the programs).
      sections: further config sections inside ``config.<name>`` that belong to other components
        (PPO's ``reward_model`` is a model section), each with its default-config factory.
      check_run: checks that need the whole run config (lengths against models, batch splits); runs
        in ``easyppo.run.config.validate`` before anything loads. Raises ``OptionError``.
      rows_per_update: rows one optimizer step sees, when that is not the data batch (PPO updates on
        minibatches of its rollout).
      progress_bar_metrics: the metrics the progress bar shows (None: the logging section's default).
    """

    name: str
    data_kind: str
    model_kind: str
    options_type: type
    make_trainer: TrainerFactory
    sections: Mapping[str, Callable[[], ml_collections.ConfigDict]] = dataclasses.field(default_factory=dict)
    check_run: Callable[[ml_collections.ConfigDict, Any], None] | None = None
    rows_per_update: Callable[[ml_collections.ConfigDict, Any], int] | None = None
    progress_bar_metrics: tuple[str, ...] | None = None

    def default_config(self) -> ml_collections.ConfigDict:
        """The ``config.<name>`` section: the options' defaults plus the other sections."""
        section = options_lib.to_config(self.options_type())
        for key, make in self.sections.items():
            section[key] = make()
        return section

    def options(self, config: ml_collections.ConfigDict) -> Any:
        """The validated options of a run config; errors name ``<name>.<key>``."""
        values = {key: value for key, value in config[self.name].to_dict().items() if key not in self.sections}
        return options_lib.from_config(self.options_type, values, name=self.name)

    def update_rows(self, config: ml_collections.ConfigDict, options: Any) -> int:
        if self.rows_per_update is None:
            return config.data.global_batch_size
        return self.rows_per_update(config, options)
