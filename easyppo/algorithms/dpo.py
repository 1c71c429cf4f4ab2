"""Direct preference optimisation (DPO) and its relatives, on log-probs of the response tokens.

Every loss here is a pure function of per-pair log-probs: the policy's log pi(y_w | x), log pi(y_l | x)
of the chosen (w) and rejected (l) responses and, except for SimPO, the frozen reference model's
log pi_ref(y | x). With the log-ratio margin

    h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]

the per-pair losses are (docs/algorithms.md explains each and when to use it):

* ``sigmoid`` (DPO):            -log sigmoid(beta h)
  with ``label_smoothing`` e (conservative DPO):  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
* ``ipo``:                      (h - 1 / (2 beta))^2
* ``hinge`` (SLiC):             max(0, 1 - beta h)
* ``simpo`` (reference-free):   -log sigmoid(beta (avg log pi(y_w) - avg log pi(y_l)) - gamma)

A log-prob is the sum over the response tokens, or with ``length_normalize`` their mean (SimPO always
uses the mean); the same choice applies to policy and reference. The implicit reward of a response
is beta (log pi - log pi_ref) (SimPO: beta avg log pi); accuracy is the fraction of pairs whose chosen
response has the higher implicit reward, ties counting half (so a policy equal to its reference
scores exactly chance, 0.5).

The losses are in ``easyppo.algorithms.dpo_losses``; the response log-probs and the reference pass
in ``easyppo.algorithms.dpo_reference``. Token log-probs come from the chunked log-softmax of
``easyppo.core.ops.token_logprobs`` (never the float32 [2B, T, V] logits at once).

The reference log-probs come from one of two places (``dpo.reference``):

* ``on_the_fly``: frozen reference parameters, sharded like the policy and without optimizer state,
  run forward in every step;
* ``precomputed``: one jitted, sharded forward pass over the train and eval splits before training,
  cached on disk by ``easyppo.algorithms.reference_cache`` (keyed by the dataset fingerprint and the reference
  checkpoint), so resumed and later runs skip it. Steps then gather rows of a small [num_rows, 2]
  table by the batch's ``example_index`` and the reference model is never held in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from easyppo.algorithms import base
from easyppo.algorithms.contract import Algorithm, RunInputs
from easyppo.algorithms.dpo_losses import LossSettings, preference_losses
from easyppo.algorithms.dpo_reference import precomputed_reference_tables, reference_sums, response_logprobs
from easyppo.core import ops
from easyppo.core.options import option, require
from easyppo.models import llama
from easyppo.weights import loading
from easyppo.weights.loading import load_model

REFERENCE_MODES = ("on_the_fly", "precomputed")


@dataclasses.dataclass(frozen=True)
class DPOOptions(LossSettings):
    """The ``dpo`` options: the loss (``LossSettings``) and where the reference log-probs come from."""

    reference: str = option("on_the_fly", f"one of {REFERENCE_MODES} (ignored by the reference-free simpo)")
    reference_init_from: str = option("", "reference weights; '': the policy's own model.init_from")
    reference_cache_dir: str = option("", "precomputed log-probs; '': <data.cache_dir>/reference_logprobs")
    reference_batch_size: int | None = option(None, "rows per batch of the precompute pass; None: eval/train batch")
    logprob_chunk_size: int = option(256, "sequence positions per chunk of the vocabulary projection")

    def __post_init__(self):
        super().__post_init__()
        require(self.reference in REFERENCE_MODES, "reference", f"{self.reference!r} is not one of {REFERENCE_MODES}")
        require(self.logprob_chunk_size >= 1, "logprob_chunk_size", f"must be >= 1, got {self.logprob_chunk_size}")
        require(
            self.reference_batch_size is None or self.reference_batch_size >= 1,
            "reference_batch_size",
            f"must be >= 1, got {self.reference_batch_size}",
        )


def make_loss_fn(
    module,
    model_config: llama.LlamaConfig,
    settings: LossSettings,
    *,
    chunk_size: int = 256,
    reference_model: tuple[Any, llama.LlamaConfig] | None = None,
) -> base.LossFn:
    """The DPO loss_fn(params, frozen, batch, rng) -> (summed pair loss, {metric: (sum, count)}).

    ``settings``: the loss (``DPOOptions`` is one); ``chunk_size``: sequence positions per chunk of
    the vocabulary projection. ``frozen`` is None (SimPO), ``{"reference_params": ...}`` (on the fly, run with
    ``reference_model = (module, config)``) or ``{"reference_logps": [num_rows, 2]}`` (precomputed).
    """

    def loss_fn(params, frozen, batch, rng):
        policy_sums, counts = response_logprobs(module, model_config, params, batch, chunk_size=chunk_size, rng=rng)
        as_used = (lambda sums: ops.safe_divide(sums, counts)) if settings.averages_logprobs else (lambda sums: sums)
        policy = as_used(policy_sums)
        reference = None
        if settings.uses_reference:
            reference = as_used(reference_sums(frozen, batch, reference_model, chunk_size=chunk_size))
        losses, rewards = preference_losses(settings, policy, reference)

        weight = batch["example_mask"].astype(jnp.float32)
        pairs = jnp.sum(weight)
        total = lambda x: (jnp.sum(x * weight), pairs)
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        wins = jnp.where(chosen > rejected, 1.0, jnp.where(chosen == rejected, 0.5, 0.0))
        loss_sum = jnp.sum(losses * weight)
        metrics = {
            "loss": (loss_sum, pairs),
            "accuracy": total(wins),
            "reward_chosen": total(chosen),
            "reward_rejected": total(rejected),
            "reward_margin": total(chosen - rejected),
            "logps_chosen": total(policy[:, 0]),
            "logps_rejected": total(policy[:, 1]),
            "tokens_chosen": total(counts[:, 0]),
            "tokens_rejected": total(counts[:, 1]),
        }
        if reference is not None:
            metrics["ref_logps_chosen"] = total(reference[:, 0])
            metrics["ref_logps_rejected"] = total(reference[:, 1])
        return loss_sum, metrics

    return loss_fn


def reference_model_config(config: ml_collections.ConfigDict, options: DPOOptions) -> ml_collections.ConfigDict:
    """The ``model`` config of the reference: the policy's, with ``dpo.reference_init_from`` if set."""
    return loading.frozen_config(config.model, options.reference_init_from)


def reference_batch_size(config: ml_collections.ConfigDict, options: DPOOptions) -> int:
    """Rows per batch of the precomputed reference pass (it has no gradients, so it may take more than training)."""
    return options.reference_batch_size or config.eval.batch_size or config.data.global_batch_size


def reference_tables(
    config: ml_collections.ConfigDict, options: DPOOptions, mesh: jax.sharding.Mesh, splits: dict
) -> dict[str, np.ndarray]:
    """The precomputed [num_rows, 2] reference table of every split (``dpo_reference``), as the run configures it."""
    return precomputed_reference_tables(
        reference_model_config(config, options),
        mesh,
        splits,
        cache_dir=options.reference_cache_dir or os.path.join(config.data.cache_dir, "reference_logprobs"),
        batch_size=reference_batch_size(config, options),
        chunk_size=options.logprob_chunk_size,
        seed=config.seed,
    )


def make_trainer(
    config: ml_collections.ConfigDict,
    options: DPOOptions,
    mesh: jax.sharding.Mesh,
    total_steps: int,
    *,
    inputs: RunInputs,
    resuming: bool = False,
) -> base.GradientTrainer:
    """The gradient trainer with the reference wired in as ``dpo.reference`` asks (see module doc).

    A LoRA policy's reference is its own frozen base (adapters off), so no second model is loaded;
    the precomputed table is the same base's log-probs, cached like a full run's.
    """
    frozen = eval_frozen = None
    reference_model = None
    loaded = base.load_trained_model(config, "causal_lm", mesh, resuming=resuming, abstract=inputs.abstract)
    policy_config, policy_module, _, base_params = loaded
    on_the_fly = options.uses_reference and options.reference == "on_the_fly"
    if on_the_fly and base_params is not None and not options.reference_init_from:
        frozen, reference_model = {"reference_params": base_params}, (policy_module, policy_config)
    elif on_the_fly:
        model_config, module, params = load_model(
            reference_model_config(config, options),
            "causal_lm",
            mesh=mesh,
            rng=jax.random.key(config.seed),
            abstract=inputs.abstract,
        )
        frozen, reference_model = {"reference_params": params}, (module, model_config)
    elif options.uses_reference and inputs.abstract:  # planning: the table's shape, one row per batch row
        replicated = NamedSharding(mesh, P())
        table = jax.ShapeDtypeStruct((config.data.global_batch_size, 2), np.float32, sharding=replicated)
        frozen = {"reference_logps": table}
    elif options.uses_reference:
        splits = {"train": inputs.train_data}
        if inputs.eval_data is not None:
            splits["eval"] = inputs.eval_data
        tables = reference_tables(config, options, mesh, splits)
        replicated = NamedSharding(mesh, P())
        frozen = {"reference_logps": jax.device_put(tables["train"], replicated)}
        if "eval" in tables:
            eval_frozen = {"reference_logps": jax.device_put(tables["eval"], replicated)}
    loss_fn_for = functools.partial(
        make_loss_fn, settings=options, chunk_size=options.logprob_chunk_size, reference_model=reference_model
    )
    return base.make_gradient_trainer(
        config,
        mesh,
        total_steps,
        kind="causal_lm",
        loss_fn_for=loss_fn_for,
        frozen=frozen,
        eval_frozen=eval_frozen,
        pad_token_id=inputs.tokenizer.pad_id,
        resuming=resuming,
        loaded=loaded,
    )


ALGORITHM = Algorithm(
    name="dpo",
    data_kind="preference",
    model_kind="causal_lm",
    options_type=DPOOptions,
    make_trainer=make_trainer,
)
