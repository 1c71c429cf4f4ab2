"""PPO's pure per-token functions: rewards, the clipped surrogates and the KL controller.

Each takes arrays and plain numbers and returns arrays; nothing here knows a model or a config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from easyppo.core import ops
from easyppo.models import llama


def apply_missing_eos_penalty(score: jax.Array, finished: jax.Array, penalty: float | None, mode: str) -> jax.Array:
    """The score PPO optimises: a response without a stop token gets ``penalty`` (or score + penalty)."""
    if penalty is None:
        return score
    penalised = jnp.full_like(score, penalty) if mode == "replace" else score + penalty
    return jnp.where(finished, score, penalised)


def kl_shaped_rewards(
    score: jax.Array, kl: jax.Array, mask: jax.Array, kl_coef: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-token rewards [R, N]: ``-kl_coef * kl`` on every response token, plus ``score`` on the last.

    Returns (rewards, non_score_rewards); both 0 outside ``mask``. A row without response tokens (a
    padding row) gets nothing.
    """
    mask = mask.astype(jnp.float32)
    non_score = -kl_coef * kl * mask
    last = llama.last_token_index(mask)
    has_tokens = jnp.any(mask > 0, axis=-1)
    at_last = jax.nn.one_hot(last, mask.shape[-1], dtype=jnp.float32) * has_tokens[:, None]
    return non_score + at_last * score[:, None], non_score


def clipped_policy_loss(
    logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, clip_ratio: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token clipped surrogate loss, whether clipping was active, and the ratio.

    ``max(-A r, -A clip(r, 1 - c, 1 + c))`` with ``r = exp(logp - logp_old)``: the pessimistic bound
    of Schulman et al. (2017). A token counts as clipped when the clipped term is the larger one.
    """
    ratio = jnp.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    return jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32), ratio


def clipped_value_loss(
    values: jax.Array, old_values: jax.Array, returns: jax.Array, value_clip: float
) -> tuple[jax.Array, jax.Array]:
    """Per-token ``0.5 max((v - R)^2, (v_clip - R)^2)`` with ``v_clip`` within +-c of the old value.

    Returns the loss and whether the clipped term was the larger one.
    """
    clipped_values = old_values + jnp.clip(values - old_values, -value_clip, value_clip)
    unclipped_sq = jnp.square(values - returns)
    clipped_sq = jnp.square(clipped_values - returns)
    return 0.5 * jnp.maximum(unclipped_sq, clipped_sq), (clipped_sq > unclipped_sq).astype(jnp.float32)


def explained_variance(predictions: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var(targets - predictions) / Var(targets) over masked elements (1: perfect, <= 0: useless)."""
    return 1.0 - ops.safe_divide(ops.masked_var(targets - predictions, mask), ops.masked_var(targets, mask))


def adaptive_kl_coef(
    kl_coef: jax.Array, observed_kl: jax.Array, *, target: float, horizon: int, batch_rows: int
) -> jax.Array:
    """Ziegler et al. (2019): move the coefficient proportionally to KL/target - 1, clipped to +-20%."""
    error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * batch_rows / horizon)
