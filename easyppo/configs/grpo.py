"""Group-RL presets: ``--config=grpo:<preset>`` (or ``configs/grpo.py:<preset>`` from a checkout).

* ``demo``: GRPO on the bundled counting task (demo/make_data.py): each prompt asks for a description
  "with N nice words" (N is 0 or 3) and its ``answer`` is N; the reward (easyppo/configs/demo_rewards.py)
  is 1 when the response keeps the demo's frame and uses exactly N cheerful words. The policy starts
  from the demo's SFT export (``runs/demo/sft/hf``; run configs/sft.py:demo first, ``make demo`` does),
  which mixes moods at random and is right well under a tenth of the time at temperature 1. No reward
  model, no critic, no reference (no KL term). Held-out accuracy is measured on sampled responses (the
  policy being trained), as the PPO demo measures its reward. About a minute on 2 CPU cores.
"""

from __future__ import annotations

from easyppo.configs.common import DEMO_DATA, apply_demo_settings, demo_runs
from easyppo.run.config import base_config

PRESETS = ("demo",)


def get_config(preset: str = "demo"):
    c = base_config("grpo")
    if preset == "demo":
        apply_demo_settings(c, output_name="grpo")
        c.model.init_from = str(demo_runs() / "sft" / "hf")
        c.data.kind = "prompt"
        c.data.path = str(DEMO_DATA / "counting_train.jsonl")
        c.eval.path = str(DEMO_DATA / "counting_eval.jsonl")
        c.eval.batch_size = 64
        c.data.max_prompt_len = 40
        c.data.global_batch_size = 16
        c.train.num_steps = 120
        c.train.log_every_steps = 5
        c.eval.every_steps = 40
        c.optim.learning_rate = 5e-4
        c.optim.warmup_ratio = 0.1
        c.grpo.rewards = "easyppo.configs.demo_rewards:nice_word_count"
        c.grpo.advantage_estimator = "grpo"
        c.grpo.samples_per_prompt = 8
        c.grpo.num_minibatches = 2
        c.grpo.kl_coef = 0.0
        c.grpo.kl_loss_coef = 0.0
        c.grpo.sampling.temperature = 1.0
        c.grpo.sampling.max_new_tokens = 32
        c.grpo.loss_aggregation = "token-mean"
        c.grpo.eval_greedy = False
        c.logging.samples_every_steps = 10
        c.checkpoint.save_every_steps = 20
    else:
        raise ValueError(f"unknown grpo preset {preset!r}: use one of {', '.join(PRESETS)}")
    return c
