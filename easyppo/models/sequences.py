"""Prompt + generated response as one sequence batch, the layout every scoring model reads.

Generation returns left-padded prompts ``[B, P]`` and right-padded responses ``[B, N]`` (tokens after
a row's stop token are padding). Placing them side by side gives ``[B, P + N]`` rows with holes on
both ends; the attention mask records the holes and the position ids count only real tokens, so
every model (policy, reference, reward, value) sees exactly what it would see for the unpadded text.

Layout facts the rest of the library relies on:

* response token ``t`` sits at column ``P + t``; it is *predicted* by the hidden state at column
  ``P + t - 1`` (the last prompt token predicts the first response token). So the per-token
  log-probs and values of the response are read from columns ``P - 1 .. P + N - 2``;
* the last real token of a row is its last response token (the stop token if it emitted one), where
  a reward model reads its score (``llama.last_token_index``).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from easyppo.models import llama


@flax.struct.dataclass
class Sequences:
    """A [B, T] batch of full sequences: ids, 0/1 attention mask and position ids (int32)."""

    input_ids: jax.Array
    attention_mask: jax.Array
    position_ids: jax.Array


def join_prompt_and_response(
    prompt_ids: jax.Array, prompt_mask: jax.Array, response_ids: jax.Array, response_mask: jax.Array
) -> Sequences:
    """[B, P] prompts and [B, N] responses -> [B, P + N] sequences (see the module docstring)."""
    if prompt_ids.shape[0] != response_ids.shape[0]:
        raise ValueError(f"prompts ({prompt_ids.shape[0]} rows) and responses ({response_ids.shape[0]} rows) differ")
    input_ids = jnp.concatenate([prompt_ids, response_ids], axis=1).astype(jnp.int32)
    attention_mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
    return Sequences(input_ids, attention_mask, llama.default_position_ids(attention_mask))


def response_columns(values: jax.Array, prompt_len: int, num_new_tokens: int) -> jax.Array:
    """The [B, N] slice of per-position ``values`` [B, P + N, ...] that predicts each response token."""
    return jax.lax.slice_in_dim(values, prompt_len - 1, prompt_len - 1 + num_new_tokens, axis=1)


def reward_scores(module, params, sequences: Sequences) -> jax.Array:
    """float32 [B] reward-model scores of full sequences (read at each row's last real token)."""
    return module.apply({"params": params}, sequences.input_ids, sequences.attention_mask, sequences.position_ids)
