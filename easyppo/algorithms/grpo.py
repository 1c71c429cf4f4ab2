"""The group family of critic-free policy gradients, with verifiable rewards: GRPO, Dr.GRPO, DAPO's
settings, RLOO and REINFORCE++ (``algorithm="grpo"``, options in ``config.grpo``).

Each prompt is sampled ``samples_per_prompt`` times (a *group*); a response's advantage is its
reward against the group's (``grpo.advantage_estimator``, ``easyppo.algorithms.rl.advantages``), so
no value model is built. Rewards come from the sources named in ``grpo.rewards``: verifiable
functions of the decoded text and the row's ``answer`` (``easyppo.rewards``), a user function
``module:function``, and optionally the reward model, in a weighted sum.

The rollout, scoring, update and the trainer are PPO's (``easyppo.algorithms.rl``); the options
choose the loss aggregation, the clip bounds, where the KL goes (reward or loss; both 0 loads no
reference), the treatment of truncated responses, DAPO's dynamic sampling and the sampler/trainer
importance correction. docs/algorithms.md lists the choices each published recipe makes.
"""

from __future__ import annotations

import functools

from easyppo.algorithms.contract import Algorithm
from easyppo.algorithms.rl import setup
from easyppo.algorithms.rl.options import GroupRLOptions
from easyppo.weights import loading

ALGORITHM = Algorithm(
    name="grpo",
    data_kind="prompt",
    model_kind="causal_lm",
    options_type=GroupRLOptions,
    make_trainer=functools.partial(setup.make_trainer, name="grpo"),
    sections={"reward_model": loading.default_config},  # used only when 'reward_model' is a reward source
    check_run=functools.partial(setup.check_run, name="grpo"),
    rows_per_update=setup.rows_per_update,
    progress_bar_metrics=("score", "accuracy", "response_length"),
)
