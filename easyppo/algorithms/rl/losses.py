"""RL's pure per-token functions: rewards, clipped surrogates, importance weights, loss aggregation, KL control.

Each takes arrays and plain numbers and returns arrays; nothing here knows a model or a config.
"""

from __future__ import annotations

from typing import NamedTuple

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


class PolicyLossTerms(NamedTuple):
    loss: jax.Array  # [R, N] per-token surrogate loss
    clipped_low: jax.Array  # [R, N] 1 where the lower clip bound is active (ratio < 1 - c_low, A < 0)
    clipped_high: jax.Array  # [R, N] 1 where the upper clip bound is active (ratio > 1 + c_high, A > 0)
    ratio: jax.Array  # [R, N]


def clipped_policy_loss(
    logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, clip_low: float, clip_high: float
) -> PolicyLossTerms:
    """Per-token clipped surrogate ``max(-A r, -A clip(r, 1 - c_low, 1 + c_high))``, ``r = exp(logp - logp_old)``.

    The pessimistic bound of Schulman et al. (2017); separate bounds are DAPO's clip-higher (Yu et al.
    2025, arXiv:2503.14476), which lets low-probability tokens rise further. A token counts as clipped
    when the clipped term is the larger one (its gradient is then zero).
    """
    ratio = jnp.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    active = clipped > unclipped
    return PolicyLossTerms(
        loss=jnp.maximum(unclipped, clipped),
        clipped_low=(active & (ratio < 1.0)).astype(jnp.float32),
        clipped_high=(active & (ratio > 1.0)).astype(jnp.float32),
        ratio=ratio,
    )


class ImportanceCorrection(NamedTuple):
    weights: jax.Array  # [R, N] multiplies each token's policy loss (1 without tis)
    keep: jax.Array  # [R, N] 0 for tokens the mask variant drops (1 otherwise)
    ratio: jax.Array  # [R, N] pi_trainer(old) / pi_sampler, before capping
    corrected: jax.Array  # [R, N] 1 where the weight was capped (tis) or the token dropped (mask)


def importance_correction(
    trainer_logprobs: jax.Array, sampler_logprobs: jax.Array, mode: str, cap: float
) -> ImportanceCorrection:
    """Correcting for a sampler whose log-probs differ from the trainer's (another precision or kernel).

    The tokens were drawn from the sampler's distribution but the loss assumes the trainer's, so each
    token is reweighted by ``w = pi_trainer / pi_sampler`` at the rollout's parameters:
    ``tis`` (truncated importance sampling, Yao et al. 2025 "Your efficient RL framework secretly
    brings you off-policy RL training") uses ``min(w, C)``; ``mask`` keeps the loss unweighted but
    drops the tokens with ``w`` outside ``[1/C, C]``; ``none`` leaves both at 1.
    """
    ratio = jnp.exp(trainer_logprobs - sampler_logprobs)
    ones = jnp.ones_like(ratio)
    if mode == "tis":
        return ImportanceCorrection(jnp.minimum(ratio, cap), ones, ratio, (ratio > cap).astype(jnp.float32))
    if mode == "mask":
        keep = ((ratio >= 1.0 / cap) & (ratio <= cap)).astype(jnp.float32)
        return ImportanceCorrection(ones, keep, ratio, 1.0 - keep)
    if mode == "none":
        return ImportanceCorrection(ones, ones, ratio, jnp.zeros_like(ratio))
    raise ValueError(f"importance_correction: unknown mode {mode!r}")


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str, length_divisor: int) -> tuple[jax.Array, jax.Array]:
    """A per-token loss as the (sum, count) pair gradient accumulation divides once (core.grad_accum).

    * ``token-mean``: every token of the update's batch weighs the same: (sum over tokens, tokens).
    * ``seq-mean-token-mean``: each row's token mean, averaged over rows (the original GRPO): (sum of
      row means, rows with tokens). Short responses weigh more per token.
    * ``seq-mean-token-sum-norm``: each row's token sum over a constant ``length_divisor``, averaged
      over rows (Dr.GRPO, Liu et al. 2025, arXiv:2503.20783): no length bias.

    Because the count is returned rather than divided here, the result over k microbatches (and over
    data shards) equals the result over the whole batch in every mode.
    """
    mask = mask.astype(jnp.float32)
    row_tokens = jnp.sum(mask, axis=-1)
    row_sums = jnp.sum(per_token * mask, axis=-1)
    has_tokens = (row_tokens > 0).astype(jnp.float32)
    if mode == "token-mean":
        return jnp.sum(row_sums), jnp.sum(row_tokens)
    if mode == "seq-mean-token-mean":
        return jnp.sum(ops.safe_divide(row_sums, row_tokens)), jnp.sum(has_tokens)
    if mode == "seq-mean-token-sum-norm":
        return jnp.sum(row_sums) / length_divisor, jnp.sum(has_tokens)
    raise ValueError(f"aggregate: unknown mode {mode!r}")


def overlong_penalty(lengths: jax.Array, *, max_new_tokens: int, buffer: int, penalty: float) -> jax.Array:
    """DAPO's soft overlong punishment [R]: 0 up to ``max_new_tokens - buffer`` tokens, then falling
    linearly to ``-penalty`` at ``max_new_tokens`` (0 everywhere when ``buffer`` is 0)."""
    if buffer <= 0:
        return jnp.zeros_like(lengths, dtype=jnp.float32)
    excess = lengths.astype(jnp.float32) - (max_new_tokens - buffer)
    return -penalty * jnp.clip(excess / buffer, 0.0, 1.0)


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
