"""Gradient accumulation whose result equals the whole-batch gradient, masks and all.

A loss function reports *sums* and *counts*, never means:

    loss_fn(params, microbatch, rng) -> (loss_sum, metrics)
    metrics: dict name -> (sum, count), with metrics["loss"] == (loss_sum, loss_count)

e.g. SFT returns the summed token NLL and the number of loss tokens; DPO the summed pair loss and
the number of pairs. Gradients and metric sums are added up over microbatches and divided by the
total count once at the end. Averaging per-microbatch means instead would weight a microbatch with
3 loss tokens as much as one with 300, which is wrong whenever masks differ between microbatches.

``gradient_update`` is the one guarded optimizer step every algorithm uses: accumulate, apply, and
discard the whole update on the device if anything in it is not finite.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from easyppo.core.ops import safe_divide

Metrics = dict[str, tuple[jax.Array, jax.Array]]
LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Metrics]]


def accumulate_gradients(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    rng: jax.Array,
    num_microbatches: int,
) -> tuple[Any, dict[str, jax.Array]]:
    """Gradient of the whole-batch mean loss, computed one microbatch at a time.

    Args:
      loss_fn: `(params, microbatch, rng) -> (loss_sum, metrics)` as described in the module doc.
      params: the pytree to differentiate with respect to.
      batch: pytree of arrays sharing a leading batch axis, divisible by `num_microbatches`.
      rng: PRNG key; microbatch i receives `jax.random.fold_in(rng, i)`.
      num_microbatches: how many sequential slices to split the batch into. 1 calls `loss_fn` once
        on the whole batch without a scan.

    Returns:
      (grads, metric_means): grads = d(sum of loss_sum)/d(params) / total loss count, in each
      parameter's dtype; metric_means[name] = total sum / total count (0 where the count is 0).

    Microbatch i takes rows i, i + M, i + 2M, ... (M = num_microbatches) rather than a contiguous
    block: when the batch axis is sharded over devices, every microbatch then keeps rows on every
    device, so no data moves and no device idles while the scan runs.
    """
    if num_microbatches < 1:
        raise ValueError(f"accumulate_gradients: num_microbatches must be >= 1, got {num_microbatches}")
    _check_batch_divides(batch, num_microbatches)
    grad_fn = jax.grad(loss_fn, has_aux=True)

    if num_microbatches == 1:
        grads, metrics = grad_fn(params, batch, jax.random.fold_in(rng, 0))
        _check_metrics(metrics)
        grad_sums = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        metric_sums = _as_float32_pairs(metrics)
    else:
        microbatches = jax.tree.map(lambda x: _split_strided(x, num_microbatches), batch)

        def accumulate(carry, inputs):
            grad_sums, metric_sums = carry
            index, microbatch = inputs
            grads, metrics = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
            grad_sums = jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), grad_sums, grads)
            metric_sums = jax.tree.map(jnp.add, metric_sums, _as_float32_pairs(metrics))
            return (grad_sums, metric_sums), None

        first = jax.tree.map(lambda x: x[0], microbatches)
        metrics_shape = jax.eval_shape(loss_fn, params, first, rng)[1]
        _check_metrics(metrics_shape)
        zero_grads = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        zero = jnp.zeros((), jnp.float32)
        zero_metrics = {name: (zero, zero) for name in metrics_shape}
        indices = jnp.arange(num_microbatches)
        (grad_sums, metric_sums), _ = lax.scan(accumulate, (zero_grads, zero_metrics), (indices, microbatches))

    loss_count = metric_sums["loss"][1]
    grads = jax.tree.map(lambda g, p: safe_divide(g, loss_count).astype(jnp.result_type(p)), grad_sums, params)
    metric_means = {name: safe_divide(total, count) for name, (total, count) in metric_sums.items()}
    return grads, metric_means


def _split_strided(x: jax.Array, num_microbatches: int) -> jax.Array:
    """[N, ...] -> [M, N / M, ...] where slice i holds rows i, i + M, i + 2M, ..."""
    rows_per_microbatch = x.shape[0] // num_microbatches
    return x.reshape(rows_per_microbatch, num_microbatches, *x.shape[1:]).swapaxes(0, 1)


def _check_batch_divides(batch: Any, num_microbatches: int) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
        raise ValueError("accumulate_gradients: the batch has no arrays")
    sizes = {jax.tree_util.keystr(path): jnp.shape(x)[0] if jnp.ndim(x) else None for path, x in leaves}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"accumulate_gradients: every batch array needs the same leading batch axis; got {sizes}")
    batch_size = next(iter(sizes.values()))
    if batch_size % num_microbatches:
        raise ValueError(
            f"accumulate_gradients: batch size {batch_size} is not divisible by num_microbatches={num_microbatches}"
        )


def _check_metrics(metrics: Any) -> None:
    if not isinstance(metrics, dict) or "loss" not in metrics:
        raise ValueError(
            "accumulate_gradients: loss_fn must return (loss_sum, metrics) with metrics a dict "
            f"holding 'loss': (loss_sum, loss_count); got metrics={metrics!r}"
        )
    for name, pair in metrics.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(jnp.shape(x) == () for x in pair)):
            raise ValueError(
                f"accumulate_gradients: metric {name!r} must be a (sum, count) pair of scalars, got {pair!r}"
            )


def _as_float32_pairs(metrics: Metrics) -> dict[str, tuple[jax.Array, jax.Array]]:
    return {
        name: (jnp.asarray(total, jnp.float32), jnp.asarray(count, jnp.float32))
        for name, (total, count) in metrics.items()
    }


def all_finite(tree: Any) -> jax.Array:
    """True when every floating value of ``tree`` is finite (one scalar, reduced on the device)."""
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def finite_update(finite: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``finite`` else ``old``: a non-finite step leaves the state exactly as it was."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


class GradientUpdate(NamedTuple):
    """One optimizer step's outcome (see :func:`gradient_update`)."""

    params: Any
    opt_state: Any
    metrics: dict[str, jax.Array]  # the loss_fn's metrics, divided once (easyppo.core.grad_accum)
    grad_norm: jax.Array
    finite: jax.Array  # False: the loss, gradient or update was NaN/Inf and the step was discarded


def gradient_update(
    loss_fn,
    optimizer: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    num_microbatches: int,
) -> GradientUpdate:
    """One optimizer step on ``loss_fn(params, batch, rng)`` with gradient accumulation.

    A non-finite loss or gradient, or an update that would make any parameter or optimizer-state
    value non-finite (a finite gradient times a huge learning rate overflows float32), leaves
    ``params`` and ``opt_state`` exactly as they were (on device, without a host round trip); the
    caller counts ``~finite``.
    """
    grads, metrics = accumulate_gradients(loss_fn, params, batch, rng, num_microbatches)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & all_finite((new_params, new_opt_state))
    return GradientUpdate(
        params=finite_update(finite, new_params, params),
        opt_state=finite_update(finite, new_opt_state, opt_state),
        metrics=metrics,
        grad_norm=grad_norm,
        finite=finite,
    )
