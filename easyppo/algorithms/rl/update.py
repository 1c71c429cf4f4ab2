"""The update: ``ppo_epochs`` passes of shuffled minibatches over one scored rollout.

Each minibatch is one clipped-surrogate step of the policy and one clipped value step of the critic,
each with its own optimizer and gradient accumulation, through the one guarded optimizer update
(``easyppo.core.grad_accum.gradient_update``). The ratio divides by the *stored* old log-probs of
the experience, so after the first minibatch the policy has moved and clipping acts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from easyppo.algorithms.rl import forward, losses
from easyppo.algorithms.rl.options import RLOptions
from easyppo.algorithms.rl.scoring import Experience, scoring_temperature
from easyppo.core import grad_accum, ops, sharding
from easyppo.models import lora

PyTree = Any


@flax.struct.dataclass
class RLState:
    """What an RL run checkpoints (the loop adds the data position).

    ``params`` / ``opt_state`` are the policy's, named like every algorithm's trained model, so an
    RL run directory starts another run or converts like any other.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    value_params: PyTree
    value_opt_state: PyTree
    kl_coef: jax.Array


class FrozenBases(NamedTuple):
    """LoRA's frozen bases of the policy and the critic (``easyppo.models.lora``): the state holds
    only the trained adapters (and the critic's head), merged with these in every forward pass.
    None: that model is trained whole."""

    policy: PyTree = None
    value: PyTree = None


NO_BASES = FrozenBases()


class Optimizers(NamedTuple):
    """The policy's and the critic's optimizers, with the schedules that report their learning rates."""

    policy: optax.GradientTransformation
    value: optax.GradientTransformation | None  # None without a critic
    policy_schedule: optax.Schedule
    value_schedule: optax.Schedule | None


def policy_loss_fn(
    params: PyTree, minibatch: Experience, rng: jax.Array, *, models: forward.Models, options: RLOptions
):
    """The clipped-surrogate loss of a minibatch (with its importance weights, KL term and entropy
    bonus) as the (sum, count) pair of ``options.loss_aggregation``, with (sum, count) metrics."""
    o = options
    mask = minibatch.mask
    tokens = jnp.sum(mask)
    total = lambda x: (ops.masked_sum(x, mask), tokens)
    metrics = {}
    # The entropy over the vocabulary costs a pass over every chunk's logits in the forward and the
    # backward: computed only when it is part of the loss (scoring reports it anyway).
    logprob_args = (models.policy, params, minibatch.sequences, minibatch.response_ids)
    logprob_kwargs = dict(chunk_size=o.logprob_chunk_size, temperature=scoring_temperature(o), rng=rng)
    if o.entropy_coef:
        logprobs, entropy = forward.response_logprobs(*logprob_args, with_entropy=True, **logprob_kwargs)
        metrics["update_entropy"] = total(entropy)
    else:
        logprobs, entropy = forward.response_logprobs(*logprob_args, **logprob_kwargs), 0.0
    terms = losses.clipped_policy_loss(
        logprobs, minibatch.old_logprobs, minibatch.advantages, o.clip_ratio, o.clip_high
    )
    per_token = terms.loss * minibatch.is_weights - o.entropy_coef * entropy
    if minibatch.reference_logprobs is not None:
        kl = ops.kl_estimate(logprobs, minibatch.reference_logprobs, "k3")
        per_token = per_token + o.kl_loss_coef * kl
        metrics["kl_loss"] = total(kl)
    loss_sum, count = losses.aggregate(per_token, mask, o.loss_aggregation, o.length_divisor)
    log_ratio = logprobs - minibatch.old_logprobs
    return loss_sum, {
        "loss": (loss_sum, count),
        "policy_loss": total(terms.loss),
        "policy_clip_fraction": total(terms.clipped_low + terms.clipped_high),
        "policy_clip_fraction_low": total(terms.clipped_low),
        "policy_clip_fraction_high": total(terms.clipped_high),
        "approx_kl": total(jnp.expm1(log_ratio) - log_ratio),  # k3 estimate of KL(old || new)
        "ratio": total(terms.ratio),
        **metrics,
    }


def value_loss_fn(
    value_params: PyTree, minibatch: Experience, rng: jax.Array, *, models: forward.Models, options: RLOptions
):
    """Summed ``vf_coef`` x clipped value loss of a minibatch, with (sum, count) metrics."""
    num_new = minibatch.response_ids.shape[1]
    values = forward.response_values(models.value, value_params, minibatch.sequences, num_new, rng=rng)
    mask = minibatch.mask
    per_token, clipped = losses.clipped_value_loss(values, minibatch.old_values, minibatch.returns, options.value_clip)
    tokens = jnp.sum(mask)
    loss_sum = options.vf_coef * ops.masked_sum(per_token, mask)
    return loss_sum, {
        "loss": (loss_sum, tokens),
        "value_loss": (ops.masked_sum(per_token, mask), tokens),
        "value_clip_fraction": (ops.masked_sum(clipped, mask), tokens),
    }


def update(
    state: RLState,
    experience: Experience,
    observed_kl: jax.Array,
    rng: jax.Array,
    *,
    models: forward.Models,
    options: RLOptions,
    optimizers: Optimizers,
    num_microbatches: int,
    train_policy: bool = True,
    bases: FrozenBases = NO_BASES,
) -> tuple[RLState, dict[str, jax.Array]]:
    """``ppo_epochs`` x ``num_minibatches`` steps of both models on one scored rollout.

    ``observed_kl`` (the rollout's KL per sequence) drives the adaptive KL coefficient;
    ``train_policy=False`` trains only the critic (value warm-up). Returns the new state (its ``step``
    advanced by one iteration) and the update's metrics: means over minibatches, the learning rates
    used, and how many of the optimizer steps were discarded as non-finite (``skipped_updates``).
    With LoRA, ``bases`` holds the frozen bases that the state's trained parameters complete.
    """
    o = options
    rows = experience.mask.shape[0]
    per_minibatch = rows // o.num_minibatches
    policy_loss = lambda p, b, r: policy_loss_fn(lora.merge(p, bases.policy), b, r, models=models, options=o)
    value_loss = lambda p, b, r: value_loss_fn(lora.merge(p, bases.value), b, r, models=models, options=o)

    def minibatch_step(carry, inputs):
        state, skipped = carry
        index, minibatch = inputs
        minibatch = jax.tree.map(lambda x: sharding.constrain(x, P(sharding.BATCH_AXES)), minibatch)
        key = jax.random.fold_in(rng, index)
        metrics = {}
        if train_policy:
            policy = grad_accum.gradient_update(
                policy_loss, optimizers.policy, state.params, state.opt_state, minibatch, key, num_microbatches
            )
            state = state.replace(params=policy.params, opt_state=policy.opt_state)
            metrics.update({k: v for k, v in policy.metrics.items() if k != "loss"}, policy_grad_norm=policy.grad_norm)
            skipped = skipped + (~policy.finite)
        if state.value_params is not None:
            value = grad_accum.gradient_update(
                value_loss,
                optimizers.value,
                state.value_params,
                state.value_opt_state,
                minibatch,
                key,
                num_microbatches,
            )
            state = state.replace(value_params=value.params, value_opt_state=value.opt_state)
            metrics.update({k: v for k, v in value.metrics.items() if k != "loss"}, value_grad_norm=value.grad_norm)
            skipped = skipped + (~value.finite)
        return (state, skipped), metrics

    def epoch(carry, epoch_index):
        order = jax.random.permutation(jax.random.fold_in(rng, 1_000_003 + epoch_index), rows)
        shuffled = jax.tree.map(lambda x: jnp.take(x, order, axis=0), experience)
        minibatches = jax.tree.map(lambda x: x.reshape(o.num_minibatches, per_minibatch, *x.shape[1:]), shuffled)
        indices = epoch_index * o.num_minibatches + jnp.arange(o.num_minibatches)
        return lax.scan(minibatch_step, carry, (indices, minibatches))

    (state, skipped), metrics = lax.scan(epoch, (state, jnp.int32(0)), jnp.arange(o.ppo_epochs))
    metrics = jax.tree.map(jnp.mean, metrics)
    kl_coef = state.kl_coef
    if o.adaptive_kl:
        kl_coef = losses.adaptive_kl_coef(
            kl_coef, observed_kl, target=o.kl_target, horizon=o.kl_horizon, batch_rows=rows
        )
    iteration = state.step + 1  # the iteration this update completes, counting from 1
    updates = o.updates_per_step
    policy_updates_done = jnp.maximum(iteration - o.value_warmup_steps, 0) * updates
    if train_policy:
        metrics["learning_rate"] = optimizers.policy_schedule(jnp.maximum(policy_updates_done - 1, 0))
    else:
        metrics["learning_rate"] = jnp.zeros((), jnp.float32)
    if state.value_params is not None:
        metrics["value_learning_rate"] = optimizers.value_schedule(iteration * updates - 1)
    metrics["skipped_updates"] = skipped.astype(jnp.float32)
    return state.replace(step=iteration, kl_coef=kl_coef), metrics
