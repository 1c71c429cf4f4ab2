"""A tiny SFT or reward-model run on the first rows of the demo's files, for loop-level tests."""

from __future__ import annotations

import pathlib

from easyppo.run import config as run_config
from helpers.demo_data import DEMO_DATA, first_rows


def small_demo_data(tmp_path_factory) -> dict:
    """The first rows of the demo's files: enough for a few steps, and one cache for the module."""
    root = tmp_path_factory.mktemp("data")
    return {
        "sft": first_rows(DEMO_DATA / "sft_train.jsonl", root / "sft.jsonl", 40),
        "sft_eval": first_rows(DEMO_DATA / "sft_eval.jsonl", root / "sft_eval.jsonl", 16),
        "preference": first_rows(DEMO_DATA / "preference_train.jsonl", root / "pref.jsonl", 40),
        "cache": str(root / "cache"),
    }


def tiny_config(algorithm: str, out: pathlib.Path, data: dict, **train_overrides):
    """A run of the tiny model on the demo tokenizer; 5 steps per epoch over 40 rows."""
    c = run_config.base_config(algorithm)
    c.output_dir = str(out)
    c.model.preset = "tiny"
    c.model.pad_token_id = 3
    c.data.path = data["sft" if algorithm == "sft" else "preference"]
    c.data.tokenizer_path = str(DEMO_DATA / "tokenizer.model")
    c.data.pad_id = 3
    c.data.max_seq_len = 64
    c.data.max_prompt_len = 40
    c.data.global_batch_size = 8
    c.data.num_proc = 1
    c.data.cache_dir = data["cache"]
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 2
    c.train.num_steps = 7
    c.train.log_every_steps = 1
    c.checkpoint.save_every_steps = 100
    c.checkpoint.async_save = False
    c.logging.progress_bar = False
    for key, value in train_overrides.items():
        c.train[key] = value
    return c
