"""Specification of easyppo.core.ops, checked against NumPy formulas written out here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easyppo.core import ops

# Ragged right-padded rows plus one row with a hole in the middle and one empty row.
RAGGED_MASK = np.array(
    [
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 1, 0],
        [0, 0, 0, 0, 0, 0],
    ],
    dtype=bool,
)


def np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_token_logprobs(hidden, embedding, targets):
    log_probs = np_log_softmax(np.asarray(hidden, np.float64) @ np.asarray(embedding, np.float64))
    return np.take_along_axis(log_probs, targets[..., None], -1)[..., 0], log_probs


def random_lm_inputs(batch=2, seq_len=7, dim=8, vocab=11, seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, seq_len, dim)).astype(np.float32)
    embedding = rng.normal(size=(dim, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab, size=(batch, seq_len)).astype(np.int32)
    return hidden, embedding, targets


# ------------------------------------------------------------------------------------------------
# Token log-probs
# ------------------------------------------------------------------------------------------------


def test_logprobs_from_logits_is_log_softmax_at_the_target():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32) * 4
    targets = rng.integers(0, 5, size=(2, 3))
    expected = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]

    np.testing.assert_allclose(ops.logprobs_from_logits(logits, targets), expected, rtol=1e-6, atol=1e-6)


def test_logprobs_from_logits_computes_bf16_logits_in_float32():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 3, 50)) * 8, jnp.bfloat16)
    targets = rng.integers(0, 50, size=(2, 3))
    # A bf16 log-softmax would be off by ~1e-2 here.
    exact = np_log_softmax(np.asarray(logits, np.float64))
    expected = np.take_along_axis(exact, targets[..., None], -1)[..., 0]

    got = ops.logprobs_from_logits(logits, targets)

    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_token_logprobs_matches_full_softmax_for_any_chunk_size(chunk_size):
    hidden, embedding, targets = random_lm_inputs(seq_len=7)
    expected, _ = np_token_logprobs(hidden, embedding, targets)

    got = jax.jit(ops.token_logprobs, static_argnames="chunk_size")(hidden, embedding, targets, chunk_size=chunk_size)

    assert got.shape == (2, 7) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_token_logprobs_entropy_matches_numpy():
    hidden, embedding, targets = random_lm_inputs(seq_len=5)
    expected_logp, log_probs = np_token_logprobs(hidden, embedding, targets)
    expected_entropy = -(np.exp(log_probs) * log_probs).sum(-1)

    logp, entropy = ops.token_logprobs(hidden, embedding, targets, chunk_size=2, return_entropy=True)

    np.testing.assert_allclose(logp, expected_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropy, expected_entropy, rtol=1e-5, atol=1e-5)


def test_token_logprobs_gradients_equal_full_logits_gradients():
    hidden, embedding, targets = random_lm_inputs(seq_len=7)
    weights = np.random.default_rng(1).normal(size=targets.shape).astype(np.float32)

    def chunked(h, w):
        logp, entropy = ops.token_logprobs(h, w, targets, chunk_size=3, return_entropy=True)
        return jnp.sum(weights * logp) + 0.3 * jnp.sum(entropy)

    def full(h, w):
        log_probs = jax.nn.log_softmax(h @ w, axis=-1)
        logp = jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
        entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, -1)
        return jnp.sum(weights * logp) + 0.3 * jnp.sum(entropy)

    got = jax.grad(chunked, argnums=(0, 1))(hidden, embedding)
    expected = jax.grad(full, argnums=(0, 1))(hidden, embedding)

    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_token_logprobs_bf16_hidden_multiplies_in_bf16_and_accumulates_in_float32():
    hidden, embedding, targets = random_lm_inputs(dim=64, vocab=32)
    hidden_bf16 = jnp.asarray(hidden, jnp.bfloat16)
    # Products of bf16 numbers are exact in float32, so with float32 accumulation the result equals
    # float64 math on the bf16-rounded inputs; a bf16 accumulator would be off by ~1e-2.
    rounded_embedding = np.asarray(jnp.asarray(embedding, jnp.bfloat16), np.float32)
    expected, _ = np_token_logprobs(np.asarray(hidden_bf16, np.float32), rounded_embedding, targets)

    got = ops.token_logprobs(hidden_bf16, embedding, targets, chunk_size=4)

    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4)


def test_token_logprobs_out_of_range_targets_stay_finite():
    hidden, embedding, targets = random_lm_inputs()
    targets[0, :3] = -100  # the Hugging Face "ignore" label

    got = ops.token_logprobs(hidden, embedding, targets, chunk_size=4)

    assert np.all(np.isfinite(got))


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_token_logprobs_never_holds_full_float32_logits_forward_or_backward():
    batch, seq_len, dim, vocab, chunk = 2, 512, 16, 4096, 32
    full_logits_bytes = batch * seq_len * vocab * 4  # 16 MiB
    args = (
        jax.ShapeDtypeStruct((batch, seq_len, dim), jnp.float32),
        jax.ShapeDtypeStruct((dim, vocab), jnp.float32),
        jax.ShapeDtypeStruct((batch, seq_len), jnp.int32),
    )

    def chunked_loss(h, w, t):
        return jnp.sum(ops.token_logprobs(h, w, t, chunk_size=chunk))

    def full_loss(h, w, t):
        return jnp.sum(ops.logprobs_from_logits(h @ w, t))

    chunked_grad = jax.grad(chunked_loss, argnums=(0, 1))
    full_grad = jax.grad(full_loss, argnums=(0, 1))

    # The measurement can see a full logits buffer: the naive version needs at least one.
    assert _temp_bytes(full_grad, *args) >= full_logits_bytes
    assert _temp_bytes(chunked_loss, *args) < full_logits_bytes / 4
    assert _temp_bytes(chunked_grad, *args) < full_logits_bytes / 4


def test_token_logprobs_rejects_mismatched_shapes():
    hidden, embedding, targets = random_lm_inputs()
    with pytest.raises(ValueError, match="output_embedding must be"):
        ops.token_logprobs(hidden, embedding.T, targets, chunk_size=2)
    with pytest.raises(ValueError, match="targets shape"):
        ops.token_logprobs(hidden, embedding, targets[:, :-1], chunk_size=2)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.token_logprobs(hidden, embedding, targets, chunk_size=0)


def test_shift_for_next_token_pairs_each_position_with_the_following_token():
    input_ids = np.array([[5, 6, 7, 8], [0, 0, 3, 4]])
    loss_mask = np.array([[0, 0, 1, 1], [0, 0, 0, 1]])

    targets, target_mask = ops.shift_for_next_token(input_ids, loss_mask)

    np.testing.assert_array_equal(targets, [[6, 7, 8, 0], [0, 3, 4, 0]])
    np.testing.assert_array_equal(target_mask, [[0, 1, 1, 0], [0, 0, 1, 0]])


# ------------------------------------------------------------------------------------------------
# Masked statistics
# ------------------------------------------------------------------------------------------------


def ragged_values(seed=0):
    return np.random.default_rng(seed).normal(size=RAGGED_MASK.shape).astype(np.float32) * 3 + 1


def test_masked_sum_and_mean_use_only_selected_elements():
    x = ragged_values()
    x_with_junk = np.where(RAGGED_MASK, x, np.nan)  # padding junk must not leak

    assert ops.masked_sum(x_with_junk, RAGGED_MASK) == pytest.approx(x[RAGGED_MASK].sum(), rel=1e-6)
    assert ops.masked_mean(x_with_junk, RAGGED_MASK) == pytest.approx(x[RAGGED_MASK].mean(), rel=1e-6)


def test_masked_mean_along_axis_is_per_row_and_zero_for_empty_rows():
    x = ragged_values()
    expected = [x[i][RAGGED_MASK[i]].mean() if RAGGED_MASK[i].any() else 0.0 for i in range(len(x))]

    np.testing.assert_allclose(ops.masked_mean(x, RAGGED_MASK, axis=-1), expected, rtol=1e-6)
    np.testing.assert_allclose(ops.masked_sum(x, RAGGED_MASK, axis=-1), (x * RAGGED_MASK).sum(-1), rtol=1e-6)


@pytest.mark.parametrize("unbiased, ddof", [(True, 1), (False, 0)])
def test_masked_var_matches_numpy(unbiased, ddof):
    x = ragged_values()

    got = ops.masked_var(x, RAGGED_MASK, unbiased=unbiased)

    assert got == pytest.approx(np.var(x[RAGGED_MASK], ddof=ddof), rel=1e-5)


def test_masked_var_along_axis_matches_numpy_per_row():
    x = ragged_values()
    rows = [0, 1, 3]  # rows with at least two selected elements

    got = ops.masked_var(x, RAGGED_MASK, axis=1)

    np.testing.assert_allclose(got[np.array(rows)], [np.var(x[i][RAGGED_MASK[i]], ddof=1) for i in rows], rtol=1e-5)
    assert got[2] == 0.0 and got[4] == 0.0  # one element, no elements


def test_masked_whiten_gives_zero_mean_unit_variance_on_selected_elements():
    x = ragged_values()
    selected = x[RAGGED_MASK].astype(np.float64)
    expected = (selected - selected.mean()) / np.sqrt(selected.var(ddof=1) + 1e-8)

    got = np.asarray(ops.masked_whiten(x, RAGGED_MASK))

    np.testing.assert_allclose(got[RAGGED_MASK], expected, rtol=1e-5, atol=1e-6)
    assert np.all(got[~RAGGED_MASK] == 0)


def test_masked_whiten_without_mean_shift_only_rescales():
    x = ragged_values()
    selected = x[RAGGED_MASK].astype(np.float64)
    expected = (selected - selected.mean()) / np.sqrt(selected.var(ddof=1) + 1e-8) + selected.mean()

    got = np.asarray(ops.masked_whiten(x, RAGGED_MASK, shift_mean=False))

    np.testing.assert_allclose(got[RAGGED_MASK], expected, rtol=1e-5, atol=1e-6)


def test_masked_statistics_with_all_zero_mask_are_zero_with_finite_gradients():
    x = jnp.asarray(ragged_values())
    empty = np.zeros_like(RAGGED_MASK)

    for stat in (ops.masked_sum, ops.masked_mean, ops.masked_var, ops.masked_whiten):
        value = stat(x, empty)
        grad = jax.grad(lambda v, stat=stat: jnp.sum(stat(v, empty)))(x)
        assert np.all(np.asarray(value) == 0), stat.__name__
        assert np.all(np.asarray(grad) == 0), stat.__name__


# ------------------------------------------------------------------------------------------------
# KL estimators
# ------------------------------------------------------------------------------------------------


def test_kl_estimators_match_their_formulas():
    rng = np.random.default_rng(0)
    logp = np.log(rng.uniform(0.05, 1.0, size=(3, 4)))
    logq = np.log(rng.uniform(0.05, 1.0, size=(3, 4)))
    ratio = np.exp(logq - logp)

    np.testing.assert_allclose(ops.kl_estimate(logp, logq, "k1"), logp - logq, rtol=1e-5)
    np.testing.assert_allclose(ops.kl_estimate(logp, logq, "k2"), 0.5 * (logp - logq) ** 2, rtol=1e-5)
    np.testing.assert_allclose(ops.kl_estimate(logp, logq, "k3"), ratio - 1 - np.log(ratio), rtol=1e-4, atol=1e-7)


def test_k1_and_k3_are_unbiased_for_the_exact_kl_when_sampling_from_p():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    exact_kl = np.sum(p * np.log(p / q))
    samples = np.random.default_rng(0).choice(4, size=200_000, p=p)
    logp, logq = np.log(p)[samples], np.log(q)[samples]

    assert float(jnp.mean(ops.kl_estimate(logp, logq, "k1"))) == pytest.approx(exact_kl, rel=0.02)
    assert float(jnp.mean(ops.kl_estimate(logp, logq, "k3"))) == pytest.approx(exact_kl, rel=0.02)
    assert np.all(np.asarray(ops.kl_estimate(logp, logq, "k3")) >= 0)


def test_kl_estimate_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown kind 'k4'"):
        ops.kl_estimate(jnp.zeros(2), jnp.zeros(2), "k4")


# ------------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------------


def np_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE on each row's real tokens only; the value after the last one is 0."""
    advantages = np.zeros_like(rewards, dtype=np.float64)
    for row in range(rewards.shape[0]):
        steps = np.flatnonzero(mask[row])
        next_value, next_advantage = 0.0, 0.0
        for t in steps[::-1]:
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            next_advantage = delta + gamma * lam * next_advantage
            next_value = values[row, t]
            advantages[row, t] = next_advantage
    returns = np.where(mask, advantages + values, 0.0)
    return advantages, returns


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_numpy_on_ragged_masks(gamma, lam):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=RAGGED_MASK.shape).astype(np.float32)
    values = rng.normal(size=RAGGED_MASK.shape).astype(np.float32)
    expected_adv, expected_ret = np_gae(rewards, values, RAGGED_MASK, gamma, lam)

    advantages, returns = jax.jit(ops.gae)(rewards, values, RAGGED_MASK, gamma, lam)

    np.testing.assert_allclose(advantages, expected_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, expected_ret, rtol=1e-5, atol=1e-5)


def test_gae_ignores_rewards_and_values_after_the_response_end():
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=RAGGED_MASK.shape).astype(np.float32)
    values = rng.normal(size=RAGGED_MASK.shape).astype(np.float32)
    junk_rewards = np.where(RAGGED_MASK, rewards, 1e6)
    junk_values = np.where(RAGGED_MASK, values, -1e6)

    clean = ops.gae(rewards, values, RAGGED_MASK, 1.0, 0.95)
    dirty = ops.gae(junk_rewards, junk_values, RAGGED_MASK, 1.0, 0.95)

    for c, d in zip(clean, dirty, strict=True):
        np.testing.assert_array_equal(c, d)


def test_gae_is_one_reverse_scan_not_an_unrolled_loop():
    shape = (2, 64)
    jaxpr = jax.make_jaxpr(ops.gae)(jnp.zeros(shape), jnp.zeros(shape), jnp.ones(shape), 1.0, 0.95)

    scans = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["reverse"] and scans[0].params["length"] == 64
