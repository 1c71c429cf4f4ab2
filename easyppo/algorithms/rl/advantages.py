"""Advantage estimators: per-token rewards (and a critic's values) -> what each token's log-prob is
weighted by in the policy loss, and the critic's targets.

Every estimator returns ``Advantages``; PPO uses GAE with its critic. Estimators without a critic
(group baselines over the samples of one prompt) return no returns and join here behind the same
result type.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

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
