"""Tiny GRPO runs for tests: a random peaky tiny policy on the demo tokenizer and counting prompts."""

from __future__ import annotations

import pathlib

from easyppo.run import config as run_config
from helpers.demo_data import DEMO_DATA, first_rows
from helpers.ppo_runs import TINY, save_peaky_policy


def tiny_grpo_config(out: pathlib.Path, *, prompts: int = 64, cache_dir: str | None = None):
    """4 prompts x 4 samples of 8 new tokens, rewarded by whether the response holds an 'a'.

    A random policy writes an 'a' about half the time, so some groups agree and some do not: what
    the group estimators and dynamic sampling need to show their behaviour.
    """
    c = run_config.base_config("grpo")
    out.mkdir(parents=True, exist_ok=True)
    c.output_dir = str(out)
    c.model.init_from = save_peaky_policy(out / "policy", logit_scale=4.0)
    c.data.path = first_rows(DEMO_DATA / "counting_train.jsonl", out / "prompts.jsonl", prompts)
    c.data.kind = "prompt"
    c.data.tokenizer_path = str(DEMO_DATA / "tokenizer.model")
    c.data.pad_id = TINY["pad_token_id"]
    c.data.max_prompt_len = 40
    c.data.global_batch_size = 4
    c.data.num_proc = 1
    c.data.cache_dir = cache_dir or str(out / "cache")
    c.grpo.samples_per_prompt = 4
    c.grpo.rewards = "format"
    c.grpo.reward_format_pattern = "a"
    c.grpo.sampling.max_new_tokens = 8
    c.grpo.sampling.temperature = 1.0
    c.optim.learning_rate = 1e-3
    c.train.num_steps = 2
    c.train.log_every_steps = 1
    c.checkpoint.save_every_steps = 1000
    c.checkpoint.async_save = False
    c.logging.progress_bar = False
    return c
