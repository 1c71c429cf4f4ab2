"""Specification of PPO's pieces: losses and rewards against NumPy formulas, config checks, one
iteration's invariants (old log-probs are the sampler's, clipping acts only once the policy moved,
value warm-up freezes the policy) and a sharded iteration equal to a single-device one."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.ppo_runs import tiny_ppo_config

from easyppo.algorithms.rl import forward, losses
from easyppo.algorithms.rl.options import PPOOptions
from easyppo.algorithms.rl.scoring import Experience
from easyppo.algorithms.rl.update import Optimizers, RLState, update
from easyppo.core import optim, sharding
from easyppo.data import pipeline
from easyppo.models import llama
from easyppo.run import config as run_config
from easyppo.run import loop

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------ pure functions


def test_clipped_policy_loss_is_the_pessimistic_surrogate():
    logp, old, adv = (RNG.normal(size=(4, 6)).astype(np.float32) * s for s in (0.3, 0.3, 1.0))
    terms = losses.clipped_policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), 0.2, 0.2)
    loss, ratio = terms.loss, terms.ratio
    clipped = np.asarray(terms.clipped_low + terms.clipped_high) > 0
    r = np.exp(logp - old)
    expected = np.maximum(-adv * r, -adv * np.clip(r, 0.8, 1.2))
    np.testing.assert_allclose(ratio, r, rtol=1e-6)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    # Clipping is active exactly where the ratio left [0.8, 1.2] in the direction the advantage favours.
    np.testing.assert_array_equal(clipped, ((adv > 0) & (r > 1.2)) | ((adv < 0) & (r < 0.8)))


def test_clipped_policy_loss_at_ratio_one_is_minus_the_advantage_and_never_clips():
    adv = RNG.normal(size=(3, 5)).astype(np.float32)
    logp = RNG.normal(size=(3, 5)).astype(np.float32)
    terms = losses.clipped_policy_loss(jnp.asarray(logp), jnp.asarray(logp), jnp.asarray(adv), 0.2, 0.2)
    np.testing.assert_allclose(terms.loss, -adv, rtol=1e-6)
    assert not np.any(terms.clipped_low) and not np.any(terms.clipped_high)


def test_clipped_value_loss_takes_the_larger_of_the_clipped_and_unclipped_errors():
    values, old, returns = (RNG.normal(size=(4, 6)).astype(np.float32) for _ in range(3))
    loss, clipped = losses.clipped_value_loss(jnp.asarray(values), jnp.asarray(old), jnp.asarray(returns), 0.2)
    v_clip = old + np.clip(values - old, -0.2, 0.2)
    expected = 0.5 * np.maximum((values - returns) ** 2, (v_clip - returns) ** 2)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(clipped, (v_clip - returns) ** 2 > (values - returns) ** 2)


def test_kl_shaped_rewards_put_the_score_on_each_rows_last_response_token():
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    kl = RNG.normal(size=mask.shape).astype(np.float32)
    score = np.array([2.0, -1.0, 5.0], np.float32)
    rewards, non_score = losses.kl_shaped_rewards(jnp.asarray(score), jnp.asarray(kl), jnp.asarray(mask), 0.1)
    expected_non_score = -0.1 * kl * mask
    expected = expected_non_score.copy()
    expected[0, 2] += 2.0
    expected[1, 0] += -1.0  # the padding row (no response tokens) gets no score at all
    np.testing.assert_allclose(non_score, expected_non_score, rtol=1e-6)
    np.testing.assert_allclose(rewards, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "penalty, mode, expected",
    [(None, "replace", [3.0, 3.0]), (-10.0, "replace", [3.0, -10.0]), (-10.0, "add", [3.0, -7.0])],
)
def test_missing_eos_penalty_applies_only_to_unfinished_responses(penalty, mode, expected):
    score = jnp.array([3.0, 3.0])
    finished = jnp.array([True, False])
    np.testing.assert_allclose(losses.apply_missing_eos_penalty(score, finished, penalty, mode), expected)


def test_adaptive_kl_coefficient_moves_towards_the_target_by_at_most_twenty_percent_of_a_horizon():
    step = dict(target=6.0, horizon=100, batch_rows=10)
    up = losses.adaptive_kl_coef(jnp.float32(0.1), jnp.float32(6.6), **step)  # 10% above target
    np.testing.assert_allclose(up, 0.1 * (1 + 0.1 * 10 / 100), rtol=1e-6)
    far_up = losses.adaptive_kl_coef(jnp.float32(0.1), jnp.float32(60.0), **step)  # error clipped to 0.2
    np.testing.assert_allclose(far_up, 0.1 * (1 + 0.2 * 10 / 100), rtol=1e-6)
    down = losses.adaptive_kl_coef(jnp.float32(0.1), jnp.float32(0.0), **step)
    np.testing.assert_allclose(down, 0.1 * (1 - 0.2 * 10 / 100), rtol=1e-6)


def test_explained_variance_is_one_for_perfect_values_and_zero_for_the_mean():
    returns = RNG.normal(size=(3, 5)).astype(np.float32)
    mask = np.ones_like(returns)
    mask[2, 3:] = 0
    assert float(
        losses.explained_variance(jnp.asarray(returns), jnp.asarray(returns), jnp.asarray(mask))
    ) == pytest.approx(1.0)
    mean = returns[mask > 0].mean()
    as_mean = np.full_like(returns, mean)
    assert float(
        losses.explained_variance(jnp.asarray(as_mean), jnp.asarray(returns), jnp.asarray(mask))
    ) == pytest.approx(0.0, abs=1e-5)


# ------------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("kl_estimator", "k7", "config.ppo.kl_estimator"),
        ("num_minibatches", 3, "config.ppo.num_minibatches"),
        ("missing_eos_mode", "drop", "config.ppo.missing_eos_mode"),
        ("clip_ratio", -0.1, "config.ppo.clip_ratio"),
        ("gamma", 1.5, "config.ppo.gamma"),
        ("ppo_epochs", 0, "config.ppo.ppo_epochs"),
    ],
)
def test_bad_ppo_options_fail_before_anything_loads_naming_the_key(tmp_path, key, value, message):
    config = tiny_ppo_config(tmp_path)
    config.ppo[key] = value
    with pytest.raises(ValueError, match=message):
        run_config.validate(config, num_devices=8)


def test_prompt_plus_new_tokens_beyond_the_model_positions_fail_naming_max_new_tokens(tmp_path):
    config = tiny_ppo_config(tmp_path)
    config.ppo.sampling.max_new_tokens = 64 - 24 + 1
    with pytest.raises(ValueError, match="config.ppo.sampling.max_new_tokens"):
        run_config.validate(config, num_devices=8)


def test_a_reward_model_with_a_smaller_vocabulary_than_the_policy_is_rejected(tmp_path):
    config = tiny_ppo_config(tmp_path)
    config.ppo.reward_model.vocab_size = 256
    with pytest.raises(ValueError, match="config.ppo.reward_model"):
        run_config.validate(config, num_devices=8)


def test_minibatches_must_split_into_accumulation_steps_the_mesh_can_share(tmp_path):
    config = tiny_ppo_config(tmp_path)  # 8 prompts x 2 samples = 16 rollout rows
    config.ppo.num_minibatches = 2
    config.train.grad_accum_steps = 2  # 8-row minibatches -> 4-row microbatches on 8 devices
    with pytest.raises(run_config.ConfigError, match="grad_accum_steps=2"):
        run_config.validate(config, num_devices=8)


# ------------------------------------------------------------------------- one iteration's facts
# These drive the trainer directly on one device (no loop, no checkpoints): the loop's own behaviour
# with PPO is specified in test_ppo_resume.py, and one device compiles and runs far faster than 8.


def _direct(config, devices):
    """A PPO trainer on a mesh over ``devices`` and the first prompt batch placed on that mesh."""
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    trainer = loop.trainer_for(config, mesh, config.train.num_steps)
    tokenizer, chat_format = pipeline.load_tokenizer_and_format(config.data)
    data = pipeline.prepare_data(config.data, tokenizer=tokenizer, chat_format=chat_format)
    host_batch = next(iter(pipeline.make_iterator(data, config.data)))
    return trainer, sharding.host_local_to_global(host_batch, mesh)


def _single_device(config):
    with config.unlocked():
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    return _direct(config, jax.devices()[:1])


def _host_copy(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))  # survives the donation of the state


@pytest.fixture(scope="module")
def clipping_step(tmp_path_factory):
    """One iteration of 4 epochs x 2 minibatches at a large learning rate: its metrics."""
    config = tiny_ppo_config(tmp_path_factory.mktemp("clipping"))
    config.ppo.ppo_epochs = 4
    config.ppo.num_minibatches = 2
    config.optim.learning_rate = 1e-2
    config.optim.clip_grad_norm = 0.0
    config.ppo.entropy_coef = 0.01
    trainer, batch = _single_device(config)
    result = trainer.train_step(trainer.init_state(), batch, jax.random.key(0), step=0)
    return {"skipped": float(result.skipped), **{k: float(v) for k, v in jax.device_get(result.metrics).items()}}


def test_sampler_logprobs_equal_the_trainers_old_logprobs(clipping_step):
    assert clipping_step["logprob_gap_max"] < 1e-4


def test_an_entropy_bonus_is_computed_in_the_update_on_the_rollout_tokens(clipping_step):
    # Averaged over updates that move the policy, it stays near the rollout's own entropy.
    assert clipping_step["update_entropy"] == pytest.approx(clipping_step["entropy"], rel=0.5)


def test_clipping_acts_after_the_policy_has_moved(clipping_step):
    assert clipping_step["policy_clip_fraction"] > 0.01
    assert clipping_step["approx_kl"] > 0
    assert clipping_step["skipped"] == 0


@pytest.fixture(scope="module")
def warmup_steps(tmp_path_factory):
    """Two iterations of one epoch of one minibatch; the first trains only the value model."""
    config = tiny_ppo_config(tmp_path_factory.mktemp("warmup"))
    config.ppo.value_warmup_steps = 1
    trainer, batch = _single_device(config)
    state = trainer.init_state()
    states, metrics = [_host_copy(state)], []
    for step in range(2):
        result = trainer.train_step(state, batch, jax.random.key(step), step=step)
        state = result.state
        states.append(_host_copy(state))
        metrics.append({name: float(value) for name, value in jax.device_get(result.metrics).items()})
    return states, metrics


def _changed(a, b) -> bool:
    return any(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.any(x != y)), a, b)))


def test_value_warmup_steps_leave_the_policy_untouched_and_train_the_value_model(warmup_steps):
    (initial, after_warmup, after_second), (first, second) = warmup_steps
    assert not _changed(after_warmup.params, initial.params)
    assert _changed(after_warmup.value_params, initial.value_params)
    assert _changed(after_second.params, after_warmup.params)
    assert "policy_loss" not in first and first["learning_rate"] == 0.0
    assert "policy_loss" in second and second["learning_rate"] > 0


def test_one_epoch_of_one_minibatch_updates_at_the_rollout_parameters_so_nothing_clips(warmup_steps):
    _, (_, second) = warmup_steps
    assert second["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert second["policy_clip_fraction"] == 0.0


def test_an_iteration_runs_with_the_pod_settings_scanned_layers_remat_and_bfloat16(tmp_path):
    config = tiny_ppo_config(tmp_path)
    for model in (config.model, config.ppo.reward_model, config.ppo.value_model):
        model.scan_layers, model.remat, model.dtype = True, "dots_no_batch", "bfloat16"
    config.ppo.num_minibatches = 2
    trainer, batch = _single_device(config)
    result = trainer.train_step(trainer.init_state(), batch, jax.random.key(0), step=0)
    metrics = {name: float(value) for name, value in jax.device_get(result.metrics).items()}
    assert all(np.isfinite(value) for value in metrics.values()), metrics
    assert not result.skipped
    assert metrics["logprob_gap_max"] < 0.1  # sampler and trainer agree to bfloat16 precision


def test_ppo_takes_the_shared_rl_options_a_bfloat16_sampler_with_truncated_importance_sampling(tmp_path):
    config = tiny_ppo_config(tmp_path)
    config.ppo.rollout_dtype = "bfloat16"
    config.ppo.importance_correction = "tis"
    config.ppo.importance_cap = 1.001  # tight: a random tiny policy is nearly uniform, its gaps small
    config.ppo.clip_ratio_high = 0.28
    config.ppo.loss_aggregation = "seq-mean-token-mean"
    trainer, batch = _single_device(config)
    result = trainer.train_step(trainer.init_state(), batch, jax.random.key(0), step=0)
    metrics = {name: float(value) for name, value in jax.device_get(result.metrics).items()}
    assert not bool(result.skipped) and all(np.isfinite(v) for v in metrics.values()), metrics
    assert metrics["logprob_gap"] > 1e-4 and metrics["importance_corrected_fraction"] > 0
    assert "value_loss" in metrics and "explained_variance" in metrics  # still PPO, critic and all


# ------------------------------------------------------------------------------------- sharding


def _one_iteration(trainer, batch):
    state = trainer.init_state()
    with jax.set_mesh(trainer.mesh):
        rollout = trainer.rollout(
            state.params,
            batch,
            jax.random.key(7),
            sampling=trainer.sampling,
            samples_per_prompt=trainer.options.samples_per_prompt,
        )
        judged = trainer.judge(state.params, state.value_params, trainer.frozen, rollout)
        scored = trainer.assemble(judged, rollout, jnp.zeros(rollout.row_mask.shape), state.kl_coef)
        state, _ = trainer.update(state, scored.experience, scored.metrics["kl_per_sequence"], jax.random.key(8))
    return jax.device_get((rollout.response_ids, scored.experience, scored.samples, state))


def test_a_sharded_iteration_equals_the_single_device_one(tmp_path):
    config = tiny_ppo_config(tmp_path)
    config.ppo.num_minibatches = 2
    config.ppo.ppo_epochs = 2
    single = _one_iteration(*_single_device(config))
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    sharded = _one_iteration(*_direct(config, jax.devices()))
    np.testing.assert_array_equal(single[0], sharded[0])  # the same tokens were sampled
    for name in ("old_logprobs", "old_values", "advantages", "returns"):
        single_value, sharded_value = getattr(single[1], name), getattr(sharded[1], name)
        np.testing.assert_allclose(single_value, sharded_value, atol=2e-4, rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(single[2].raw_score, sharded[2].raw_score, atol=1e-4)
    # Four optimizer steps of each model later, the parameters still agree to float32 noise.
    for field in ("params", "value_params"):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=field),  # noqa: B023
            getattr(single[3], field),
            getattr(sharded[3], field),
        )


def test_options_are_hashable_so_jitted_programs_can_close_over_them(tmp_path):
    options = run_config.validate(tiny_ppo_config(tmp_path), num_devices=8).options
    assert isinstance(options, PPOOptions)
    assert hash(options) == hash(dataclasses.replace(options))


# ------------------------------------------------------------------- the update, without a rollout
# ``rl.update.update`` is a pure function of a state and an Experience: driven here on a synthetic
# experience, with two tiny random models and no tokenizer, data or reward model.

UPDATE_MODEL = llama.get_preset("tiny", num_hidden_layers=1, pad_token_id=3, max_position_embeddings=32)


def _synthetic_experience(seed: int, *, rows: int = 8, prompt_len: int = 6, new: int = 5) -> Experience:
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, UPDATE_MODEL.vocab_size, (rows, prompt_len + new)).astype(np.int32)
    lengths = rng.integers(1, new + 1, rows)
    mask = (np.arange(new)[None, :] < lengths[:, None]).astype(np.float32)
    attention = np.concatenate([np.ones((rows, prompt_len), np.int32), mask.astype(np.int32)], axis=1)
    positions = np.broadcast_to(np.arange(prompt_len + new, dtype=np.int32), ids.shape).copy()
    advantages = rng.normal(size=(rows, new)).astype(np.float32) * mask
    return Experience(
        input_ids=ids,
        attention_mask=attention,
        position_ids=positions,
        response_ids=ids[:, prompt_len:],
        mask=mask,
        old_logprobs=np.zeros((rows, new), np.float32),  # replaced by the policy's own below
        is_weights=np.ones((rows, new), np.float32),
        reference_logprobs=None,
        old_values=rng.normal(size=(rows, new)).astype(np.float32) * mask,
        advantages=advantages,
        returns=rng.normal(size=(rows, new)).astype(np.float32) * mask,
    )


def _update_setup(options: PPOOptions, learning_rate: float = 1e-2):
    policy = llama.init_params(UPDATE_MODEL, "causal_lm", jax.random.key(0))
    value = llama.init_params(UPDATE_MODEL, "value", jax.random.key(1))
    optim_config = run_config.base_config("ppo").optim
    optim_config.learning_rate, optim_config.warmup_steps, optim_config.clip_grad_norm = learning_rate, 0, 0.0
    optimizers = Optimizers(
        policy=optim.make_optimizer(optim_config, 10),
        value=optim.make_optimizer(optim_config, 10),
        policy_schedule=optim.make_schedule(optim_config, 10),
        value_schedule=optim.make_schedule(optim_config, 10),
    )
    state = RLState(
        step=jnp.int32(0),
        params=policy,
        opt_state=optimizers.policy.init(policy),
        value_params=value,
        value_opt_state=optimizers.value.init(value),
        kl_coef=jnp.float32(options.kl_coef),
    )
    models = forward.Models(policy=UPDATE_MODEL, value=UPDATE_MODEL)
    experience = _synthetic_experience(0)
    old = forward.response_logprobs(
        UPDATE_MODEL, policy, experience.sequences, experience.response_ids, chunk_size=options.logprob_chunk_size
    )
    experience = experience.replace(old_logprobs=old)
    run = jax.jit(
        functools.partial(update, models=models, options=options, optimizers=optimizers, num_microbatches=1),
        static_argnames="train_policy",
    )
    return state, experience, run


def test_the_update_on_a_synthetic_experience_matches_the_surrogate_formula_at_ratio_one():
    options = PPOOptions(logprob_chunk_size=4)
    state, experience, run = _update_setup(options)
    new_state, metrics = run(state, experience, jnp.float32(0.0), jax.random.key(0))
    # One epoch of one minibatch at the experience's own parameters: the ratio is 1, nothing clips,
    # and the policy loss is minus the token-mean advantage.
    mask, advantages = np.asarray(experience.mask), np.asarray(experience.advantages)
    np.testing.assert_allclose(metrics["ratio"], 1.0, atol=1e-6)
    assert float(metrics["policy_clip_fraction"]) == 0.0
    np.testing.assert_allclose(metrics["policy_loss"], -np.sum(advantages * mask) / mask.sum(), rtol=1e-5, atol=1e-6)
    assert int(new_state.step) == 1 and float(metrics["skipped_updates"]) == 0.0
    assert _changed(new_state.params, state.params) and _changed(new_state.value_params, state.value_params)


def test_an_update_without_the_policy_trains_only_the_critic():
    state, experience, run = _update_setup(PPOOptions(logprob_chunk_size=4))
    new_state, metrics = run(state, experience, jnp.float32(0.0), jax.random.key(0), train_policy=False)
    assert not _changed(new_state.params, state.params)
    assert _changed(new_state.value_params, state.value_params)
    assert "policy_loss" not in metrics and float(metrics["learning_rate"]) == 0.0


def test_later_minibatches_of_an_update_see_a_moved_policy_and_clip():
    options = PPOOptions(logprob_chunk_size=4, ppo_epochs=4, num_minibatches=2, clip_ratio=0.05)
    state, experience, run = _update_setup(options, learning_rate=5e-2)
    _, metrics = run(state, experience, jnp.float32(0.0), jax.random.key(0))
    assert float(metrics["policy_clip_fraction"]) > 0.0
    assert float(metrics["approx_kl"]) > 0.0


# ------------------------------------------------------------------------------ rollout in chunks


def _sample_and_judge(config, devices):
    trainer, batch = _direct(config, devices)
    state = trainer.init_state()
    with jax.set_mesh(trainer.mesh):
        sampled = trainer.sample(
            state.params, batch, jax.random.key(3), sampling=trainer.sampling, samples_per_prompt=2
        )
        judged = trainer.judge_rollout(state, sampled, recompute_policy=True)
    return jax.device_get((sampled, judged))


def test_a_rollout_in_chunks_of_prompts_equals_the_whole_batch_at_once(tmp_path):
    """Greedy, so the chunks' keys do not matter: two chunks of 4 prompts (each spread over both
    devices) give one pass's tokens, log-probs, values and scores, row for row."""
    config = tiny_ppo_config(tmp_path)  # 8 prompts x 2 samples
    config.ppo.sampling.greedy = True
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 1
    whole = _sample_and_judge(config, jax.devices()[:2])
    config.ppo.rollout_batch_size = 4
    chunked = _sample_and_judge(config, jax.devices()[:2])
    np.testing.assert_array_equal(whole[0].response_ids, chunked[0].response_ids)
    np.testing.assert_array_equal(whole[0].prompt_ids, chunked[0].prompt_ids)
    np.testing.assert_allclose(whole[0].sampler_logprobs, chunked[0].sampler_logprobs, atol=1e-5)
    for name in ("logprobs", "values", "reference_logprobs", "reward_model_score"):
        np.testing.assert_allclose(getattr(whole[1], name), getattr(chunked[1], name), atol=1e-5, err_msg=name)


def test_a_rollout_batch_that_does_not_split_the_prompts_fails_before_anything_loads(tmp_path):
    config = tiny_ppo_config(tmp_path)
    config.ppo.rollout_batch_size = 3
    with pytest.raises(ValueError, match=r"config.ppo.rollout_batch_size: 3 prompts .* data.global_batch_size=8"):
        run_config.validate(config, num_devices=8)
    config.ppo.rollout_batch_size = 4  # divides the 8 prompts, but not over 8 devices
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices())
    with pytest.raises(ValueError, match=r"ppo.rollout_batch_size.*mesh.data \* mesh.fsdp = 8"):
        loop.trainer_for(config, mesh, 1)


def test_an_iteration_with_the_rollout_in_chunks_trains(tmp_path):
    config = tiny_ppo_config(tmp_path)
    config.ppo.rollout_batch_size = 2
    trainer, batch = _single_device(config)
    result = trainer.train_step(trainer.init_state(), batch, jax.random.key(0), step=0)
    metrics = {k: float(v) for k, v in jax.device_get(result.metrics).items()}
    assert all(np.isfinite(v) for v in metrics.values())
    assert metrics["logprob_gap_max"] < 1e-4  # each row scored is the row its chunk sampled
    assert not bool(result.skipped)
