"""PPO learns: on a small task, the mean reward of a fixed reward model rises within a few iterations."""

import numpy as np
import pytest
from helpers.ppo_runs import save_peaky_policy, tiny_ppo_config, train_rows

from easyppo.run import loop

ITERATIONS = 20


@pytest.mark.slow
def test_ppo_raises_the_mean_reward_of_a_fixed_reward_model(tmp_path):
    config = tiny_ppo_config(tmp_path / "run", prompts=256)
    # The reward model is a fixed random network; the policy a random one with sharp logits (a
    # random tiny model is nearly uniform over its 512 tokens, and would need far more samples).
    config.model.init_from = save_peaky_policy(tmp_path / "policy", logit_scale=8.0)
    config.train.num_steps = ITERATIONS
    config.ppo.samples_per_prompt = 4
    config.ppo.num_minibatches = 2
    config.ppo.ppo_epochs = 2
    config.optim.learning_rate = 2e-3
    loop.train(config)

    scores = np.array([row["score"] for row in train_rows(tmp_path / "run")])
    assert len(scores) == ITERATIONS
    first, last = scores[:5].mean(), scores[-5:].mean()
    # Each iteration's mean is over 32 responses with a score std of about 1, so a rise of 0.3 in a
    # five-iteration mean is several standard errors (measured here: about -0.3 -> +0.4).
    assert last > first + 0.3, scores.round(2).tolist()
