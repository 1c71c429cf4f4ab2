"""Scoring a rollout once, with the parameters that sampled it: the experience the update learns from.

One pass computes the policy's log-probs of the sampled tokens (the *old* log-probs, stored and never
recomputed before an update: that is what lets clipping act), the frozen reference's log-probs, the
critic's values and the reward model's score; then the missing-EOS penalty, per-token KL-shaped
rewards and the advantages.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from easyppo.algorithms.rl import forward, losses
from easyppo.algorithms.rl.advantages import gae_advantages
from easyppo.algorithms.rl.options import RLOptions
from easyppo.algorithms.rl.rollout import Rollout, RolloutSamples
from easyppo.core import ops, sharding
from easyppo.models.sequences import Sequences, join_prompt_and_response

PyTree = Any


@flax.struct.dataclass
class Experience:
    """Everything the update reads, one row per rollout row (all [R, ...], rows sharded over the batch axes)."""

    input_ids: jax.Array  # int32 [R, P + N] prompt + response
    attention_mask: jax.Array  # int32 [R, P + N]
    position_ids: jax.Array  # int32 [R, P + N]
    response_ids: jax.Array  # int32 [R, N]
    mask: jax.Array  # float32 [R, N], 1 on the response tokens (the actions)
    old_logprobs: jax.Array  # float32 [R, N], the policy's when it sampled
    old_values: jax.Array  # float32 [R, N], the critic's when it sampled (0 outside the mask)
    advantages: jax.Array  # float32 [R, N]
    returns: jax.Array  # float32 [R, N], the critic's targets

    @property
    def sequences(self) -> Sequences:
        return Sequences(self.input_ids, self.attention_mask, self.position_ids)


class Scored(NamedTuple):
    experience: Experience
    samples: RolloutSamples  # the rollout with each row's scores, for the samples table
    metrics: dict[str, jax.Array]  # rollout statistics, replicated


class FrozenJudgement(NamedTuple):
    reference_logprobs: jax.Array  # [R, N]
    score: jax.Array  # [R], the reward model's


def frozen_judgement(
    frozen: dict, seqs: Sequences, response_ids: jax.Array, *, models: forward.Models, chunk_size: int
) -> FrozenJudgement:
    """The reference's log-probs of the response tokens and the reward model's score of each sequence."""
    return FrozenJudgement(
        reference_logprobs=forward.response_logprobs(
            models.policy, frozen["reference"], seqs, response_ids, chunk_size=chunk_size
        ),
        score=forward.sequence_scores(models.reward, frozen["reward"], seqs),
    )


def score(
    policy_params: PyTree,
    value_params: PyTree,
    kl_coef: jax.Array,
    frozen: dict,
    rollout: Rollout,
    *,
    models: forward.Models,
    options: RLOptions,
) -> Scored:
    """Old log-probs, reference log-probs, values, scores -> rewards and GAE advantages (module doc).

    ``frozen`` holds the reference's and the reward model's parameters (``{"reference", "reward"}``).
    """
    o = options
    num_new = rollout.response_ids.shape[1]
    seqs = join_prompt_and_response(
        rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask
    )
    mask = rollout.response_mask.astype(jnp.float32)
    logprobs, entropy = forward.response_logprobs(
        models.policy, policy_params, seqs, rollout.response_ids, chunk_size=o.logprob_chunk_size, with_entropy=True
    )
    judged = frozen_judgement(frozen, seqs, rollout.response_ids, models=models, chunk_size=o.logprob_chunk_size)
    values = forward.response_values(models.value, value_params, seqs, num_new)
    raw_score = judged.score
    penalised = losses.apply_missing_eos_penalty(raw_score, rollout.finished, o.missing_eos_penalty, o.missing_eos_mode)

    kl = ops.kl_estimate(logprobs, judged.reference_logprobs, o.kl_estimator) * mask
    rewards, non_score = losses.kl_shaped_rewards(penalised, kl, mask, kl_coef)
    estimate = gae_advantages(rewards, values, mask, gamma=o.gamma, lam=o.lam, whiten=o.whiten_advantages)

    constrain_rows = lambda x: sharding.constrain(x, P(sharding.BATCH_AXES))
    experience = Experience(
        input_ids=seqs.input_ids,
        attention_mask=seqs.attention_mask,
        position_ids=seqs.position_ids,
        response_ids=rollout.response_ids,
        mask=mask,
        old_logprobs=logprobs,
        old_values=values * mask,
        advantages=estimate.advantages,
        returns=estimate.returns,
    )
    kl_per_sequence = jnp.sum(kl, axis=-1)
    samples = RolloutSamples(rollout=rollout, raw_score=raw_score, score=penalised, kl=kl_per_sequence)

    rows = rollout.row_mask
    num_rows = jnp.maximum(jnp.sum(rows), 1.0)
    row_mean = lambda x: jnp.sum(x * rows) / num_rows
    token_mean = lambda x: ops.masked_mean(x, mask)
    gap = jnp.abs(rollout.sampler_logprobs - logprobs)
    metrics = {
        "score": row_mean(raw_score),
        "score_std": jnp.sqrt(jnp.maximum(row_mean(raw_score**2) - row_mean(raw_score) ** 2, 0.0)),
        "score_penalized": row_mean(penalised),
        "kl_per_token": token_mean(kl),
        "kl_per_sequence": row_mean(kl_per_sequence),
        "kl_coef": kl_coef,
        "non_score_reward": row_mean(jnp.sum(non_score, axis=-1)),
        "total_reward": row_mean(jnp.sum(rewards, axis=-1)),
        "entropy": token_mean(entropy),
        "response_length": row_mean(jnp.sum(mask, axis=-1)),
        "eos_rate": row_mean(rollout.finished.astype(jnp.float32)),
        "logprob_gap": token_mean(gap),
        "logprob_gap_max": jnp.max(jnp.where(mask > 0, gap, 0.0)),
        "value_mean": token_mean(values),
        "return_mean": token_mean(estimate.returns),
        "advantage_mean": token_mean(estimate.advantages),
        "explained_variance": losses.explained_variance(values, estimate.returns, mask),
    }
    # Replicated, so every host of a multi-host job can read them.
    metrics = jax.tree.map(lambda x: sharding.constrain(x, P()), metrics)
    return Scored(
        experience=jax.tree.map(constrain_rows, experience),
        samples=jax.tree.map(constrain_rows, samples),
        metrics=metrics,
    )
