"""Advantage estimators: rewards (and a critic's values) -> what each token's log-prob is weighted by.

Every estimator returns ``Advantages``. PPO uses GAE with its critic; the group estimators take the
baseline from the other samples of the same prompt (a *group*: ``samples_per_prompt`` adjacent rows,
see ``rl.rollout``) and need no critic, so they return no returns:

    grpo          (r - mean_g) / (std_g + eps)     Shao et al. 2024 (DeepSeekMath), arXiv:2402.03300
    dr_grpo       r - mean_g                       Liu et al. 2025 (Dr.GRPO), arXiv:2503.20783
    rloo          r - mean of the other G-1        Ahmadian et al. 2024, arXiv:2402.14740
    reinforce_pp  per-token returns of the KL-shaped rewards with r - mean_g at the last token,
                  whitened over the batch         Hu 2025 (REINFORCE++), arXiv:2501.03262

``std_g`` is the sample standard deviation (ddof 1), as TRL and verl compute it. The sequence
reward ``r`` of the first three is the score plus the row's summed KL penalty (0 without one).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from easyppo.core import ops


class Advantages(NamedTuple):
    advantages: jax.Array  # [R, N], 0 outside the response mask
    returns: jax.Array | None  # [R, N] value targets; None for an estimator without a critic


def gae_advantages(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float, lam: float, whiten: bool
) -> Advantages:
    """GAE(gamma, lambda) by a reverse ``lax.scan`` (``easyppo.core.ops.gae``); returns = advantages +
    values; with ``whiten``, advantages are whitened over the batch's response tokens."""
    advantages, returns = ops.gae(rewards, values, mask, gamma, lam)
    if whiten:
        advantages = ops.masked_whiten(advantages, mask)
    return Advantages(advantages=advantages, returns=returns)


def group_baseline(rewards: jax.Array, group_size: int, estimator: str, *, eps: float = 1e-6) -> jax.Array:
    """Per-row advantages [R] of the sequence rewards [R] for ``grpo``, ``dr_grpo`` and ``rloo``.

    Rows ``g * G .. g * G + G - 1`` are the samples of one prompt (``G = group_size``).
    """
    groups = rewards.astype(jnp.float32).reshape(-1, group_size)
    mean = jnp.mean(groups, axis=-1, keepdims=True)
    if estimator == "grpo":
        std = jnp.std(groups, axis=-1, keepdims=True, ddof=1)
        out = (groups - mean) / (std + eps)
    elif estimator == "dr_grpo":
        out = groups - mean
    elif estimator == "rloo":
        out = (groups - mean) * group_size / (group_size - 1)
    else:
        raise ValueError(f"group_baseline: unknown estimator {estimator!r}")
    return out.reshape(-1)


def group_advantages(
    scores: jax.Array,
    token_rewards: jax.Array,
    mask: jax.Array,
    *,
    group_size: int,
    estimator: str,
    gamma: float,
    eps: float,
) -> Advantages:
    """Advantages [R, N] of a group estimator (module doc).

    Args:
      scores: [R] each row's score (reward sources, penalties), without KL.
      token_rewards: [R, N] the per-token KL penalty (``-kl_coef * kl``; zeros without one).
      mask: [R, N] response tokens.
    """
    mask = mask.astype(jnp.float32)
    if estimator == "reinforce_pp":
        centred = scores - jnp.repeat(jnp.mean(scores.reshape(-1, group_size), axis=-1), group_size)
        last = jax.nn.one_hot(jnp.maximum(jnp.sum(mask, axis=-1) - 1, 0).astype(jnp.int32), mask.shape[-1])
        rewards = (token_rewards + last * centred[:, None]) * mask
        returns, _ = ops.gae(rewards, jnp.zeros_like(rewards), mask, gamma, 1.0)
        return Advantages(advantages=ops.masked_whiten(returns, mask), returns=None)
    sequence_rewards = scores + jnp.sum(token_rewards * mask, axis=-1)
    per_row = group_baseline(sequence_rewards, group_size, estimator, eps=eps)
    return Advantages(advantages=per_row[:, None] * mask, returns=None)
