"""Scoring a rollout once, with the parameters that sampled it: the experience the update learns from.

Two programs, so that host-side reward functions can run while the device works:

* ``judge``: the policy's log-probs of the sampled tokens (the *old* log-probs, stored and never
  recomputed before an update: that is what lets clipping act), the frozen reference's log-probs,
  the critic's values and the reward model's score;
* ``assemble``: the row scores (reward sources, missing-EOS and overlong penalties), the per-token KL
  penalty, the advantages (GAE or a group estimator), the sampler/trainer importance correction and
  the loss mask, into an ``Experience`` plus metrics.

``score`` runs both as one program, for runs whose every reward is computed on the device.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from easyppo.algorithms.rl import forward, losses
from easyppo.algorithms.rl.advantages import gae_advantages, group_advantages
from easyppo.algorithms.rl.options import RLOptions
from easyppo.algorithms.rl.rollout import Rollout, RolloutSamples
from easyppo.core import ops, sharding
from easyppo.models.sequences import Sequences, join_prompt_and_response
from easyppo.rewards.sources import parse_reward_spec

PyTree = Any


@flax.struct.dataclass
class Experience:
    """Everything the update reads, one row per rollout row (all [R, ...], rows sharded over the batch axes)."""

    input_ids: jax.Array  # int32 [R, P + N] prompt + response
    attention_mask: jax.Array  # int32 [R, P + N]
    position_ids: jax.Array  # int32 [R, P + N]
    response_ids: jax.Array  # int32 [R, N]
    mask: jax.Array  # float32 [R, N], the tokens the loss counts (response tokens, minus any dropped)
    old_logprobs: jax.Array  # float32 [R, N], the policy's when it sampled
    advantages: jax.Array  # float32 [R, N]
    is_weights: jax.Array  # float32 [R, N], sampler/trainer importance weights (1 without correction)
    reference_logprobs: jax.Array | None  # float32 [R, N] for a KL term in the loss, else None
    old_values: jax.Array | None  # float32 [R, N], the critic's when it sampled; None without a critic
    returns: jax.Array | None  # float32 [R, N], the critic's targets; None without a critic

    @property
    def sequences(self) -> Sequences:
        return Sequences(self.input_ids, self.attention_mask, self.position_ids)


@flax.struct.dataclass
class Judgement:
    """What the models say about a rollout, before any reward is combined (``judge``)."""

    logprobs: jax.Array  # [R, N] the old log-probs: the policy's at the rollout's parameters
    recomputed: jax.Array | None  # [R, N] the trainer's own pass (= logprobs when recomputed); None: skipped
    entropy: jax.Array | None  # [R, N]; None when the policy pass was skipped
    reference_logprobs: jax.Array | None  # [R, N]; None when no KL term needs the reference
    values: jax.Array | None  # [R, N]; None without a critic
    reward_model_score: jax.Array | None  # [R]; None when the reward model is not a reward source


class Scored(NamedTuple):
    experience: Experience
    samples: RolloutSamples  # the rollout with each row's scores, for the samples table
    metrics: dict[str, jax.Array]  # rollout statistics, replicated


def sequences_of(rollout: Rollout) -> Sequences:
    return join_prompt_and_response(
        rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask
    )


def scoring_temperature(options: RLOptions) -> float:
    """The temperature every log-prob of the update is taken at (``logprob_temperature``)."""
    sampling = options.sampling
    return 1.0 if options.logprob_temperature == "one" or sampling.greedy else sampling.temperature


def judge(
    policy_params: PyTree,
    value_params: PyTree,
    frozen: dict,
    rollout: Rollout,
    *,
    models: forward.Models,
    options: RLOptions,
    recompute_policy: bool = True,
) -> Judgement:
    """The policy's, the reference's, the critic's and the reward model's view of ``rollout``.

    ``frozen`` holds the frozen models' parameters (``{"reference": ..., "reward": ...}``, either may
    be None when the run does not use it). The old log-probs are the sampler's when
    ``options.old_logprobs == "sampler"`` (same weights, same precision); ``recompute_policy`` then
    says whether to run the policy anyway, to measure the sampler/trainer mismatch.
    """
    seqs = sequences_of(rollout)
    chunk, temperature = options.logprob_chunk_size, scoring_temperature(options)
    recomputed = entropy = None
    if recompute_policy or options.old_logprobs == "recompute":
        recomputed, entropy = forward.response_logprobs(
            models.policy,
            policy_params,
            seqs,
            rollout.response_ids,
            chunk_size=chunk,
            with_entropy=True,
            temperature=temperature,
        )
    logprobs = rollout.sampler_logprobs if options.old_logprobs == "sampler" else recomputed
    reference = None
    if frozen.get("reference") is not None:
        reference = forward.response_logprobs(
            models.policy, frozen["reference"], seqs, rollout.response_ids, chunk_size=chunk, temperature=temperature
        )
    values = None
    if value_params is not None:
        values = forward.response_values(models.value, value_params, seqs, rollout.response_ids.shape[1])
    rm_score = None
    if frozen.get("reward") is not None:
        rm_score = forward.sequence_scores(models.reward, frozen["reward"], seqs)
    return Judgement(
        logprobs=logprobs,
        recomputed=recomputed,
        entropy=entropy,
        reference_logprobs=reference,
        values=values,
        reward_model_score=rm_score,
    )


def row_scores(judged: Judgement, rollout: Rollout, host_scores: jax.Array, options: RLOptions):
    """(raw score, penalised score) [R]: the weighted reward sources, then the missing-EOS and the
    overlong penalties."""
    raw = host_scores.astype(jnp.float32)
    if judged.reward_model_score is not None:
        raw = raw + parse_reward_spec(options.rewards).get("reward_model", 0.0) * judged.reward_model_score
    penalised = losses.apply_missing_eos_penalty(
        raw, rollout.finished, options.missing_eos_penalty, options.missing_eos_mode
    )
    lengths = jnp.sum(rollout.response_mask, axis=-1)
    penalised = penalised + losses.overlong_penalty(
        lengths,
        max_new_tokens=options.sampling.max_new_tokens,
        buffer=options.overlong_buffer,
        penalty=options.overlong_penalty,
    )
    return raw, penalised


def assemble(
    judged: Judgement, rollout: Rollout, host_scores: jax.Array, kl_coef: jax.Array, *, options: RLOptions
) -> Scored:
    """Scores -> rewards -> advantages -> the experience and the rollout's metrics (module doc).

    ``host_scores`` [R] is the weighted sum of the host reward sources (zeros when there are none).
    """
    o = options
    seqs = sequences_of(rollout)
    mask = rollout.response_mask.astype(jnp.float32)
    raw_score, penalised = row_scores(judged, rollout, host_scores, o)
    if judged.reference_logprobs is not None:
        kl = ops.kl_estimate(judged.logprobs, judged.reference_logprobs, o.kl_estimator) * mask
    else:
        kl = jnp.zeros_like(mask)
    kl_in_reward = kl_coef if (o.kl_coef > 0 or o.adaptive_kl) else jnp.zeros_like(kl_coef)
    rewards, non_score = losses.kl_shaped_rewards(penalised, kl, mask, kl_in_reward)
    if o.uses_critic:
        estimate = gae_advantages(rewards, judged.values, mask, gamma=o.gamma, lam=o.lam, whiten=o.whiten_advantages)
    else:
        estimate = group_advantages(
            penalised,
            non_score,
            mask,
            group_size=o.samples_per_prompt,
            estimator=o.estimator,
            gamma=o.gamma,
            eps=o.std_epsilon,
        )
    correction = losses.importance_correction(
        judged.logprobs, rollout.sampler_logprobs, o.importance_correction, o.importance_cap
    )
    loss_mask = mask * correction.keep
    if o.truncated_responses == "mask":
        loss_mask = loss_mask * rollout.finished.astype(jnp.float32)[:, None]

    experience = Experience(
        input_ids=seqs.input_ids,
        attention_mask=seqs.attention_mask,
        position_ids=seqs.position_ids,
        response_ids=rollout.response_ids,
        mask=loss_mask,
        old_logprobs=judged.logprobs,
        advantages=estimate.advantages,
        is_weights=correction.weights,
        reference_logprobs=judged.reference_logprobs if o.kl_loss_coef > 0 else None,
        old_values=None if judged.values is None else judged.values * mask,
        returns=estimate.returns,
    )
    kl_per_sequence = jnp.sum(kl, axis=-1)
    samples = RolloutSamples(rollout=rollout, raw_score=raw_score, score=penalised, kl=kl_per_sequence)
    metrics = _metrics(judged, rollout, raw_score, penalised, kl, rewards, non_score, estimate, correction, kl_coef, o)
    constrain_rows = lambda x: sharding.constrain(x, P(sharding.BATCH_AXES))
    return Scored(
        experience=jax.tree.map(constrain_rows, experience),
        samples=jax.tree.map(constrain_rows, samples),
        metrics=jax.tree.map(lambda x: sharding.constrain(x, P()), metrics),  # replicated: every host reads them
    )


def _metrics(judged, rollout, raw_score, penalised, kl, rewards, non_score, estimate, correction, kl_coef, o):
    mask = rollout.response_mask.astype(jnp.float32)
    rows = rollout.row_mask
    num_rows = jnp.maximum(jnp.sum(rows), 1.0)
    row_mean = lambda x: jnp.sum(x * rows) / num_rows
    token_mean = lambda x: ops.masked_mean(x, mask)
    finished = rollout.finished.astype(jnp.float32)
    metrics = {
        "score": row_mean(raw_score),
        "score_std": jnp.sqrt(jnp.maximum(row_mean(raw_score**2) - row_mean(raw_score) ** 2, 0.0)),
        "score_penalized": row_mean(penalised),
        "kl_coef": kl_coef,
        "non_score_reward": row_mean(jnp.sum(non_score, axis=-1)),
        "total_reward": row_mean(jnp.sum(rewards, axis=-1)),
        "response_length": row_mean(jnp.sum(mask, axis=-1)),
        "eos_rate": row_mean(finished),
        "truncation_rate": row_mean(1.0 - finished),
        "advantage_mean": token_mean(estimate.advantages),
        "importance_weight": token_mean(correction.weights),
        "importance_ratio_max": jnp.max(jnp.where(mask > 0, correction.ratio, 0.0)),
        "importance_corrected_fraction": token_mean(correction.corrected),
    }
    if judged.recomputed is not None:
        metrics["entropy"] = token_mean(judged.entropy)
        metrics.update(mismatch_metrics(rollout.sampler_logprobs, judged.recomputed, mask))
    if judged.reference_logprobs is not None:
        metrics["kl_per_token"] = token_mean(kl)
        metrics["kl_per_sequence"] = row_mean(jnp.sum(kl, axis=-1))
    if judged.reward_model_score is not None:
        metrics["reward/reward_model"] = row_mean(judged.reward_model_score)
    if estimate.returns is not None:
        metrics["value_mean"] = token_mean(judged.values)
        metrics["return_mean"] = token_mean(estimate.returns)
        metrics["explained_variance"] = losses.explained_variance(judged.values, estimate.returns, mask)
    else:
        groups = penalised.reshape(-1, o.samples_per_prompt)
        real = rows.reshape(-1, o.samples_per_prompt)[:, 0]
        flat = (jnp.max(groups, axis=-1) == jnp.min(groups, axis=-1)).astype(jnp.float32)
        metrics["zero_variance_groups"] = jnp.sum(flat * real) / jnp.maximum(jnp.sum(real), 1.0)
    return metrics


MISMATCH_METRICS = ("logprob_gap", "logprob_gap_max", "sampler_kl")


def mismatch_metrics(sampler_logprobs: jax.Array, trainer_logprobs: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """The sampler/trainer mismatch over the response tokens, whether or not it is corrected."""
    gap = jnp.abs(sampler_logprobs - trainer_logprobs)
    log_ratio = trainer_logprobs - sampler_logprobs
    return {
        "logprob_gap": ops.masked_mean(gap, mask),
        "logprob_gap_max": jnp.max(jnp.where(mask > 0, gap, 0.0)),
        "sampler_kl": ops.masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),  # k3 estimate of KL(sampler || trainer)
    }


def score(
    policy_params: PyTree,
    value_params: PyTree,
    kl_coef: jax.Array,
    frozen: dict,
    rollout: Rollout,
    host_scores: jax.Array,
    *,
    models: forward.Models,
    options: RLOptions,
    recompute_policy: bool = True,
) -> Scored:
    """``judge`` and ``assemble`` as one program."""
    judged = judge(
        policy_params, value_params, frozen, rollout, models=models, options=options, recompute_policy=recompute_policy
    )
    return assemble(judged, rollout, host_scores, kl_coef, options=options)
