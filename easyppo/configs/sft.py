"""Supervised fine-tuning presets: ``--config=sft:<preset>`` (or ``configs/sft.py:<preset>`` from a checkout).

* ``demo``: the bundled task (demo/make_data.py) on the tiny model; about a minute on 2 CPU cores.
* ``tulu2_7b``: Tulu 2 SFT of Llama 2 7B on the Tulu v2 mixture (Ivison et al. 2023: lr 2e-5,
  linear schedule with 3% warmup, 2 epochs, effective batch 128, sequences of 8192 tokens).
"""

from __future__ import annotations

from easyppo.configs.common import DEMO_DATA, apply_demo_settings, apply_pod_settings
from easyppo.run.config import base_config

PRESETS = ("demo", "tulu2_7b")


def get_config(preset: str = "demo"):
    c = base_config("sft")
    if preset == "demo":
        apply_demo_settings(c, output_name="sft")
        c.data.path = str(DEMO_DATA / "sft_train.jsonl")
        c.eval.path = str(DEMO_DATA / "sft_eval.jsonl")
        c.data.num_epochs = 2
        c.optim.learning_rate = 3e-3
        c.optim.warmup_ratio = 0.1
        c.optim.schedule = "cosine"
        c.optim.end_lr_ratio = 0.1
    elif preset == "tulu2_7b":
        c.output_dir = "runs/tulu2_7b_sft"
        apply_pod_settings(c, init_from="meta-llama/Llama-2-7b-hf")
        c.model.max_position_embeddings = 8192  # Tulu 2 trains Llama 2 (4096) on 8192-token sequences
        c.data.hf_dataset = "allenai/tulu-v2-sft-mixture"
        c.data.max_seq_len = 8192
        c.data.max_prompt_len = 8191
        c.data.global_batch_size = 128
        c.data.num_epochs = 2
        c.optim.learning_rate = 2e-5
        c.optim.warmup_ratio = 0.03
        c.optim.weight_decay = 0.0
    else:
        raise ValueError(f"unknown sft preset {preset!r}: use one of {', '.join(PRESETS)}")
    return c
