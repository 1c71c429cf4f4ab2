"""Sampling from a causal LM: one jitted program, a prefill and then a ``lax.while_loop`` decode.

``generate`` runs the whole rollout inside a single compiled program:

1. **prefill** - the (left-padded) prompts go through the model once, filling a fixed-size
   ``KVCache`` and giving the hidden state of each row's last real prompt token. Only that position
   is projected to the vocabulary, so the float32 [B, P, V] logits of the prompt never exist;
2. **decode** - a ``lax.while_loop`` feeds one token per step. The cache lives in the loop carry,
   so XLA updates it in place: it is created inside the program and never crosses a jit boundary,
   which gives the effect of donating it between steps without any host round trip. The loop stops
   after ``max_new_tokens`` or as soon as every row has emitted a stop token, whichever is first.

Because the loop is one compiled program, its compile time does not grow with ``max_new_tokens``,
and ``generate`` compiles once per (model config, sampling config, input shapes, mesh) and is reused.

What comes back (``GenerationOutput``), for every row and every generated position:

* ``tokens`` - the sampled ids; positions after a row stopped hold ``pad_token_id``;
* ``response_mask`` - 1 for generated tokens *including* the stop token that ended the row (a
  reward model scores the response with its EOS, and PPO's per-token rewards land on it), 0 after;
* ``logprobs`` - log p(token) under the **raw policy at temperature 1** (log-softmax of the model's
  logits, no temperature, no truncation): the quantity PPO's trainer recomputes from the rollout
  parameters, so the two differ only by numerics (the "sampler vs trainer gap" metric);
* ``processed_logprobs`` - log p(token) under the distribution actually sampled from (temperature
  scaled, top-k/top-p truncated; 0 for greedy decoding, a point mass), e.g. for importance weights
  of the behaviour policy;
* ``finished`` - whether the row emitted a stop token (PPO penalises responses that never do).

Padding positions have ``logprobs == processed_logprobs == 0``.

Prompts may be padded on either side: the cache mask records the holes and position ids count only
real tokens, so a left-padded batch (the layout that makes every row append at the same column)
generates exactly what each prompt would generate alone. Every row needs at least one real token.

On a mesh (``with jax.set_mesh(mesh):``, parameters sharded by ``easyppo.core.sharding`` rules, prompts
split over the batch axes), the cache and the outputs are pinned to the batch axes (and the cache's
key/value heads to ``tensor``), matching the model's own activation constraints.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
from jax import lax
from jax.sharding import PartitionSpec as P

from easyppo.core import options
from easyppo.core.options import require
from easyppo.core.sharding import BATCH_AXES, constrain
from easyppo.models import llama

PyTree = Any


# ------------------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token and when to stop. Hashable: ``generate`` compiles per config.

    Attributes:
      max_new_tokens: number of tokens to generate per row (fewer if every row stops earlier).
      greedy: take the most likely token (``temperature``, ``top_k`` and ``top_p`` are ignored).
      temperature: logits are divided by it before truncation and sampling; must be > 0 (set
        ``greedy=True`` for argmax decoding).
      top_k: keep only the ``top_k`` most likely tokens (0 disables; values >= vocab keep all).
      top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability
        (after temperature and top-k) sums to at least ``top_p``; the top token is always kept.
        1.0 disables. Tokens tied with the last kept one are kept too.
      stop_at_eos: stop a row when it emits the model config's ``eos_token_id``.
      stop_token_ids: further ids that stop a row (e.g. Llama 3's ``<|eot_id|>``).
      pad_token_id: id written after a row has stopped.
    """

    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_at_eos: bool = True
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        # Config files and command lines give lists; a tuple keeps the config hashable.
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(
            self.greedy or self.temperature > 0,
            "temperature",
            f"must be > 0, got {self.temperature}; set sampling.greedy=True for argmax decoding",
        )
        require(self.top_k >= 0, "top_k", f"must be >= 0 (0 disables top-k), got {self.top_k}")
        require(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1] (1 disables top-p), got {self.top_p}")
        negative = [i for i in self.stop_token_ids if i < 0]
        require(not negative, "stop_token_ids", f"contains negative ids {negative}")
        require(self.pad_token_id >= 0, "pad_token_id", f"must be >= 0, got {self.pad_token_id}")

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any] | ml_collections.ConfigDict, *, name: str = "sampling"
    ) -> SamplingConfig:
        """Builds the config from a ``ConfigDict`` (``config.sampling``) or a plain mapping; errors name ``name.key``."""
        return options.from_config(cls, cfg, name=name)

    def stop_ids(self, model_config: llama.LlamaConfig) -> tuple[int, ...]:
        """Every id that ends a row: the model's EOS (if ``stop_at_eos``) and ``stop_token_ids``."""
        ids = list(self.stop_token_ids)
        if self.stop_at_eos:
            if model_config.eos_token_id is None:
                raise ValueError(
                    "sampling.stop_at_eos=True but the model config has no eos_token_id; set "
                    "sampling.stop_at_eos=False or list the stop ids in sampling.stop_token_ids"
                )
            ids.insert(0, model_config.eos_token_id)
        too_large = [i for i in ids + [self.pad_token_id] if i >= model_config.vocab_size]
        if too_large:
            raise ValueError(
                f"sampling stop/pad token ids {too_large} are outside the vocabulary "
                f"(vocab_size={model_config.vocab_size})"
            )
        return tuple(dict.fromkeys(ids))


def default_config() -> ml_collections.ConfigDict:
    """Every sampling option with its default (from ``SamplingConfig``, the one place they live)."""
    return options.to_config(SamplingConfig())


# ----------------------------------------------------------------------------------- one step


@flax.struct.dataclass
class SampledTokens:
    """One sampling step for a batch: ids [B] and their log-probs (see the module docstring)."""

    tokens: jax.Array
    logprobs: jax.Array
    processed_logprobs: jax.Array


def processed_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """float32 logits [..., V] of the distribution sampled from: temperature, then top-k, then top-p.

    Excluded tokens get ``-inf``, so their probability is exactly 0. The order (temperature before
    truncation, top-k before top-p) is the one ``transformers`` uses, so ``top_p`` refers to the
    temperature-scaled distribution restricted to the top k. Both rules keep ties: a token is kept
    by top-k if fewer than k tokens are strictly more likely, and by top-p if the tokens strictly
    more likely hold less than ``top_p`` of the probability.
    """
    logits = logits.astype(jnp.float32) / sampling.temperature
    vocab = logits.shape[-1]
    top_k = min(sampling.top_k, vocab) if sampling.top_k > 0 else vocab
    if top_k == vocab and sampling.top_p >= 1.0:
        return logits
    # The tokens top-p chooses among: the k largest logits (descending), or the whole row.
    candidates = lax.top_k(logits, top_k)[0] if top_k < vocab else logits
    if sampling.top_p < 1.0:
        threshold = _nucleus_threshold(candidates, sampling.top_p)
    else:
        threshold = candidates[..., -1:]
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _nucleus_threshold(logits: jax.Array, top_p: float) -> jax.Array:
    """The smallest logit [..., 1] such that the strictly larger ones hold less than ``top_p`` mass.

    Found by bisection over the 2**32 float32 values in their sortable integer encoding: 32 masked
    sums over the row, exact (the result is one of the logits), and no sort. XLA's CPU sort is slow:
    for 64 rows of a 32k vocabulary the bisection took ~60 ms where a full sort took ~600 ms.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    keys = _sortable_key(logits)
    # Invariant: the mass above `low` is >= top_p (everything is above min - 1), above `high` < top_p.
    low = jnp.min(keys, axis=-1, keepdims=True) - 1
    high = jnp.max(keys, axis=-1, keepdims=True)

    def halve(_, bounds):
        low, high = bounds
        mid = low + (high - low) // 2
        mass_above = jnp.sum(jnp.where(keys > mid, probs, 0.0), axis=-1, keepdims=True)
        below = mass_above < top_p
        return jnp.where(below, low, mid), jnp.where(below, mid, high)

    _, high = lax.fori_loop(0, 32, halve, (low, high))
    return _from_sortable_key(high)  # the mass above changes only at logits, so this is one of them


def _sortable_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (negative floats have their bits reversed)."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_sortable_key(key: jax.Array) -> jax.Array:
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return lax.bitcast_convert_type(bits, jnp.float32)


def sample_next_token(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> SampledTokens:
    """Picks one token per row from next-token ``logits`` [B, V] (a pure function of its inputs).

    Returns the ids, their log-prob under the raw policy at temperature 1, and their log-prob under
    the processed distribution they were drawn from (0 for greedy decoding).
    """
    logits = logits.astype(jnp.float32)
    if sampling.greedy:
        tokens = jnp.argmax(logits, axis=-1)
        processed_logprobs = jnp.zeros(tokens.shape, jnp.float32)
    else:
        processed = processed_logits(logits, sampling)
        tokens = jax.random.categorical(rng, processed, axis=-1)
        processed_logprobs = _logprob_of(processed, tokens)
    return SampledTokens(
        tokens=tokens.astype(jnp.int32),
        logprobs=_logprob_of(logits, tokens),
        processed_logprobs=processed_logprobs,
    )


def _logprob_of(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]


# ----------------------------------------------------------------------------------- generation


@flax.struct.dataclass
class GenerationOutput:
    """Generated responses [B, max_new_tokens] (see the module docstring for each field)."""

    tokens: jax.Array  # int32 [B, N]
    logprobs: jax.Array  # float32 [B, N], raw policy at temperature 1
    processed_logprobs: jax.Array  # float32 [B, N], the distribution sampled from
    response_mask: jax.Array  # int32 [B, N], 1 up to and including the stop token
    finished: jax.Array  # bool [B], emitted a stop token


@flax.struct.dataclass
class _DecodeState:
    step: jax.Array  # the output column the next sampled token goes to
    cache: llama.KVCache
    last_token: jax.Array  # [B], fed to the model at this step
    done: jax.Array  # [B] bool, a stop token has been emitted
    out: GenerationOutput


# Cache layout [layers, batch, slots, kv_heads, head_dim]: rows follow the batch axes, heads follow
# the tensor-parallel attention (whole KV heads per ``tensor`` shard).
_CACHE_SPEC = P(None, BATCH_AXES, None, "tensor", None)


def _constrain_cache(cache: llama.KVCache) -> llama.KVCache:
    return cache.replace(
        keys=constrain(cache.keys, _CACHE_SPEC),
        values=constrain(cache.values, _CACHE_SPEC),
        mask=constrain(cache.mask, P(BATCH_AXES)),
    )


def _check_inputs(
    prompt_ids: jax.Array, prompt_mask: jax.Array, model_config: llama.LlamaConfig, sampling: SamplingConfig
) -> None:
    if prompt_ids.ndim != 2:
        raise ValueError(f"generate: prompt_ids must be [batch, prompt_len], got shape {prompt_ids.shape}")
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"generate: prompt_mask shape {prompt_mask.shape} must equal prompt_ids shape {prompt_ids.shape}"
        )
    if not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
        raise ValueError(f"generate: prompt_ids must be integer token ids, got dtype {prompt_ids.dtype}")
    total = prompt_ids.shape[1] + sampling.max_new_tokens
    if total > model_config.max_position_embeddings:
        raise ValueError(
            f"generate: prompt length {prompt_ids.shape[1]} + sampling.max_new_tokens="
            f"{sampling.max_new_tokens} = {total} exceeds the model's max_position_embeddings="
            f"{model_config.max_position_embeddings}"
        )


@functools.partial(jax.jit, static_argnames=("model_config", "sampling"))
def generate(
    params: PyTree,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    *,
    model_config: llama.LlamaConfig,
    sampling: SamplingConfig,
) -> GenerationOutput:
    """Samples ``sampling.max_new_tokens`` tokens after each prompt (one compiled program).

    Args:
      params: causal-LM parameters (``llama.LlamaForCausalLM`` tree, either layer layout).
      prompt_ids: [B, P] integer ids, normally left-padded.
      prompt_mask: [B, P] 1 for real tokens, 0 for padding; every row needs a real token.
      rng: a PRNG key; step t samples with ``fold_in(rng, t)``, so the result does not depend on
        how the batch is sharded.
      model_config: the architecture (static: part of the compilation key).
      sampling: how to sample and when to stop (static).

    Returns:
      A ``GenerationOutput`` of [B, max_new_tokens] arrays and ``finished`` [B].
    """
    _check_inputs(prompt_ids, prompt_mask, model_config, sampling)
    batch, prompt_len = prompt_ids.shape
    max_new = sampling.max_new_tokens
    stop_ids = jnp.asarray(sampling.stop_ids(model_config), jnp.int32)
    model = llama.LlamaForCausalLM(model_config)
    lm_head = llama.output_embedding(params, model_config)

    def next_token(hidden: jax.Array, step: jax.Array) -> SampledTokens:
        logits = llama.project_logits(hidden, lm_head, model_config)  # [B, V] float32
        logits = constrain(logits, P(BATCH_AXES))
        return sample_next_token(logits, jax.random.fold_in(rng, step), sampling)

    def is_stop(tokens: jax.Array) -> jax.Array:
        return jnp.isin(tokens, stop_ids) if stop_ids.size else jnp.zeros(tokens.shape, jnp.bool_)

    # Prefill. The last generated token is never fed back, hence one slot fewer than P + N.
    cache = _constrain_cache(llama.init_cache(model_config, batch, prompt_len + max_new - 1))
    hidden, cache = model.apply(
        {"params": params}, prompt_ids, prompt_mask, cache=cache, method=llama.LlamaForCausalLM.hidden_states
    )
    last_real = llama.last_token_index(prompt_mask)
    first = next_token(hidden[jnp.arange(batch), last_real], jnp.int32(0))

    def empty(dtype, fill=0):
        return constrain(jnp.full((batch, max_new), fill, dtype), P(BATCH_AXES))

    out = GenerationOutput(
        tokens=empty(jnp.int32, sampling.pad_token_id).at[:, 0].set(first.tokens),
        logprobs=empty(jnp.float32).at[:, 0].set(first.logprobs),
        processed_logprobs=empty(jnp.float32).at[:, 0].set(first.processed_logprobs),
        response_mask=empty(jnp.int32).at[:, 0].set(1),
        finished=jnp.zeros((batch,), jnp.bool_),
    )
    state = _DecodeState(
        step=jnp.int32(1),
        cache=_constrain_cache(cache),
        last_token=first.tokens,
        done=is_stop(first.tokens),
        out=out,
    )

    def keep_going(state: _DecodeState) -> jax.Array:
        return (state.step < max_new) & ~jnp.all(state.done)

    def decode_step(state: _DecodeState) -> _DecodeState:
        hidden, cache = model.apply(
            {"params": params},
            state.last_token[:, None],
            jnp.ones((batch, 1), jnp.int32),
            cache=state.cache,
            method=llama.LlamaForCausalLM.hidden_states,
        )
        sampled = next_token(hidden[:, 0], state.step)
        active = ~state.done
        tokens = jnp.where(active, sampled.tokens, sampling.pad_token_id)

        def write(buffer: jax.Array, column: jax.Array) -> jax.Array:
            column = jnp.where(active, column, jnp.zeros_like(column)).astype(buffer.dtype)
            return lax.dynamic_update_slice(buffer, column[:, None], (0, state.step))

        out = state.out.replace(
            tokens=lax.dynamic_update_slice(state.out.tokens, tokens[:, None], (0, state.step)),
            logprobs=write(state.out.logprobs, sampled.logprobs),
            processed_logprobs=write(state.out.processed_logprobs, sampled.processed_logprobs),
            response_mask=write(state.out.response_mask, jnp.ones_like(tokens)),
        )
        return state.replace(
            step=state.step + 1,
            cache=_constrain_cache(cache),
            last_token=tokens,
            done=state.done | (active & is_stop(tokens)),
            out=out,
        )

    state = lax.while_loop(keep_going, decode_step, state)
    return state.out.replace(finished=constrain(state.done, P(BATCH_AXES)))
