"""Specification of a group-RL run: which models it builds, what it logs, dynamic sampling and its
exact resume, a low-precision sampler with importance correction, and the up-front refusals."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from helpers.grpo_runs import tiny_grpo_config
from helpers.ppo_runs import TINY, metric_rows

from easyppo.algorithms.rl import scoring
from easyppo.core import sharding
from easyppo.data import pipeline
from easyppo.models import llama
from easyppo.run import config as run_config
from easyppo.run import loop
from easyppo.weights import run_directory


def _trainer(config):
    run_config.validate(config, num_devices=1)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    tokenizer, chat_format = pipeline.load_tokenizer_and_format(config.data)
    data = pipeline.prepare_data(config.data, tokenizer=tokenizer, chat_format=chat_format)
    trainer = loop.trainer_for(config, mesh, config.train.num_steps, train_data=data)
    batch = sharding.host_local_to_global(next(pipeline.make_iterator(data, config.data)), mesh)
    return trainer, batch


def _step_metrics(trainer, batch):
    result = trainer.train_step(trainer.init_state(), batch, jax.random.key(0), step=0)
    return result, {name: float(value) for name, value in jax.device_get(result.metrics).items()}


def test_a_grpo_iteration_builds_no_critic_no_reference_and_no_reward_model(tmp_path):
    trainer, batch = _trainer(tiny_grpo_config(tmp_path))
    assert trainer.initial_value_params is None
    assert trainer.frozen == {"reference": None, "reward": None}
    result, metrics = _step_metrics(trainer, batch)
    assert not bool(result.skipped) and result.state.value_params is None
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    for name in ("reward/format", "zero_variance_groups", "policy_clip_fraction_low", "policy_clip_fraction_high"):
        assert name in metrics
    for name in ("truncation_rate", "response_length", "entropy", "logprob_gap", "sampler_kl", "importance_weight"):
        assert name in metrics
    assert "value_loss" not in metrics and "kl_per_sequence" not in metrics


def test_a_kl_term_in_the_loss_loads_the_reference_and_logs_the_kl(tmp_path):
    config = tiny_grpo_config(tmp_path)
    config.grpo.kl_loss_coef = 0.04
    trainer, batch = _trainer(config)
    assert trainer.frozen["reference"] is not None and trainer.frozen["reward"] is None
    _, metrics = _step_metrics(trainer, batch)
    assert metrics["kl_loss"] == pytest.approx(0.0, abs=1e-6)  # the first update starts at the reference
    assert metrics["kl_per_sequence"] == pytest.approx(0.0, abs=1e-5)


def test_a_bfloat16_sampler_shows_its_mismatch_and_truncated_importance_sampling_keeps_training_finite(tmp_path):
    config = tiny_grpo_config(tmp_path)
    _, exact = _step_metrics(*_trainer(config))
    config.grpo.rollout_dtype = "bfloat16"
    config.grpo.importance_correction = "tis"
    config.grpo.importance_cap = 1.01
    result, corrected = _step_metrics(*_trainer(config))
    assert exact["logprob_gap"] < 1e-5 and exact["importance_corrected_fraction"] == 0.0
    assert corrected["logprob_gap"] > 100 * exact["logprob_gap"]  # visible in the logs
    assert corrected["sampler_kl"] > 0 and corrected["importance_corrected_fraction"] > 0
    assert corrected["importance_weight"] <= 1.01
    assert not bool(result.skipped) and all(np.isfinite(v) for v in corrected.values())


def test_a_bfloat16_sampler_trains_stably_with_correction_and_its_mismatch_stays_visible_without(tmp_path):
    runs = {}
    for correction in ("none", "tis"):
        config = tiny_grpo_config(tmp_path / correction)
        config.data.global_batch_size = 8  # the loop spreads rows over all 8 emulated devices
        config.train.num_steps = 4
        config.grpo.rollout_dtype = "bfloat16"
        config.grpo.importance_correction = correction
        config.grpo.importance_cap = 1.01  # tight, so the correction visibly acts on a tiny model
        result = loop.train(config)
        assert result.status == "completed" and result.nonfinite_steps == 0
        runs[correction] = [row for row in metric_rows(tmp_path / correction) if "logprob_gap" in row]
    for rows in runs.values():
        assert len(rows) == 4 and all(row["logprob_gap"] > 1e-4 for row in rows)  # logged, every step
        assert all(np.isfinite(row["policy_loss"]) and row["skipped_updates"] == 0 for row in rows)
    assert all(row["importance_corrected_fraction"] == 0 for row in runs["none"])
    assert any(row["importance_corrected_fraction"] > 0 for row in runs["tis"])


def test_scoring_at_the_sampling_temperature_matches_the_samplers_tempered_log_probs(tmp_path):
    config = tiny_grpo_config(tmp_path)
    config.grpo.sampling.temperature = 0.7
    config.grpo.logprob_temperature = "sampling"
    _, tempered = _step_metrics(*_trainer(config))
    config.grpo.logprob_temperature = "one"
    _, raw = _step_metrics(*_trainer(config))
    # Either way the trainer scores the distribution whose log-probs the sampler stored.
    assert tempered["logprob_gap"] < 1e-4 and raw["logprob_gap"] < 1e-4
    assert tempered["entropy"] < raw["entropy"]  # T = 0.7 sharpens every predictive distribution


def test_sampler_log_probs_as_old_log_probs_give_the_recomputed_update(tmp_path):
    config = tiny_grpo_config(tmp_path)
    recompute_result, recomputed = _step_metrics(*_trainer(config))
    config.grpo.old_logprobs = "sampler"
    trainer, batch = _trainer(config)
    sampler_result, reused = _step_metrics(trainer, batch)
    # Same weights, same precision: the sampler's log-probs are the scoring pass's to float rounding,
    # so the loss and its gradient agree. (Not the parameters element by element: Adam's first step is
    # lr * sign(gradient), which rounding may flip where a gradient is ~0.)
    assert reused["logprob_gap"] < 1e-5
    grad_norms = sorted(name for name in recomputed if "grad_norm" in name)
    assert grad_norms
    for name in ["policy_loss", "score", "advantage_mean", *grad_norms]:
        assert reused[name] == pytest.approx(recomputed[name], rel=1e-4, abs=1e-6), name
    assert not bool(sampler_result.skipped) and not bool(recompute_result.skipped)


def test_sampler_log_probs_skip_the_scoring_pass_between_mismatch_checks(tmp_path):
    config = tiny_grpo_config(tmp_path)
    config.grpo.old_logprobs = "sampler"
    config.grpo.mismatch_check_every = 2
    trainer, batch = _trainer(config)
    passes = []
    original = scoring.judge

    def counting_judge(*args, recompute_policy=True, **kwargs):
        passes.append(recompute_policy)
        return original(*args, recompute_policy=recompute_policy, **kwargs)

    state = trainer.init_state()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scoring, "judge", counting_judge)
        trainer.judge = jax.jit(
            functools.partial(scoring.judge, models=trainer.models, options=trainer.options),
            static_argnames=("recompute_policy",),
        )
        for step in range(3):
            result = trainer.train_step(state, batch, jax.random.key(step), step=step)
            state = result.state
            metrics = jax.device_get(result.metrics)
            assert "logprob_gap" in metrics  # the latest measurement, reported every iteration
            assert ("entropy" in metrics) == (step % 2 == 0)
    assert passes == [True, False]  # traced once per variant: checks at steps 0 and 2, none at 1


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"rollout_dtype": "bfloat16"}, "the policy's precision"),
        ({"importance_correction": "tis"}, "no mismatch to correct"),
    ],
)
def test_sampler_log_probs_are_refused_where_sampler_and_trainer_differ(tmp_path, changes, message):
    config = tiny_grpo_config(tmp_path)
    config.grpo.old_logprobs = "sampler"
    config.grpo.update(changes)
    with pytest.raises(ValueError, match=rf"grpo.old_logprobs: .*{message}"):
        run_config.validate(config, num_devices=1)


def test_answer_checking_rewards_refuse_prompts_without_answers_before_compiling(tmp_path):
    config = tiny_grpo_config(tmp_path)
    config.data.path = str(tmp_path / "no_answers.jsonl")
    (tmp_path / "no_answers.jsonl").write_text('{"prompt": "Say 2."}\n' * 8)
    config.grpo.rewards = "numeric"
    with pytest.raises(ValueError, match=r"grpo.rewards: 8 of 8 prompt rows of data have no 'answer'"):
        _trainer(config)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("rewards", "", "grpo.rewards: is empty"),
        ("rewards", "no_such_module_xyz:fn", "cannot import the reward function's module"),
        ("rewards", "format", "needs reward_format_pattern"),
        ("samples_per_prompt", 1, "grpo.samples_per_prompt"),
    ],
)
def test_bad_group_options_fail_in_validation_naming_the_key(tmp_path, key, value, message):
    config = tiny_grpo_config(tmp_path)
    config.grpo[key] = value
    if key == "rewards" and value == "format":
        config.grpo.reward_format_pattern = ""
    with pytest.raises(ValueError, match=message):
        run_config.validate(config, num_devices=1)


# ------------------------------------------------------------------------------ dynamic sampling

STEPS = 3


def _dynamic_config(out, cache):
    config = tiny_grpo_config(out, cache_dir=cache)
    config.train.num_steps = STEPS
    config.data.global_batch_size = 8  # the loop spreads rows over all 8 emulated devices
    config.grpo.dynamic_sampling = True
    config.grpo.max_sampling_rounds = 3
    config.grpo.num_minibatches = 2
    config.checkpoint.save_every_steps = 1
    return config


@pytest.fixture(scope="module")
def dynamic_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    cache = str(root / "cache")
    straight = loop.train(_dynamic_config(root / "straight", cache))
    interrupted = _dynamic_config(root / "interrupted", cache)
    interrupted.train.stop_at_step = 1
    first = loop.train(interrupted)
    with interrupted.unlocked():
        interrupted.train.stop_at_step = 0
    resumed = loop.train(interrupted)
    return dict(root=root, straight=straight, first=first, resumed=resumed)


def _policy(run_dir):
    model_config = llama.get_preset("tiny", **TINY)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(lambda: llama.init_params(model_config, "causal_lm", jax.random.key(0)))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), shapes)
    return jax.device_get(run_directory.restore_subtree(run_dir / "checkpoints", {"params": target}))


def test_dynamic_sampling_logs_its_rounds_and_drops_agreeing_groups(dynamic_runs):
    rows = [row for row in metric_rows(dynamic_runs["root"] / "straight") if "sampling_rounds" in row]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert any(row["sampling_rounds"] > 1 for row in rows)  # refills did happen
    for row in rows:
        assert 1 <= row["sampling_rounds"] <= 3
        assert row["samples_per_kept_group"] >= 4
        assert 0 <= row["dropped_group_fraction"] < 1
    # Only groups that disagree reached the update, unless the round bound forced a short batch.
    for row in rows:
        if row["dynamic_sampling_short"] == 0:
            assert row["zero_variance_groups"] == 0.0


def test_a_resumed_run_with_dynamic_sampling_ends_bit_identical(dynamic_runs):
    assert dynamic_runs["first"].step == 1 and dynamic_runs["resumed"].step == STEPS
    straight = _policy(dynamic_runs["root"] / "straight")
    resumed = _policy(dynamic_runs["root"] / "interrupted")
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)
    by_step = lambda run: {r["step"]: r for r in metric_rows(dynamic_runs["root"] / run) if "sampling_rounds" in r}
    a, b = by_step("straight"), by_step("interrupted")
    for step in range(2, STEPS + 1):
        for name in ("sampling_rounds", "score", "policy_loss", "dropped_group_fraction"):
            assert a[step][name] == b[step][name], (step, name)
