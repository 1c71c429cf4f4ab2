"""Numerical building blocks shared by every algorithm: token log-probs, masked statistics, KL, GAE.

Everything here is a pure function of arrays and traces under `jax.jit`. Masks are 0/1 arrays (bool
or numeric) broadcastable against the values they select; positions where the mask is 0 never
influence a result, even when the values there are NaN or inf (padding positions often hold junk).
Statistics reduce over *all* masked elements of the batch, which under `jit` on a sharded global
array means over the global batch, across devices and hosts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from easyppo.core.logprobs import gather_last as _gather_last
from easyppo.core.logprobs import token_logprobs

__all__ = ["token_logprobs"]  # re-exported: algorithms call ops.token_logprobs

KLKind = Literal["k1", "k2", "k3"]
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")


# --------------------------------------------------------------------------------------------------
# Token log-probabilities
# --------------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) for every position of `logits` [..., V], computed in float32.

    Use this when the logits already exist (e.g. in generation); when only hidden states and the
    output embedding are at hand, `token_logprobs` avoids ever building the full logits tensor.
    Target ids outside [0, V) are clipped into range, so ignored positions may hold any id (e.g.
    -100) as long as they are masked out afterwards.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return _gather_last(log_probs, targets)


def shift_for_next_token(input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Align targets with the positions that predict them: position t predicts token t + 1.

    Args:
      input_ids: [B, T] token ids fed to the model.
      loss_mask: [B, T] 1 where a *token* should be scored (e.g. assistant tokens).

    Returns:
      (targets, target_mask), both [B, T]: targets[:, t] = input_ids[:, t + 1] and
      target_mask[:, t] = loss_mask[:, t + 1]. The last position predicts nothing; it gets target id
      0 and mask 0. Feed the model's hidden states at every position together with these to
      `token_logprobs`, then reduce with `target_mask`.
    """
    targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    target_mask = jnp.pad(loss_mask[:, 1:], ((0, 0), (0, 1)))
    return targets, target_mask


class TargetWindow(NamedTuple):
    """The W consecutive target positions of each row that a loss reads (see easyppo.data.windows).

    ``start`` [B] is the first position, ``targets`` [B, W] the ids they predict and ``mask`` [B, W] 1
    where a position is scored. W is a static shape: the LM head projects only these positions.
    """

    start: jax.Array
    targets: jax.Array
    mask: jax.Array


def target_window(batch: Mapping[str, jax.Array], prefix: str = "") -> TargetWindow:
    """The batch's ``{prefix}window_*`` arrays, or, for a batch made without them, the full width
    (every position, from ``{prefix}input_ids`` and ``{prefix}loss_mask``)."""
    if f"{prefix}window_targets" in batch:
        return TargetWindow(*(batch[f"{prefix}window_{name}"] for name in ("start", "targets", "mask")))
    targets, mask = shift_for_next_token(batch[f"{prefix}input_ids"], batch[f"{prefix}loss_mask"])
    return TargetWindow(jnp.zeros(targets.shape[:1], jnp.int32), targets, mask)


def window_logprobs(
    hidden: jax.Array, output_embedding: jax.Array, window: TargetWindow, *, chunk_size: int
) -> jax.Array:
    """log p(target) [B, W] at the window's positions of hidden states [B, T, D]: only W of the T
    positions are projected onto the vocabulary."""
    width = window.targets.shape[1]
    if width != hidden.shape[1]:
        hidden = jax.vmap(lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, width, axis=0))(
            hidden, window.start.astype(jnp.int32)
        )
    return token_logprobs(hidden, output_embedding, window.targets, chunk_size=chunk_size)


# --------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator where denominator > 0, else 0 (e.g. a mean over no tokens).

    The denominator is replaced before dividing, not just the result afterwards, so the gradient
    stays finite as well.
    """
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1), 0)


Axis = int | tuple[int, ...] | None


def masked_sum(x: jax.Array, mask: jax.Array, axis: Axis = None) -> jax.Array:
    """Sum of x where mask is set (over everything by default, or along `axis`)."""
    return jnp.sum(jnp.where(_as_bool(mask), x, 0), axis=axis)


def masked_count(x: jax.Array, mask: jax.Array, axis: Axis = None) -> jax.Array:
    """Number of selected elements, as float32 (so it can divide and be summed across batches)."""
    return jnp.sum(jnp.broadcast_to(_as_bool(mask), jnp.shape(x)).astype(jnp.float32), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis: Axis = None) -> jax.Array:
    """Mean over the selected elements; 0 where nothing is selected (never NaN)."""
    return safe_divide(masked_sum(x, mask, axis), masked_count(x, mask, axis))


def masked_var(
    x: jax.Array,
    mask: jax.Array,
    axis: Axis = None,
    *,
    unbiased: bool = True,
) -> jax.Array:
    """Variance over the selected elements; 0 for fewer than two (unbiased) or zero elements."""
    mean = masked_mean(x, mask, axis)
    if axis is not None:
        mean = jnp.expand_dims(mean, axis)
    sum_sq = masked_sum(jnp.square(x - mean), mask, axis)
    count = masked_count(x, mask, axis)
    if unbiased:
        count = count - 1.0
    return safe_divide(sum_sq, count)


def masked_whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over all selected elements of the batch; masked-out positions become 0.

    With `shift_mean=False` the mean is added back, so only the scale changes (used when the sign of
    a quantity carries meaning, e.g. rewards).
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(_as_bool(mask), whitened, 0)


def _as_bool(mask: jax.Array) -> jax.Array:
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


# --------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------


def kl_estimate(logp: jax.Array, logq: jax.Array, kind: KLKind = "k1") -> jax.Array:
    """Per-token estimate of KL(p || q) from log-probs of tokens sampled from p.

    logp are the policy's log-probs of the sampled tokens, logq the reference model's. With
    r = logq - logp (so E_p[exp r] = 1):
      k1 = -r              unbiased, high variance, can be negative per token;
      k2 = r^2 / 2         biased, low variance, always >= 0;
      k3 = exp(r) - 1 - r  unbiased and always >= 0 (Schulman's estimator).
    """
    log_ratio = logq.astype(jnp.float32) - logp.astype(jnp.float32)
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    if kind == "k3":
        # expm1 keeps precision when the policies are close and r is tiny.
        return jnp.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl_estimate: unknown kind {kind!r}; expected one of {KL_KINDS}")


# --------------------------------------------------------------------------------------------------
# Generalised advantage estimation
# --------------------------------------------------------------------------------------------------


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    gamma: float | jax.Array,
    lam: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimates and value targets over response tokens.

    Args:
      rewards, values: [B, T] per-token reward and value estimate.
      mask: [B, T] 1 on the response tokens (the actions). Masked positions are not time steps:
        the recursion skips them, and the value after a row's last real token is 0 (terminal), so
        right padding after EOS needs no special handling.
      gamma: discount; lam: GAE lambda.

    Returns:
      (advantages, returns), float32 [B, T], 0 at masked positions; returns = advantages + values.

    The recursion runs as a reverse `lax.scan` over time, so compile time does not depend on T:
      delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next,
    where "next" is the next real token of the same row (V_next = A_next = 0 after the last).
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.ndim != 2:
        raise ValueError(
            "gae: rewards, values and mask must all be [B, T]; got shapes "
            f"{rewards.shape}, {values.shape}, {mask.shape}"
        )
    rewards = rewards.astype(jnp.float32)
    values = values.astype(jnp.float32)
    is_step = _as_bool(mask)
    gamma = jnp.asarray(gamma, jnp.float32)
    lam = jnp.asarray(lam, jnp.float32)

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, real = inputs
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        # A masked position passes the carry through unchanged and contributes nothing.
        carry = (
            jnp.where(real, value, next_value),
            jnp.where(real, advantage, next_advantage),
        )
        return carry, jnp.where(real, advantage, 0.0)

    terminal = jnp.zeros(rewards.shape[0], jnp.float32)
    time_major = (rewards.T, values.T, is_step.T)  # scan over the leading (time) axis
    _, advantages = lax.scan(step, (terminal, terminal), time_major, reverse=True)
    advantages = advantages.T
    returns = jnp.where(is_step, advantages + values, 0.0)
    return advantages, returns
