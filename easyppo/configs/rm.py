"""Reward-model presets: ``--config=rm:<preset>`` (or ``configs/rm.py:<preset>`` from a checkout).

* ``demo``: a Bradley-Terry reward model on the bundled preference data, starting from the demo's
  SFT export (``runs/demo/sft/hf``; run configs/sft.py:demo first) or from scratch with
  ``--config.model.init_from=""``.
* ``tulu25_13b_uf``: the Tulu 2.5 reward-model recipe (Ivison et al. 2024): Tulu 2 13B SFT start,
  UltraFeedback (mean-of-aspects binarisation) pairs, lr 1e-5, linear schedule with 3% warmup,
  1 epoch, batch 512, sequences of 2048 tokens.
"""

from __future__ import annotations

from easyppo.configs.common import DEMO_DATA, apply_demo_settings, apply_pod_settings, demo_runs
from easyppo.run.config import base_config

PRESETS = ("demo", "tulu25_13b_uf")


def get_config(preset: str = "demo"):
    c = base_config("rm")
    if preset == "demo":
        apply_demo_settings(c, output_name="rm")
        c.model.init_from = str(demo_runs() / "sft" / "hf")
        c.data.path = str(DEMO_DATA / "preference_train.jsonl")
        c.eval.path = str(DEMO_DATA / "preference_eval.jsonl")
        c.data.num_epochs = 3
        c.optim.learning_rate = 1e-3
        c.optim.warmup_ratio = 0.1
    elif preset == "tulu25_13b_uf":
        c.output_dir = "runs/tulu25_13b_rm_uf"
        apply_pod_settings(c, init_from="allenai/tulu-2-13b")
        c.data.hf_dataset = "allenai/ultrafeedback_binarized_cleaned"
        c.data.split = "train_prefs"
        c.data.max_seq_len = 2048
        c.data.max_prompt_len = 1024
        c.data.global_batch_size = 512
        c.data.num_epochs = 1
        c.optim.learning_rate = 1e-5
        c.optim.warmup_ratio = 0.03
        c.checkpoint.save_every_steps = 200
    else:
        raise ValueError(f"unknown rm preset {preset!r}: use one of {', '.join(PRESETS)}")
    return c
