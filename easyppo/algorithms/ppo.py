"""Proximal policy optimisation from a reward model: the classic RLHF recipe, done correctly.

One train step of the loop is one PPO *iteration* over a batch of prompts, composed of the programs
of ``easyppo.algorithms.rl``:

1. **rollout** (``rl.rollout``): ``samples_per_prompt`` responses per prompt from the current policy;
2. **scoring** (``rl.scoring``), once, with the rollout's own parameters: the *old* log-probs, the
   frozen reference's, the critic's values and the reward model's score; a response that never
   emitted a stop token has its score replaced by (or shifted by) ``missing_eos_penalty``; per token
   ``-kl_coef * KL_t`` (k1 or k3) plus the score on the last token; GAE advantages;
3. **update** (``rl.update``, donating the state): ``ppo_epochs`` passes over shuffled minibatches,
   each a clipped-surrogate policy step and a clipped value step with their own optimizers.

The one thing that makes PPO PPO: the ratio ``pi(a|s) / pi_old(a|s)`` divides by the log-probs
*stored in step 2*, never recomputed before an update. After the first minibatch step the policy has
moved, the ratio leaves 1 and clipping acts (``policy_clip_fraction`` shows it). An existing JAX
implementation recomputed "old" log-probs right before each update, which makes every ratio exactly 1
and silently turns PPO into vanilla policy gradient.

The programs and the trainer that runs them (``easyppo.algorithms.rl.trainer.RLTrainer``) are shared
with the group family (``easyppo.algorithms.grpo``); this module is PPO's options and registry entry.

Models: the policy (``config.model``, trained), the value model (``ppo.value_model``, trained; by
default initialised from the reward model, head included), the reference (the policy's initial
weights or ``ppo.reference_init_from``) and the reward model (``ppo.reward_model``), both frozen:
held as parameters only, never in a checkpoint or an optimizer. The reward model must use the
policy's tokenizer; it may be larger than the policy (Tulu 2.5 scores a 13B policy with a 70B RM).

A checkpoint (``RLState``) holds the policy and value parameters, both optimizer states and the KL
coefficient; the loop adds the data position and the step's RNG is ``fold_in(seed, step)``, so a
resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import functools

from easyppo.algorithms.contract import Algorithm
from easyppo.algorithms.rl import setup
from easyppo.algorithms.rl.options import PPOOptions
from easyppo.algorithms.rl.trainer import RLTrainer, value_export_dir
from easyppo.core import optim
from easyppo.weights import loading

PPOTrainer = RLTrainer  # the name benchmarks and notebooks know

__all__ = ["ALGORITHM", "PPOOptions", "PPOTrainer", "value_export_dir"]

ALGORITHM = Algorithm(
    name="ppo",
    data_kind="prompt",
    model_kind="causal_lm",
    options_type=PPOOptions,
    make_trainer=functools.partial(setup.make_trainer, name="ppo"),
    sections={
        "reward_model": loading.default_config,  # frozen scorer of (prompt, response)
        "value_model": loading.default_config,  # trained critic; init_from "": reward_model's weights
        "value_optim": optim.default_config,  # the critic's optimizer (the policy uses config.optim)
    },
    check_run=functools.partial(setup.check_run, name="ppo"),
    rows_per_update=setup.rows_per_update,
    progress_bar_metrics=("score", "kl_per_sequence"),
)
