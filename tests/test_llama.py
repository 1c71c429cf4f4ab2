"""Specification of the LLaMA model: padding, KV cache, layer layouts, heads and configs.

Numerical parity with Hugging Face ``transformers`` lives in test_hf_parity.py; these tests pin the
properties the algorithms rely on.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easyppo.models import llama

TINY = llama.get_preset("tiny")


def _params(config, kind="causal_lm", seed=0):
    return llama.init_params(config, kind, jax.random.key(seed))


def _apply(model, params, *args, **kwargs):
    """Jitted apply: one compilation is much cheaper than dispatching every op eagerly."""
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a, **kwargs))(params, *args)


def _random_tokens(seed, shape, vocab=TINY.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(3, vocab, size=shape), jnp.int32)


def _left_pad(rows, length, pad_id=0):
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = row
        mask[i, length - len(row) :] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


def test_left_padded_batch_gives_the_logits_of_the_unpadded_sequences():
    model, params = llama.make_model(TINY), _params(TINY)
    rows = [np.asarray(_random_tokens(1, (5,))), np.asarray(_random_tokens(2, (9,)))]
    ids, mask = _left_pad(rows, 9)
    batched = _apply(model, params, ids, mask)
    for i, row in enumerate(rows):
        alone = _apply(model, params, jnp.asarray(row)[None])
        np.testing.assert_allclose(batched[i, 9 - len(row) :], alone[0], atol=2e-5)


def test_right_padding_does_not_change_the_real_tokens_logits():
    model, params = llama.make_model(TINY), _params(TINY)
    row = _random_tokens(3, (6,))
    ids = jnp.concatenate([row, jnp.zeros((3,), jnp.int32)])[None]
    mask = jnp.asarray([[1] * 6 + [0] * 3])
    padded = _apply(model, params, ids, mask)
    alone = _apply(model, params, row[None])
    np.testing.assert_allclose(padded[0, :6], alone[0], atol=2e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_kv_cache_decoding_token_by_token_reproduces_the_full_forward(scan_layers):
    config = TINY.replace(scan_layers=scan_layers)
    model, params = llama.make_model(config), _params(config)
    prompts = [np.asarray(_random_tokens(4, (3,))), np.asarray(_random_tokens(5, (6,)))]
    prompt_ids, prompt_mask = _left_pad(prompts, 6)
    continuation = _random_tokens(6, (2, 5))
    full_ids = jnp.concatenate([prompt_ids, continuation], axis=1)
    full_mask = jnp.concatenate([prompt_mask, jnp.ones_like(continuation)], axis=1)
    expected = _apply(model, params, full_ids, full_mask)

    cache = llama.init_cache(config, batch_size=2, max_length=16)
    logits, cache = _apply(model, params, prompt_ids, prompt_mask, None, cache)
    real = np.asarray(prompt_mask, bool)  # padding positions have no meaningful logits
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(expected[:, :6])[real], atol=2e-5)
    decode = jax.jit(lambda p, tok, c: model.apply({"params": p}, tok, cache=c))
    for t in range(continuation.shape[1]):
        step_logits, cache = decode(params, continuation[:, t : t + 1], cache)
        np.testing.assert_allclose(step_logits[:, 0], expected[:, 6 + t], atol=2e-5)
    assert int(cache.index) == 11
    np.testing.assert_array_equal(cache.mask[:, :11], full_mask)
    assert not cache.mask[:, 11:].any()


def test_cache_positions_count_only_real_tokens():
    prompt_mask = jnp.asarray([[0, 0, 1, 1], [1, 1, 1, 1]])
    cache = llama.init_cache(TINY, batch_size=2, max_length=8)
    cache = cache.replace(mask=cache.mask.at[:, :4].set(prompt_mask.astype(bool)), index=jnp.int32(4))
    positions = llama.default_position_ids(jnp.ones((2, 1), jnp.int32), cache)
    np.testing.assert_array_equal(positions, [[2], [4]])


def test_scanned_and_unrolled_layers_compute_the_same_function():
    unrolled, scanned = TINY, TINY.replace(scan_layers=True)
    params = _params(unrolled)
    stacked = llama.stack_layers(params, TINY.num_hidden_layers)
    expected_shapes = jax.tree.map(lambda x: x.shape, _params(scanned))
    assert jax.tree.map(lambda x: x.shape, stacked) == expected_shapes
    ids = _random_tokens(7, (2, 7))
    a = _apply(llama.make_model(unrolled), params, ids)
    b = _apply(llama.make_model(scanned), stacked, ids)
    np.testing.assert_allclose(a, b, atol=1e-5)
    roundtrip = llama.unstack_layers(stacked, TINY.num_hidden_layers)
    jax.tree.map(np.testing.assert_array_equal, roundtrip, params)


@pytest.mark.parametrize("remat,scan_layers", [("full", False), ("dots", True)])
def test_remat_changes_neither_outputs_nor_gradients(remat, scan_layers):
    base = TINY.replace(scan_layers=scan_layers)
    params = _params(base)
    ids = _random_tokens(8, (2, 6))

    def loss(config, p):
        return jnp.mean(llama.make_model(config).apply({"params": p}, ids) ** 2)

    plain_loss, plain_grads = jax.jit(jax.value_and_grad(lambda p: loss(base, p)))(params)
    remat_loss, remat_grads = jax.jit(jax.value_and_grad(lambda p: loss(base.replace(remat=remat), p)))(params)
    np.testing.assert_allclose(plain_loss, remat_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain_grads, remat_grads)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_fused_projections_keep_the_parameters_outputs_and_gradients(scan_layers):
    plain = TINY.replace(scan_layers=scan_layers, num_key_value_heads=2)  # GQA: q wider than k and v
    fused = plain.replace(fuse_projections=True)
    params = _params(plain)
    assert jax.tree.map(jnp.shape, _params(fused)) == jax.tree.map(jnp.shape, params)
    ids = _random_tokens(9, (2, 6))

    def loss(config, p):
        return jnp.mean(llama.make_model(config).apply({"params": p}, ids) ** 2)

    plain_loss, plain_grads = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
    fused_loss, fused_grads = jax.jit(jax.value_and_grad(lambda p: loss(fused, p)))(params)
    np.testing.assert_allclose(plain_loss, fused_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain_grads, fused_grads)


def test_reward_is_the_value_at_the_last_real_token_for_either_padding_side():
    reward_model = llama.make_model(TINY, "reward")
    value_model = llama.make_model(TINY, "value")
    params = _params(TINY, "reward")
    row = np.asarray(_random_tokens(9, (5,)))
    left_ids, left_mask = _left_pad([row], 8)
    right_ids = jnp.asarray(np.concatenate([row, np.zeros(3, np.int32)]))[None]
    right_mask = jnp.asarray([[1] * 5 + [0] * 3])
    alone_values = _apply(value_model, params, jnp.asarray(row)[None])
    for ids, mask in ((left_ids, left_mask), (right_ids, right_mask)):
        score = _apply(reward_model, params, ids, mask)
        assert score.shape == (1,)
        np.testing.assert_allclose(score[0], alone_values[0, -1], atol=2e-5)
    assert alone_values.shape == (1, 5)


def test_reward_and_value_models_share_one_parameter_tree():
    reward = jax.tree.map(lambda x: (x.shape, x.dtype), _params(TINY, "reward"))
    value = jax.tree.map(lambda x: (x.shape, x.dtype), _params(TINY, "value"))
    assert reward == value
    assert reward["score"]["kernel"][0] == (TINY.hidden_size, 1)
    assert "lm_head" not in reward


def test_tied_embeddings_reuse_the_input_embedding_as_the_output_layer():
    config = TINY.replace(tie_word_embeddings=True)
    params = _params(config)
    assert "lm_head" not in params
    model = llama.make_model(config)
    ids = _random_tokens(10, (1, 4))
    hidden = _apply(model, params, ids, method="hidden_states")
    logits = _apply(model, params, ids)
    embedding = params["model"]["embed_tokens"]["embedding"]
    np.testing.assert_allclose(logits, np.einsum("btd,vd->btv", hidden, embedding), atol=1e-5)
    np.testing.assert_array_equal(llama.output_embedding(params, config), embedding.T)


def test_output_embedding_times_hidden_states_gives_the_logits():
    model, params = llama.make_model(TINY), _params(TINY)
    ids = _random_tokens(11, (2, 5))
    hidden = _apply(model, params, ids, method="hidden_states")
    logits = _apply(model, params, ids)
    np.testing.assert_allclose(hidden @ llama.output_embedding(params, TINY), logits, atol=1e-5)


def test_llama3_rope_frequencies_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = llama.get_preset("llama3.1_8b")
    hf_config = transformers.LlamaConfig(**config.to_hf_dict())
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, device="cpu")
    np.testing.assert_allclose(llama.rope_inverse_frequencies(config), inv_freq.numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("llama2_7b", 6_738_415_616),
        ("llama2_13b", 13_015_864_320),
        ("llama2_70b", 68_976_648_192),
        ("llama3_8b", 8_030_261_248),
        ("llama3_70b", 70_553_706_496),
    ],
)
def test_presets_have_the_published_parameter_counts(preset, expected):
    assert llama.get_preset(preset).num_params() == expected


def test_parameter_count_formula_matches_the_initialised_tree():
    for config in (TINY, TINY.replace(tie_word_embeddings=True)):
        shapes = jax.eval_shape(lambda: _params(config))  # noqa: B023 (called at once)
        assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) == config.num_params()


def test_bfloat16_compute_stays_close_to_float32():
    params = _params(TINY)
    ids = _random_tokens(12, (2, 8))
    f32 = _apply(llama.make_model(TINY), params, ids)
    bf16 = _apply(llama.make_model(TINY.replace(dtype="bfloat16")), params, ids)
    assert bf16.dtype == jnp.float32  # logits always come back in float32
    assert float(jnp.max(jnp.abs(f32 - bf16))) < 0.05 * float(jnp.max(jnp.abs(f32)))


def test_bfloat16_parameters_are_created_in_bfloat16():
    params = _params(TINY.replace(param_dtype="bfloat16", dtype="bfloat16"))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}


def test_hf_config_dict_round_trips():
    for name in ("tiny", "llama2_13b", "llama3.1_70b"):
        config = llama.get_preset(name)
        assert llama.LlamaConfig.from_hf_dict(config.to_hf_dict()) == config


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
        ({"remat": "everything"}, "remat='everything'"),
        ({"dtype": "bfloat"}, "bfloat"),
    ],
)
def test_invalid_configs_fail_with_the_offending_field(changes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        TINY.replace(**changes)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="llama3_8b"):
        llama.get_preset("llama4_8b")


def test_unsupported_hf_configs_are_rejected():
    with pytest.raises(ValueError, match="attention_bias"):
        llama.LlamaConfig.from_hf_dict({**TINY.to_hf_dict(), "attention_bias": True})
    with pytest.raises(ValueError, match="model_type"):
        llama.LlamaConfig.from_hf_dict({**TINY.to_hf_dict(), "model_type": "mistral"})
