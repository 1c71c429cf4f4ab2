"""Specification of the sampler: one sampling step, then whole rollouts on a converted tiny model.

References are independent of the code under test: NumPy for the sampling distributions (a
loop-based top-k / top-p written from their definitions), ``transformers``' own ``generate`` for
greedy decoding, and a plain full forward pass (the trainer's view) for the rollout log-probs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easyppo.core import sharding
from easyppo.models import generation, llama, partitioning
from easyppo.weights import huggingface

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EOS, PAD = 2, 0
HF_CONFIG = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=EOS,
    pad_token_id=PAD,
)
NEW_TOKENS = 10
PROMPT_LENGTHS = (3, 7, 5, 1)  # left-padded to 7: every row starts at a different position


# --------------------------------------------------------------------------- NumPy references


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _reference_kept_tokens(logits, temperature, top_k, top_p):
    """Ids of the processed distribution's support, from the definitions (float64, loops)."""
    z = np.asarray(logits, np.float64) / temperature
    ranked = list(np.argsort(-z, kind="stable"))
    if top_k:
        ranked = ranked[:top_k]
    probs = _softmax(z[ranked])
    kept, mass = [], 0.0
    for token, p in zip(ranked, probs):
        kept.append(int(token))
        mass += p
        if mass >= top_p:
            break
    return kept


def _reference_distribution(logits, temperature, top_k, top_p):
    """The full processed distribution [V]: renormalised over the kept tokens, exactly 0 elsewhere."""
    z = np.asarray(logits, np.float64) / temperature
    kept = _reference_kept_tokens(logits, temperature, top_k, top_p)
    probs = np.zeros_like(z)
    probs[kept] = _softmax(z[kept])
    return probs


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    return z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))


# Jitted once per sampling config: cheaper than dispatching every op of the step eagerly.
_sample_step = jax.jit(generation.sample_next_token, static_argnames="sampling")


def _sample_many(logits_row, sampling, num_samples=20000, seed=0):
    """``num_samples`` independent draws from one logits row (one batched call)."""
    logits = jnp.tile(jnp.asarray(logits_row, jnp.float32), (num_samples, 1))
    return np.asarray(_sample_step(logits, jax.random.key(seed), sampling=sampling).tokens)


def _frequencies(tokens, vocab):
    return np.bincount(tokens, minlength=vocab) / len(tokens)


# Six tokens with well separated probabilities (so no draw sits on a top-p boundary), shuffled so
# that "most likely" is not "lowest id".
HAND_PROBS = np.array([0.06, 0.40, 0.04, 0.25, 0.10, 0.15])
HAND_LOGITS = np.log(HAND_PROBS).astype(np.float32) + 3.0  # an offset changes nothing
SAMPLING = generation.SamplingConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
# Five standard errors of a frequency estimated from 20000 draws is at most 0.018.
FREQUENCY_ATOL = 0.018


# ------------------------------------------------------------------------------- one step


def test_greedy_step_takes_the_argmax_with_its_temperature_one_logprob():
    logits = np.random.default_rng(0).normal(size=(4, 9)).astype(np.float32)
    out = _sample_step(jnp.asarray(logits), jax.random.key(0), sampling=dataclasses.replace(SAMPLING, greedy=True))
    expected = logits.argmax(-1)
    np.testing.assert_array_equal(out.tokens, expected)
    np.testing.assert_allclose(out.logprobs, _log_softmax(logits)[np.arange(4), expected], atol=1e-6)
    np.testing.assert_array_equal(out.processed_logprobs, 0.0)  # a point mass


def test_sampling_draws_from_the_softmax_of_the_temperature_scaled_logits():
    sampling = dataclasses.replace(SAMPLING, temperature=0.5)
    freq = _frequencies(_sample_many(HAND_LOGITS, sampling), 6)
    np.testing.assert_allclose(freq, _softmax(HAND_LOGITS / 0.5), atol=FREQUENCY_ATOL)


def test_top_k_never_emits_a_token_outside_the_k_most_likely():
    sampling = dataclasses.replace(SAMPLING, top_k=3)
    freq = _frequencies(_sample_many(HAND_LOGITS, sampling), 6)
    excluded = [0, 2, 4]  # probabilities 0.06, 0.04, 0.10: not among the three largest
    np.testing.assert_array_equal(freq[excluded], 0.0)
    np.testing.assert_allclose(freq, _reference_distribution(HAND_LOGITS, 1.0, 3, 1.0), atol=FREQUENCY_ATOL)


def test_top_p_keeps_only_the_smallest_set_whose_mass_reaches_p():
    # Sorted: 0.40, 0.25, 0.15 | 0.10, 0.06, 0.04. The first three sum to 0.80 >= 0.7; two would not.
    sampling = dataclasses.replace(SAMPLING, top_p=0.7)
    freq = _frequencies(_sample_many(HAND_LOGITS, sampling), 6)
    np.testing.assert_array_equal(freq[[0, 2, 4]], 0.0)
    np.testing.assert_allclose(freq, HAND_PROBS * [0, 1, 0, 1, 0, 1] / 0.80, atol=FREQUENCY_ATOL)


def test_top_p_below_the_top_token_probability_keeps_only_the_top_token():
    processed = generation.processed_logits(jnp.asarray(HAND_LOGITS[None]), dataclasses.replace(SAMPLING, top_p=0.05))
    np.testing.assert_array_equal(np.isfinite(processed[0]), HAND_PROBS.max() == HAND_PROBS)


@pytest.mark.parametrize("changes", [dict(top_k=2), dict(top_p=0.6)])
def test_tokens_tied_with_the_last_kept_one_are_kept(changes):
    # Probabilities 0.53, 0.20, 0.20, 0.07. Two tokens reach 0.6, but the third ties the second.
    logits = jnp.asarray([[2.0, 1.0, 1.0, 0.0]])
    processed = generation.processed_logits(logits, dataclasses.replace(SAMPLING, **changes))
    np.testing.assert_array_equal(np.isfinite(processed[0]), [True, True, True, False])


def test_tokens_already_at_minus_infinity_stay_excluded_and_leave_top_p_exact():
    logits = np.array([-np.inf, np.log(0.5), -np.inf, np.log(0.3), np.log(0.2)])  # probabilities 0, .5, 0, .3, .2
    processed = generation.processed_logits(
        jnp.asarray(logits[None], jnp.float32), dataclasses.replace(SAMPLING, top_p=0.75)
    )
    np.testing.assert_array_equal(np.isfinite(processed[0]), [False, True, False, True, False])


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 5, 1.0), (1.0, 0, 0.9), (0.7, 20, 0.8), (1.5, 0, 0.5), (0.3, 1, 1.0), (1.0, 500, 0.95)],
)
def test_processed_distribution_matches_the_reference_definition(temperature, top_k, top_p):
    logits = np.random.default_rng(1).normal(scale=2.0, size=(8, 64)).astype(np.float32)
    sampling = dataclasses.replace(SAMPLING, temperature=temperature, top_k=top_k, top_p=top_p)
    processed = np.asarray(jax.jit(generation.processed_logits, static_argnames="sampling")(logits, sampling=sampling))
    for row, processed_row in zip(logits, processed):
        expected = _reference_distribution(row, temperature, top_k, top_p)
        np.testing.assert_array_equal(np.isneginf(processed_row), expected == 0)  # exactly excluded
        np.testing.assert_allclose(np.exp(_log_softmax(processed_row)), expected, atol=1e-6)


def test_sampled_step_reports_raw_and_processed_logprobs_of_the_drawn_token():
    logits = np.random.default_rng(2).normal(scale=2.0, size=(16, 32)).astype(np.float32)
    sampling = dataclasses.replace(SAMPLING, temperature=0.6, top_k=10, top_p=0.9)
    out = _sample_step(jnp.asarray(logits), jax.random.key(3), sampling=sampling)
    rows = np.arange(16)
    tokens = np.asarray(out.tokens)
    np.testing.assert_allclose(out.logprobs, _log_softmax(logits)[rows, tokens], atol=1e-5)
    processed = np.stack([_reference_distribution(row, 0.6, 10, 0.9) for row in logits])
    np.testing.assert_allclose(out.processed_logprobs, np.log(processed[rows, tokens]), atol=1e-5)


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(max_new_tokens=0), "sampling.max_new_tokens"),
        (dict(temperature=0.0), "sampling.greedy=True"),
        (dict(top_k=-1), "sampling.top_k"),
        (dict(top_p=0.0), "sampling.top_p"),
        (dict(top_p=1.5), "sampling.top_p"),
        (dict(stop_token_ids=(5, -1)), "sampling.stop_token_ids"),
    ],
)
def test_invalid_sampling_configs_fail_naming_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        generation.SamplingConfig.from_config(changes)
    with pytest.raises(ValueError, match=message.removeprefix("sampling.")):
        generation.SamplingConfig(**changes)


def test_default_config_dict_builds_the_default_sampling_config():
    assert generation.SamplingConfig.from_config(generation.default_config()) == generation.SamplingConfig()


def test_unknown_sampling_config_key_is_rejected():
    with pytest.raises(ValueError, match="top_q"):
        generation.SamplingConfig.from_config({"top_q": 0.9})


def test_stop_ids_are_the_models_eos_then_the_extra_stop_tokens():
    config = llama.get_preset("tiny")
    sampling = generation.SamplingConfig(stop_token_ids=[7, config.eos_token_id, 9])
    assert sampling.stop_ids(config) == (config.eos_token_id, 7, 9)
    assert dataclasses.replace(sampling, stop_at_eos=False).stop_ids(config) == (7, config.eos_token_id, 9)
    with pytest.raises(ValueError, match="eos_token_id"):
        sampling.stop_ids(config.replace(eos_token_id=None))


# ----------------------------------------------------------------------- rollouts: the model


def _left_padded_prompts(lengths=PROMPT_LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), PAD, np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = rng.integers(3, HF_CONFIG["vocab_size"], size=length)
        mask[row, width - length :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def hf_model():
    """A tiny random ``transformers`` Llama with O(1) logits (std-0.3 weights), so argmax ties are rare."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=generator)
            else:
                p.normal_(0.0, 0.3, generator=generator)
    return model


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory):
    """``(config, params)`` of the same model, through easyppo's converter."""
    directory = tmp_path_factory.mktemp("hf_tiny")
    hf_model.save_pretrained(directory)
    config, _, params = huggingface.load_hf(str(directory))
    return config, params


def _hf_greedy(model, ids, mask, new_tokens, stop_ids):
    """``transformers`` greedy decoding, padded with PAD to exactly ``new_tokens`` columns."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=list(stop_ids),
            pad_token_id=PAD,
        )
    response = out[:, ids.shape[1] :].numpy()
    return np.pad(response, ((0, 0), (0, new_tokens - response.shape[1])), constant_values=PAD)


def _generate(converted, ids, mask, sampling, seed=0):
    config, params = converted
    return generation.generate(
        params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed), model_config=config, sampling=sampling
    )


def _mask_through_first_stop(tokens, stop_ids):
    """1 up to and including each row's first stop token (everything if there is none)."""
    is_stop = np.isin(tokens, stop_ids)
    first = np.where(is_stop.any(-1), is_stop.argmax(-1), tokens.shape[1])
    return (np.arange(tokens.shape[1])[None] <= first[:, None]).astype(np.int32)


GREEDY = generation.SamplingConfig(max_new_tokens=NEW_TOKENS, greedy=True, stop_at_eos=False)


@pytest.fixture(scope="module")
def hf_greedy_tokens(hf_model):
    ids, mask = _left_padded_prompts()
    return _hf_greedy(hf_model, ids, mask, NEW_TOKENS, stop_ids=[])


def test_greedy_generation_equals_transformers_on_a_left_padded_batch(converted, hf_greedy_tokens):
    ids, mask = _left_padded_prompts()
    out = _generate(converted, ids, mask, GREEDY)
    np.testing.assert_array_equal(out.tokens, hf_greedy_tokens)
    np.testing.assert_array_equal(out.response_mask, 1)
    assert not np.asarray(out.finished).any()


def test_greedy_generation_stops_at_eos_and_extra_stop_tokens_like_transformers(converted, hf_model, hf_greedy_tokens):
    # Stop ids taken from the unconstrained greedy responses, so rows 0 and 1 stop at different steps.
    extra_stops = (int(hf_greedy_tokens[0, 2]), int(hf_greedy_tokens[1, 5]))
    sampling = dataclasses.replace(GREEDY, stop_at_eos=True, stop_token_ids=extra_stops, pad_token_id=PAD)
    ids, mask = _left_padded_prompts()
    expected = _hf_greedy(hf_model, ids, mask, NEW_TOKENS, stop_ids=[EOS, *extra_stops])
    out = _generate(converted, ids, mask, sampling)
    np.testing.assert_array_equal(out.tokens, expected)
    expected_mask = _mask_through_first_stop(expected, [EOS, *extra_stops])
    np.testing.assert_array_equal(out.response_mask, expected_mask)
    assert expected_mask[0].sum() == 3 and expected_mask[1].sum() <= 6  # the stops really acted
    np.testing.assert_array_equal(out.finished, np.isin(expected, [EOS, *extra_stops]).any(-1))


def test_sampling_at_near_zero_temperature_equals_greedy_decoding(converted, hf_greedy_tokens):
    ids, mask = _left_padded_prompts()
    sampling = dataclasses.replace(GREEDY, greedy=False, temperature=1e-6)
    out = _generate(converted, ids, mask, sampling, seed=5)
    np.testing.assert_array_equal(out.tokens, hf_greedy_tokens)


def test_right_padded_prompts_generate_what_left_padded_prompts_do(converted, hf_greedy_tokens):
    ids, mask = _left_padded_prompts()
    right_ids = np.stack([np.roll(row, -int((m == 0).sum())) for row, m in zip(ids, mask)])
    right_mask = np.stack([np.roll(m, -int((m == 0).sum())) for m in mask])
    out = _generate(converted, right_ids, right_mask, GREEDY)
    np.testing.assert_array_equal(out.tokens, hf_greedy_tokens)


# ---------------------------------------------------------------- rollouts: sampling and stops

# Stopping on every id below 12 (about a tenth of the vocabulary) ends most rows early.
ROLLOUT_STOPS = tuple(range(3, 12))
ROLLOUT = generation.SamplingConfig(
    max_new_tokens=NEW_TOKENS, temperature=0.8, top_k=20, top_p=0.9, stop_token_ids=ROLLOUT_STOPS, pad_token_id=PAD
)


@pytest.fixture(scope="module")
def rollout(converted):
    """A sampled rollout of 8 prompts plus the trainer's logits for it (one full forward pass)."""
    config, params = converted
    ids, mask = _left_padded_prompts(PROMPT_LENGTHS * 2, seed=1)
    out = jax.tree.map(np.asarray, _generate(converted, ids, mask, ROLLOUT, seed=7))
    full_ids = np.concatenate([ids, out.tokens], axis=1)
    full_mask = np.concatenate([mask, out.response_mask], axis=1)
    logits = jax.jit(lambda p, i, m: llama.LlamaForCausalLM(config).apply({"params": p}, i, m))(
        params, full_ids, full_mask
    )
    # Position t of the full sequence predicts token t + 1: the response logits start one before it.
    prompt_len = ids.shape[1]
    response_logits = np.asarray(logits)[:, prompt_len - 1 : -1]
    return out, response_logits


def test_rollout_logprobs_equal_the_trainers_recomputed_temperature_one_logprobs(rollout):
    out, logits = rollout
    trainer = np.take_along_axis(_log_softmax(logits), out.tokens[..., None], axis=-1)[..., 0]
    real = out.response_mask.astype(bool)
    np.testing.assert_allclose(out.logprobs[real], trainer[real], atol=2e-5)


def test_rollout_processed_logprobs_are_of_the_temperature_scaled_truncated_distribution(rollout):
    out, logits = rollout
    for row, column in zip(*np.nonzero(out.response_mask)):
        probs = _reference_distribution(logits[row, column], ROLLOUT.temperature, ROLLOUT.top_k, ROLLOUT.top_p)
        expected = np.log(probs[out.tokens[row, column]])
        np.testing.assert_allclose(out.processed_logprobs[row, column], expected, atol=1e-4)


def test_rollout_never_emits_a_token_excluded_by_top_k_or_top_p(rollout):
    out, logits = rollout
    for row, column in zip(*np.nonzero(out.response_mask)):
        kept = _reference_kept_tokens(logits[row, column], ROLLOUT.temperature, ROLLOUT.top_k, ROLLOUT.top_p)
        assert out.tokens[row, column] in kept, (row, column)


def test_rollout_positions_after_a_stop_token_are_padding(rollout):
    out, _ = rollout
    expected_mask = _mask_through_first_stop(out.tokens, ROLLOUT_STOPS)
    finished = np.isin(out.tokens, ROLLOUT_STOPS).any(-1)
    assert finished.any() and not finished.all()  # the seed exercises both kinds of row
    np.testing.assert_array_equal(out.response_mask, expected_mask)
    np.testing.assert_array_equal(out.finished, finished)
    padding = expected_mask == 0
    np.testing.assert_array_equal(out.tokens[padding], PAD)
    np.testing.assert_array_equal(out.logprobs[padding], 0.0)
    np.testing.assert_array_equal(out.processed_logprobs[padding], 0.0)


# ---------------------------------------------------------------------------- inputs and mesh


def test_prompt_and_new_tokens_beyond_the_position_limit_are_rejected(converted):
    ids, mask = _left_padded_prompts()
    too_long = dataclasses.replace(GREEDY, max_new_tokens=HF_CONFIG["max_position_embeddings"])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        _generate(converted, ids, mask, too_long)


def test_mismatched_prompt_mask_is_rejected(converted):
    ids, mask = _left_padded_prompts()
    with pytest.raises(ValueError, match="prompt_mask shape"):
        _generate(converted, ids, mask[:, 1:], GREEDY)


def test_generation_sharded_over_the_mesh_equals_single_device_generation(converted, hf_greedy_tokens):
    config, params = converted
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ids, mask = _left_padded_prompts()
    batch = sharding.batch_sharding(mesh)
    sharded_params = sharding.shard_params(params, mesh, partitioning.LLAMA_RULES)
    with jax.set_mesh(mesh):
        out = generation.generate(
            sharded_params,
            jax.device_put(ids, batch),
            jax.device_put(mask, batch),
            jax.random.key(0),
            model_config=config,
            sampling=GREEDY,
        )
    assert out.tokens.sharding.is_equivalent_to(batch, 2)  # rows stay split over the batch axes
    np.testing.assert_array_equal(out.tokens, hf_greedy_tokens)
    single = _generate(converted, ids, mask, GREEDY)
    np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-5)
