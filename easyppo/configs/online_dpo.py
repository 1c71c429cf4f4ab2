"""Online DPO presets: ``--config=online_dpo:<preset>`` (or ``configs/online_dpo.py:<preset>`` from a checkout).

* ``demo``: online DPO on the bundled prompts, judged by the demo's reward model: the policy starts
  from the demo's SFT export (``runs/demo/sft/hf``) and the judge is the demo's reward model
  (``runs/demo/rm/hf``); run configs/sft.py:demo and configs/rm.py:demo first. Four samples per
  prompt, the best against the worst, sigmoid DPO loss with beta 0.1 against the SFT policy.
"""

from __future__ import annotations

from easyppo.configs.common import DEMO_DATA, apply_demo_settings, demo_runs
from easyppo.run.config import base_config

PRESETS = ("demo",)


def get_config(preset: str = "demo"):
    c = base_config("online_dpo")
    if preset == "demo":
        apply_demo_settings(c, output_name="online_dpo")
        c.model.init_from = str(demo_runs() / "sft" / "hf")
        c.online_dpo.reward_model.init_from = str(demo_runs() / "rm" / "hf")
        c.data.kind = "prompt"
        c.data.path = str(DEMO_DATA / "prompts_train.jsonl")
        c.eval.path = str(DEMO_DATA / "prompts_eval.jsonl")
        c.eval.batch_size = 64
        c.data.max_prompt_len = 24
        c.data.global_batch_size = 32
        c.train.num_steps = 40
        c.train.log_every_steps = 5
        c.eval.every_steps = 20
        c.optim.learning_rate = 3e-4
        c.optim.warmup_ratio = 0.1
        c.online_dpo.samples_per_prompt = 4
        c.online_dpo.beta = 0.1
        c.online_dpo.sampling.temperature = 1.0
        c.online_dpo.sampling.max_new_tokens = 32
        c.online_dpo.missing_eos_penalty = -5.0
        c.online_dpo.eval_greedy = False
        c.checkpoint.save_every_steps = 20
    else:
        raise ValueError(f"unknown online_dpo preset {preset!r}: use one of {', '.join(PRESETS)}")
    return c
