"""Tiny PPO runs for tests: random-init tiny models on the demo tokenizer and prompts."""

from __future__ import annotations

import json
import pathlib

import jax

from easyppo.models import llama
from easyppo.run import config as run_config
from easyppo.weights import huggingface
from helpers.demo_data import DEMO_DATA, first_rows

TINY = dict(pad_token_id=3, max_position_embeddings=64)


def tiny_ppo_config(out: pathlib.Path, *, prompts: int = 64, cache_dir: str | None = None):
    """A PPO run of random tiny models: 8 prompts x 2 samples, 8 new tokens, no EOS penalty."""
    c = run_config.base_config("ppo")
    c.output_dir = str(out)
    for model in (c.model, c.ppo.reward_model):
        model.preset = "tiny"
        model.pad_token_id = TINY["pad_token_id"]
        model.max_position_embeddings = TINY["max_position_embeddings"]
    out.mkdir(parents=True, exist_ok=True)
    c.data.path = first_rows(DEMO_DATA / "prompts_train.jsonl", out / "prompts.jsonl", prompts)
    c.data.tokenizer_path = str(DEMO_DATA / "tokenizer.model")
    c.data.pad_id = 3
    c.data.max_prompt_len = 24
    c.data.global_batch_size = 8
    c.data.num_proc = 1
    c.data.cache_dir = cache_dir or str(out / "cache")
    c.ppo.samples_per_prompt = 2
    c.ppo.sampling.max_new_tokens = 8
    c.ppo.sampling.temperature = 1.0
    c.ppo.kl_coef = 0.01
    c.optim.learning_rate = 1e-3
    c.ppo.value_optim.learning_rate = 1e-3
    c.train.num_steps = 2
    c.train.log_every_steps = 1
    c.checkpoint.save_every_steps = 1000
    c.checkpoint.async_save = False
    c.logging.progress_bar = False
    return c


def save_peaky_policy(directory: pathlib.Path, *, logit_scale: float, seed: int = 1) -> str:
    """A random tiny causal LM whose output logits are ``logit_scale`` times larger, as a HF dir.

    A random tiny model is nearly uniform over 512 tokens; sharper logits make it sample a few
    tokens per position, as a trained policy does, so a handful of PPO iterations can learn.
    """
    model_config = llama.get_preset("tiny", **TINY)
    params = llama.init_params(model_config, "causal_lm", jax.random.key(seed))
    head = ("model", "embed_tokens", "embedding") if model_config.tie_word_embeddings else ("lm_head", "kernel")
    node = params
    for key in head[:-1]:
        node = node[key]
    node[head[-1]] = node[head[-1]] * logit_scale
    huggingface.save_hf(str(directory), model_config, params, kind="causal_lm")
    return str(directory)


def metric_rows(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir: pathlib.Path) -> list[dict]:
    """The per-step training records (those with rollout metrics)."""
    return [row for row in metric_rows(run_dir) if "score" in row]
