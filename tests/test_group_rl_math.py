"""The group family's formulas, each against an independent NumPy version: the advantage estimators,
the loss aggregations (and that gradient accumulation and data sharding do not change them), the
clip-higher surrogate, the importance correction, the overlong penalty and dynamic sampling's choice."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easyppo.algorithms.rl import advantages, dynamic_sampling, forward, losses
from easyppo.algorithms.rl.options import GroupRLOptions
from easyppo.algorithms.rl.scoring import Experience
from easyppo.algorithms.rl.update import policy_loss_fn
from easyppo.core import grad_accum, sharding
from easyppo.models import llama

RNG = np.random.default_rng(12)


# ------------------------------------------------------------------------------- estimators


def _numpy_group_advantage(rewards: np.ndarray, group: int, estimator: str, eps: float = 1e-6) -> np.ndarray:
    out = np.empty_like(rewards, dtype=np.float64)
    for start in range(0, len(rewards), group):
        g = rewards[start : start + group].astype(np.float64)
        for i in range(group):
            others = np.delete(g, i)
            if estimator == "grpo":
                out[start + i] = (g[i] - g.mean()) / (np.std(g, ddof=1) + eps)
            elif estimator == "dr_grpo":
                out[start + i] = g[i] - g.mean()
            elif estimator == "rloo":
                out[start + i] = g[i] - others.mean()
    return out


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_baselines_match_their_formulas(estimator):
    rewards = RNG.normal(size=12).astype(np.float32)
    got = advantages.group_baseline(jnp.asarray(rewards), 4, estimator)
    np.testing.assert_allclose(got, _numpy_group_advantage(rewards, 4, estimator), rtol=1e-5, atol=1e-5)


def test_group_advantages_broadcast_over_the_response_and_include_the_kl_penalty():
    scores = np.array([1.0, 0.0, 0.0, 1.0], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], np.float32)
    kl_penalty = RNG.normal(size=(4, 3)).astype(np.float32) * 0.1
    out = advantages.group_advantages(
        jnp.asarray(scores),
        jnp.asarray(kl_penalty),
        jnp.asarray(mask),
        group_size=2,
        estimator="dr_grpo",
        gamma=1.0,
        eps=1e-6,
    )
    sequence = scores + (kl_penalty * mask).sum(-1)
    expected = _numpy_group_advantage(sequence, 2, "dr_grpo")[:, None] * mask
    np.testing.assert_allclose(out.advantages, expected, rtol=1e-5, atol=1e-6)
    assert out.returns is None


def test_reinforce_pp_returns_are_whitened_discounted_sums_of_kl_shaped_rewards_with_a_group_baseline():
    group, gamma = 2, 0.9
    scores = np.array([2.0, 0.0, 1.0, 1.5], np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], np.float32)
    kl_penalty = RNG.normal(size=(4, 3)).astype(np.float32) * 0.1 * mask
    out = advantages.group_advantages(
        jnp.asarray(scores),
        jnp.asarray(kl_penalty),
        jnp.asarray(mask),
        group_size=group,
        estimator="reinforce_pp",
        gamma=gamma,
        eps=1e-6,
    )
    centred = scores - np.repeat(scores.reshape(-1, group).mean(-1), group)
    returns = np.zeros_like(mask)
    for row in range(4):
        length = int(mask[row].sum())
        rewards = kl_penalty[row, :length].copy()
        rewards[length - 1] += centred[row]
        running = 0.0
        for t in reversed(range(length)):
            running = rewards[t] + gamma * running
            returns[row, t] = running
    valid = mask > 0
    whitened = (returns - returns[valid].mean()) / np.sqrt(returns[valid].var(ddof=1) + 1e-8) * mask
    np.testing.assert_allclose(out.advantages, whitened, rtol=1e-4, atol=1e-5)


def test_options_refuse_a_group_of_one_and_an_unknown_estimator():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        GroupRLOptions(rewards="numeric", samples_per_prompt=1)
    with pytest.raises(ValueError, match="advantage_estimator"):
        GroupRLOptions(rewards="numeric", advantage_estimator="ppo")
    with pytest.raises(ValueError, match="rewards"):
        GroupRLOptions(rewards="numeric,nope")


# ---------------------------------------------------------------------- per-token functions


def test_clip_higher_uses_separate_bounds_and_reports_which_side_clipped():
    logp, old, adv = (RNG.normal(size=(6, 8)).astype(np.float32) * s for s in (0.4, 0.4, 1.0))
    terms = losses.clipped_policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), 0.2, 0.28)
    r = np.exp(logp - old)
    np.testing.assert_allclose(terms.loss, np.maximum(-adv * r, -adv * np.clip(r, 0.8, 1.28)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(terms.clipped_low) > 0, (adv < 0) & (r < 0.8))
    np.testing.assert_array_equal(np.asarray(terms.clipped_high) > 0, (adv > 0) & (r > 1.28))


@pytest.mark.parametrize("mode", ["none", "tis", "mask"])
def test_importance_correction_weights_and_masks_match_their_formulas(mode):
    trainer, sampler = RNG.normal(size=(4, 7)).astype(np.float32), RNG.normal(size=(4, 7)).astype(np.float32)
    out = losses.importance_correction(jnp.asarray(trainer), jnp.asarray(sampler), mode, 2.0)
    w = np.exp(trainer - sampler)
    np.testing.assert_allclose(out.ratio, w, rtol=1e-5)
    if mode == "tis":
        np.testing.assert_allclose(out.weights, np.minimum(w, 2.0), rtol=1e-5)
        np.testing.assert_array_equal(out.keep, 1.0)
        np.testing.assert_array_equal(np.asarray(out.corrected) > 0, w > 2.0)
    elif mode == "mask":
        np.testing.assert_array_equal(out.weights, 1.0)
        np.testing.assert_array_equal(np.asarray(out.keep) > 0, (w >= 0.5) & (w <= 2.0))
    else:
        np.testing.assert_array_equal(out.weights, 1.0)
        np.testing.assert_array_equal(out.corrected, 0.0)


def test_the_overlong_penalty_is_zero_before_the_buffer_and_linear_to_the_limit():
    got = losses.overlong_penalty(jnp.asarray([10, 12, 14, 16]), max_new_tokens=16, buffer=4, penalty=1.0)
    np.testing.assert_allclose(got, [0.0, 0.0, -0.5, -1.0])
    np.testing.assert_array_equal(
        losses.overlong_penalty(jnp.asarray([16]), max_new_tokens=16, buffer=0, penalty=1.0), 0.0
    )


def _numpy_aggregate(per_token, mask, mode, divisor):
    if mode == "token-mean":
        return (per_token * mask).sum() / mask.sum()
    rows = mask.sum(-1) > 0
    if mode == "seq-mean-token-mean":
        return ((per_token * mask).sum(-1)[rows] / mask.sum(-1)[rows]).mean()
    return ((per_token * mask).sum(-1)[rows] / divisor).mean()


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_loss_aggregations_match_their_formulas(mode):
    per_token = RNG.normal(size=(6, 5)).astype(np.float32)
    mask = (RNG.random((6, 5)) < 0.6).astype(np.float32)
    mask[2] = 0  # a row without tokens counts in no mode
    total, count = losses.aggregate(jnp.asarray(per_token), jnp.asarray(mask), mode, 5)
    np.testing.assert_allclose(float(total) / float(count), _numpy_aggregate(per_token, mask, mode, 5), rtol=1e-5)


# --------------------------------------------- accumulation and sharding leave every mode exact

MODEL = llama.get_preset("tiny", num_hidden_layers=1, pad_token_id=3, max_position_embeddings=32)


def _experience(rows: int = 8, prompt_len: int = 4, new: int = 6) -> Experience:
    rng = np.random.default_rng(3)
    ids = rng.integers(4, MODEL.vocab_size, (rows, prompt_len + new)).astype(np.int32)
    lengths = np.array([1, 6, 2, 5, 3, 6, 4, 1])[:rows]  # very different lengths per microbatch
    mask = (np.arange(new)[None, :] < lengths[:, None]).astype(np.float32)
    attention = np.concatenate([np.ones((rows, prompt_len), np.int32), mask.astype(np.int32)], axis=1)
    positions = np.broadcast_to(np.arange(prompt_len + new, dtype=np.int32), ids.shape).copy()
    return Experience(
        input_ids=ids,
        attention_mask=attention,
        position_ids=positions,
        response_ids=ids[:, prompt_len:],
        mask=mask,
        old_logprobs=rng.normal(size=(rows, new)).astype(np.float32) * 0.1 - 6.0,
        advantages=rng.normal(size=(rows, new)).astype(np.float32) * mask,
        is_weights=rng.uniform(0.5, 1.5, (rows, new)).astype(np.float32),
        reference_logprobs=rng.normal(size=(rows, new)).astype(np.float32) * 0.1 - 6.0,
        old_values=None,
        returns=None,
    )


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_every_aggregation_gives_the_whole_batch_gradient_with_accumulation_and_on_a_sharded_mesh(mode):
    options = GroupRLOptions(
        rewards="numeric",
        loss_aggregation=mode,
        kl_loss_coef=0.1,
        entropy_coef=0.01,
        logprob_chunk_size=4,
        clip_ratio_high=0.28,
    )
    params = llama.init_params(MODEL, "causal_lm", jax.random.key(0))
    experience = _experience()
    loss_fn = functools.partial(policy_loss_fn, models=forward.Models(policy=MODEL), options=options)

    def gradient(num_microbatches, batch):
        return jax.jit(
            lambda p, b: grad_accum.accumulate_gradients(loss_fn, p, b, jax.random.key(0), num_microbatches)
        )(params, batch)

    whole, whole_metrics = gradient(1, experience)
    # The whole-batch loss, by formula, is what the gradient is the gradient of.
    for k in (2, 4):
        grads, metrics = gradient(k, experience)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7), grads, whole)
        np.testing.assert_allclose(metrics["loss"], whole_metrics["loss"], rtol=1e-5)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
    with jax.set_mesh(mesh):
        sharded_batch = sharding.global_rows(jax.tree.map(np.asarray, experience), mesh)
        grads, metrics = gradient(2, sharded_batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7), grads, whole)


# ------------------------------------------------------------------------------- dynamic sampling


def test_dynamic_sampling_keeps_exactly_the_groups_whose_rewards_differ():
    rewards = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 1, 0, 0], np.float32)  # groups of 3
    real = np.array([1] * 9 + [0] * 3, bool)  # the last group pads a partial batch
    np.testing.assert_array_equal(dynamic_sampling.informative_groups(rewards, real, 3), [False, True, False, False])


def test_refills_are_a_pure_function_of_seed_step_and_round():
    a = dynamic_sampling.refill_positions(100, 8, seed=1, step=5, round_index=1)
    np.testing.assert_array_equal(a, dynamic_sampling.refill_positions(100, 8, seed=1, step=5, round_index=1))
    assert not np.array_equal(a, dynamic_sampling.refill_positions(100, 8, seed=1, step=5, round_index=2))
    assert len(set(a.tolist())) == 8 and all(0 <= p < 100 for p in a)


def test_a_short_batch_is_completed_with_dropped_groups_and_says_how_many():
    chosen, short = dynamic_sampling.select_groups([(0, 1), (1, 0)], [(0, 0), (0, 2)], 3)
    assert chosen == [(0, 1), (1, 0), (0, 0)] and short == 1
