"""Sampling the responses of one iteration, and showing them in the samples log.

``rollout`` repeats each prompt ``samples_per_prompt`` times row by row (p0, p0, p1, p1, ...), so
every sample stays on its prompt's device and a prompt's samples are adjacent rows (a group), and
samples with ``easyppo.models.generation.generate`` (one jitted prefill + ``lax.while_loop`` decode).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from easyppo.models import generation, llama

PyTree = Any


@flax.struct.dataclass
class Rollout:
    """Sampled responses of one iteration, one row per (prompt, sample)."""

    prompt_ids: jax.Array  # int32 [R, P], left-padded
    prompt_mask: jax.Array  # int32 [R, P]
    response_ids: jax.Array  # int32 [R, N]
    response_mask: jax.Array  # int32 [R, N], 1 up to and including the stop token; 0 on padding rows
    sampler_logprobs: jax.Array  # float32 [R, N], the sampler's log-probs (temperature 1, or tempered)
    finished: jax.Array  # bool [R]
    row_mask: jax.Array  # float32 [R], 0 for padding rows of a partial prompt batch


def rollout(
    params: PyTree,
    prompts: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    policy: llama.LlamaConfig,
    sampling: generation.SamplingConfig,
    samples_per_prompt: int,
    rollout_dtype: str = "",
    tempered_logprobs: bool = False,
) -> Rollout:
    """``samples_per_prompt`` responses to each prompt of a prompt batch (``prompt_input_ids``,
    ``prompt_attention_mask``, ``example_mask``), sampled by the policy ``params``.

    ``rollout_dtype`` ("bfloat16", ...) runs the sampler in another precision than training (weights
    cast once per rollout); ``sampler_logprobs`` then differ from the trainer's, which the importance
    correction measures and corrects. ``tempered_logprobs`` stores the log-probs of the distribution
    sampled from (temperature, top-k/p) instead of the raw temperature-1 ones.
    """
    if rollout_dtype:
        dtype = jnp.dtype(rollout_dtype)
        params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
        policy = dataclasses.replace(policy, dtype=rollout_dtype, param_dtype=rollout_dtype)
    repeat = lambda x: jnp.repeat(x, samples_per_prompt, axis=0)
    prompt_ids = repeat(prompts["prompt_input_ids"]).astype(jnp.int32)
    prompt_mask = repeat(prompts["prompt_attention_mask"]).astype(jnp.int32)
    row_mask = repeat(prompts["example_mask"]).astype(jnp.float32)
    out = generation.generate(params, prompt_ids, prompt_mask, rng, model_config=policy, sampling=sampling)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=out.tokens,
        response_mask=out.response_mask * (row_mask[:, None] > 0),
        sampler_logprobs=out.processed_logprobs if tempered_logprobs else out.logprobs,
        finished=out.finished,
        row_mask=row_mask,
    )


def row_chunks(tree: PyTree, size: int) -> list[PyTree]:
    """``tree``'s rows (the leading axis of every leaf) in consecutive chunks of ``size``.

    With prompts repeated row by row, a chunk of whole prompts holds whole groups, and the chunks'
    outputs concatenated in order are laid out as one pass over every prompt would lay them out.
    """
    rows = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda x, s=start: x[s : s + size], tree) for start in range(0, rows, size)]


def concat_rows(parts: list[PyTree]) -> PyTree:
    """The chunks of ``row_chunks`` (or their outputs) as one tree again; ``None`` leaves stay ``None``."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)


@flax.struct.dataclass
class RolloutSamples:
    """A rollout with each row's scores, kept on the device until the loop logs a samples table."""

    rollout: Rollout
    raw_score: jax.Array  # [R] the reward model's score
    score: jax.Array  # [R] after the missing-EOS penalty
    kl: jax.Array  # [R] the sequence's KL to the reference

    def columns(self, tokenizer: Any, max_rows: int) -> dict[str, list]:
        """The first ``max_rows`` real rows as columns: prompt and response text (special tokens kept,
        so a missing stop token shows), response length, whether it stopped, the reward model's score,
        the score after the missing-EOS penalty, and the KL to the reference.

        A collective in a multi-host job (every host calls it at the same step): rows span hosts.
        """
        r = self.rollout
        arrays = {
            "prompt_ids": r.prompt_ids,
            "prompt_mask": r.prompt_mask,
            "response_ids": r.response_ids,
            "response_mask": r.response_mask,
            "finished": r.finished,
            "row_mask": r.row_mask,
            "raw_score": self.raw_score,
            "score": self.score,
            "kl": self.kl,
        }
        host = multihost_utils.process_allgather(arrays, tiled=True)
        names = ("prompt", "response", "response_tokens", "finished", "score", "score_penalized", "kl")
        columns: dict[str, list] = {name: [] for name in names}
        for row in np.flatnonzero(host["row_mask"] > 0)[:max_rows]:
            prompt = host["prompt_ids"][row][host["prompt_mask"][row] > 0]
            response = host["response_ids"][row][host["response_mask"][row] > 0]
            columns["prompt"].append(tokenizer.decode(prompt.tolist(), skip_special_tokens=False))
            columns["response"].append(tokenizer.decode(response.tolist(), skip_special_tokens=False))
            columns["response_tokens"].append(len(response))
            columns["finished"].append(bool(host["finished"][row]))
            columns["score"].append(float(host["raw_score"][row]))
            columns["score_penalized"].append(float(host["score"][row]))
            columns["kl"].append(float(host["kl"][row]))
        return columns
