"""The chunked log-prob's hand-written backward equals autodiff of the naive full-logits formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easyppo.core.logprobs import token_logprobs


def _naive(hidden, weight, targets):
    logits = jnp.einsum("btd,dv->btv", hidden, weight.astype(hidden.dtype), preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, jnp.clip(targets, 0, weight.shape[-1] - 1)[..., None], axis=-1)[..., 0]


def _inputs(seed=0, batch=3, seq=11, dim=16, vocab=37, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(keys[0], (batch, seq, dim), jnp.float32).astype(dtype)
    weight = jax.random.normal(keys[1], (dim, vocab), jnp.float32) * 0.5
    targets = jax.random.randint(keys[2], (batch, seq), 0, vocab)
    targets = targets.at[0, -1].set(-100)  # an ignored position holding an out-of-range id
    cotangent = jax.random.normal(keys[3], (batch, seq), jnp.float32)
    return hidden, weight, targets, cotangent


@pytest.mark.parametrize("chunk_size", [1, 4, 11, 64])
def test_values_and_both_gradients_match_autodiff_of_the_naive_formula(chunk_size):
    hidden, weight, targets, cotangent = _inputs()
    fast = lambda h, w: jnp.sum(token_logprobs(h, w, targets, chunk_size=chunk_size) * cotangent)
    naive = lambda h, w: jnp.sum(_naive(h, w, targets) * cotangent)
    np.testing.assert_allclose(
        token_logprobs(hidden, weight, targets, chunk_size=chunk_size),
        _naive(hidden, weight, targets),
        rtol=1e-6,
        atol=1e-6,
    )
    got, want = jax.grad(fast, argnums=(0, 1))(hidden, weight), jax.grad(naive, argnums=(0, 1))(hidden, weight)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_bfloat16_hidden_states_give_gradients_close_to_autodiffs_in_the_master_dtype():
    hidden, weight, targets, cotangent = _inputs(dtype=jnp.bfloat16)
    fast = lambda h, w: jnp.sum(token_logprobs(h, w, targets, chunk_size=4) * cotangent)
    naive = lambda h, w: jnp.sum(_naive(h, w, targets) * cotangent)
    got, want = jax.grad(fast, argnums=(0, 1))(hidden, weight), jax.grad(naive, argnums=(0, 1))(hidden, weight)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32  # each in its input's dtype
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=3e-2, atol=3e-2)


def test_it_differentiates_under_jit():
    hidden, weight, targets, cotangent = _inputs(seed=1)
    loss = jax.jit(lambda h, w: jnp.sum(token_logprobs(h, w, targets, chunk_size=3) * cotangent))
    grads = jax.grad(loss, argnums=(0, 1))(hidden, weight)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_the_entropy_path_still_differentiates():
    hidden, weight, targets, _ = _inputs(seed=2)
    loss = lambda h: jnp.sum(token_logprobs(h, weight, targets, chunk_size=4, return_entropy=True)[1])
    naive = lambda h: jnp.sum(-jnp.sum(jax.nn.softmax(h @ weight) * jax.nn.log_softmax(h @ weight), -1))
    np.testing.assert_allclose(jax.grad(loss)(hidden), jax.grad(naive)(hidden), rtol=1e-4, atol=1e-5)
