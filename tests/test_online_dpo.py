"""Online DPO: pairs are each prompt's best and worst sample (ties skipped and counted), the loss is the
offline DPO family's, and a fixed reward model's score of the policy's samples rises."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers.ppo_runs import metric_rows, save_peaky_policy, tiny_ppo_config

from easyppo.algorithms.online_dpo_pairs import pick_pairs
from easyppo.run import config as run_config
from easyppo.run import loop


def test_pairs_are_each_groups_best_and_worst_and_ties_and_padding_give_none():
    scores = np.array([0.1, 0.9, 0.5, 2.0, 2.0, 2.0, -1.0, 3.0, 3.0, 0.0, 5.0, 1.0], np.float32)
    real = np.array([True] * 9 + [False] * 3)
    chosen, rejected, mask = pick_pairs(scores, real, 3)
    np.testing.assert_array_equal(chosen[[0, 2]], [1, 7])
    np.testing.assert_array_equal(rejected[[0, 2]], [0, 6])
    np.testing.assert_array_equal(mask, [1.0, 0.0, 1.0, 0.0])  # group 1 ties, group 3 pads the batch


def online_dpo_config(out):
    """The tiny PPO test run's models and prompts, trained with online DPO against its random reward model."""
    ppo = tiny_ppo_config(out, prompts=256)
    config = run_config.base_config("online_dpo")
    for section in ("model", "data", "train", "checkpoint", "logging", "optim"):
        config[section] = ppo[section]
    config.output_dir = ppo.output_dir
    config.online_dpo.reward_model = ppo.ppo.reward_model
    config.online_dpo.samples_per_prompt = 4
    config.online_dpo.sampling.max_new_tokens = 8
    config.online_dpo.sampling.temperature = 1.0
    config.online_dpo.beta = 0.1
    return config


def test_an_iteration_logs_pairs_ties_and_the_dpo_loss(tmp_path):
    config = online_dpo_config(tmp_path)
    run_config.validate(config, num_devices=jax.device_count())
    result = loop.train(config)
    assert result.status == "completed"
    rows = [row for row in metric_rows(tmp_path) if "tie_fraction" in row]
    assert len(rows) == config.train.num_steps
    for row in rows:
        assert {"dpo_loss", "implicit_accuracy", "reward_margin", "score", "score_chosen", "score_rejected"} <= set(row)
        assert row["score_chosen"] >= row["score_rejected"]
    assert rows[0]["dpo_loss"] == pytest.approx(np.log(2), abs=1e-3)  # the policy starts at the reference


@pytest.mark.slow
def test_online_dpo_raises_the_score_of_a_fixed_reward_model(tmp_path):
    config = online_dpo_config(tmp_path / "run")
    config.model.init_from = save_peaky_policy(tmp_path / "policy", logit_scale=8.0)
    config.train.num_steps = 30
    config.data.global_batch_size = 16
    config.optim.learning_rate = 2e-3
    loop.train(config)
    scores = np.array([row["score"] for row in metric_rows(tmp_path / "run") if "tie_fraction" in row])
    first, last = scores[:5].mean(), scores[-5:].mean()
    # A five-iteration mean over 64 samples (score std about 1) rising by 0.5 is many standard errors
    # (measured here: about -0.17 -> +1.5).
    assert last > first + 0.5, scores.round(2).tolist()
