"""The three forward passes RL needs over a batch of prompt + response sequences.

``Models`` names the architectures of the run (hashable, so jitted programs close over it); the
functions build their Flax modules from it, which costs nothing (a module is a description).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from easyppo.core import ops
from easyppo.models import llama, lora, sequences
from easyppo.models.sequences import Sequences, response_columns

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Models:
    """The architectures of an RL run: the policy (and its reference), the critic, the reward model."""

    policy: llama.LlamaConfig
    value: llama.LlamaConfig | None = None
    reward: llama.LlamaConfig | None = None


def response_logprobs(
    policy: llama.LlamaConfig,
    params: PyTree,
    seqs: Sequences,
    response_ids: jax.Array,
    *,
    chunk_size: int,
    with_entropy: bool = False,
    temperature: float = 1.0,
    rng: jax.Array | None = None,
):
    """log pi(response token) [R, N] (and, ``with_entropy``, each predictive distribution's entropy).

    ``temperature`` scores the distribution ``softmax(logits / T)``; the logits are linear in the final
    hidden state, so dividing the hidden state by T divides every logit by T at no extra cost.
    ``rng``: adapter dropout's key, in the update's forward passes only.
    """
    hidden = llama.make_model(policy, "causal_lm").apply(
        {"params": params},
        seqs.input_ids,
        seqs.attention_mask,
        seqs.position_ids,
        method="hidden_states",
        rngs=lora.dropout_rngs(rng),
    )
    num_new = response_ids.shape[1]
    hidden = response_columns(hidden, seqs.input_ids.shape[1] - num_new, num_new)
    if temperature != 1.0:
        hidden = hidden / jnp.asarray(temperature, hidden.dtype)
    return ops.token_logprobs(
        hidden,
        llama.output_embedding(params, policy),
        response_ids,
        chunk_size=chunk_size,
        return_entropy=with_entropy,
    )


def response_values(
    value: llama.LlamaConfig, params: PyTree, seqs: Sequences, num_new: int, *, rng: jax.Array | None = None
) -> jax.Array:
    """The critic's value [R, N] at each response position (``rng``: adapter dropout's key, in training)."""
    values = llama.make_model(value, "value").apply(
        {"params": params}, seqs.input_ids, seqs.attention_mask, seqs.position_ids, rngs=lora.dropout_rngs(rng)
    )
    return response_columns(values, seqs.input_ids.shape[1] - num_new, num_new)


def sequence_scores(reward: llama.LlamaConfig, params: PyTree, seqs: Sequences) -> jax.Array:
    """The reward model's score [R] of each whole sequence (read at its last real token)."""
    return sequences.reward_scores(llama.make_model(reward, "reward"), params, seqs)
