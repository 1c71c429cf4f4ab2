"""Online DPO's pairs: each group's best and worst response, their batch, log-probs and the DPO loss.

Pure functions of arrays (``pick_pairs`` on the host, the rest on the device), used by the trainer
in ``easyppo.algorithms.online_dpo``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from easyppo.algorithms.dpo_losses import LossSettings, preference_losses
from easyppo.algorithms.rl import forward, rollout, scoring
from easyppo.models import llama
from easyppo.models.sequences import Sequences


def pick_pairs(scores: np.ndarray, real_rows: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chosen rows, rejected rows, pair mask) [prompts]: each group's best and worst response (the
    first of equals); a group whose scores all agree, or a padding group, gives no pair (mask 0)."""
    groups = scores.reshape(-1, group)
    offsets = np.arange(groups.shape[0]) * group
    chosen, rejected = offsets + groups.argmax(-1), offsets + groups.argmin(-1)
    real = real_rows.reshape(-1, group)[:, 0]
    return (
        chosen.astype(np.int32),
        rejected.astype(np.int32),
        (real & (groups.max(-1) > groups.min(-1))).astype(np.float32),
    )


def pair_batch(sampled: rollout.Rollout, chosen: jax.Array, rejected: jax.Array, pair_mask: jax.Array) -> dict:
    """The pairs' sequences, stacked [B, 2, ...] (chosen first), with their response masks."""
    seqs = scoring.sequences_of(sampled)
    take = lambda x: jnp.stack([jnp.take(x, chosen, axis=0), jnp.take(x, rejected, axis=0)], axis=1)
    return {
        "input_ids": take(seqs.input_ids),
        "attention_mask": take(seqs.attention_mask),
        "position_ids": take(seqs.position_ids),
        "response_ids": take(sampled.response_ids),
        "response_mask": take(sampled.response_mask).astype(jnp.float32),
        "pair_mask": pair_mask,
    }


def pair_logprobs(
    policy, params, pairs: dict, *, chunk_size: int, average: bool, rng: jax.Array | None = None
) -> jax.Array:
    """Summed (or, ``average``, mean) response log-probs [B, 2] of each pair's two responses (``rng``:
    adapter dropout's key, in training)."""
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    seqs = Sequences(flat(pairs["input_ids"]), flat(pairs["attention_mask"]), flat(pairs["position_ids"]))
    mask = flat(pairs["response_mask"])
    logprobs = forward.response_logprobs(
        policy, params, seqs, flat(pairs["response_ids"]), chunk_size=chunk_size, rng=rng
    )
    sums, counts = jnp.sum(logprobs * mask, -1), jnp.sum(mask, -1)
    out = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0) if average else sums
    return out.reshape(-1, 2)


def loss_fn(params, batch, rng, *, policy: llama.LlamaConfig, options: LossSettings):
    """Summed DPO-family loss over the real pairs, with (sum, count) metrics. ``options``: online DPO's
    (its loss settings, ``logprob_chunk_size``)."""
    logps = pair_logprobs(
        policy, params, batch, chunk_size=options.logprob_chunk_size, average=options.averages_logprobs, rng=rng
    )
    reference = batch.get("reference_logps") if options.uses_reference else None
    pair_losses, rewards = preference_losses(options, logps, reference)
    weight = batch["pair_mask"]
    pairs = jnp.sum(weight)
    total = lambda x: (jnp.sum(x * weight), pairs)
    loss_sum = jnp.sum(pair_losses * weight)
    return loss_sum, {
        "loss": (loss_sum, pairs),
        "implicit_accuracy": total((rewards[:, 0] > rewards[:, 1]).astype(jnp.float32)),
        "reward_margin": total(rewards[:, 0] - rewards[:, 1]),
        "logps_chosen": total(logps[:, 0]),
        "logps_rejected": total(logps[:, 1]),
    }
