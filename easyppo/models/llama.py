"""The LLaMA family (Llama 2, Llama 3 / 3.1, Tulu 2 / 2.5) as pure Flax linen modules.

One trunk serves every model in the library; only the head differs:

* ``LlamaForCausalLM`` - next-token logits (policy, reference and SFT models);
* ``LlamaForScore(head="reward")`` - one scalar per sequence, read at the last real token;
* ``LlamaForScore(head="value")`` - one scalar per token (the PPO critic).

Reward and value models have identical parameter trees, so a reward checkpoint initialises a value
model directly. The numerics follow Hugging Face ``transformers`` exactly (RMSNorm in float32,
``rotate_half`` RoPE, the ``llama3`` frequency rescaling), which is what makes checkpoint conversion a
pure renaming of tensors.

Padding is explicit: every call takes an ``attention_mask`` and derives position ids from it, so a
left-padded batch produces, for its real tokens, the same numbers as the unpadded sequences.
Incremental decoding uses a fixed-size ``KVCache`` pytree written with ``dynamic_update_slice``.
The architecture (``LlamaConfig``, presets) lives in ``llama_config``, RoPE and the KV cache in
``positions``; both are re-exported here.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from easyppo.core.sharding import BATCH_AXES, constrain
from easyppo.models.attention import attend
from easyppo.models.llama_config import PRESETS, REMAT_POLICIES, LlamaConfig, RopeScaling, get_preset
from easyppo.models.positions import KVCache, apply_rope, init_cache, rope_inverse_frequencies
from easyppo.models.projections import dense, projections

__all__ = [  # re-exported: the model's config, positions and cache
    "PRESETS",
    "REMAT_POLICIES",
    "KVCache",
    "LlamaConfig",
    "RopeScaling",
    "apply_rope",
    "get_preset",
    "init_cache",
    "rope_inverse_frequencies",
]  # re-exported: the model's config

# ------------------------------------------------------------------------------------------ modules


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled after casting back (as HF does)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.config.weight_dtype)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        return scale.astype(self.config.compute_dtype) * normed.astype(self.config.compute_dtype)


class Embedding(nn.Module):
    """Token embedding table [V, D] (parameter ``embedding``).

    The lookup first gathers the table's fsdp-sharded D axis (keeping the vocab split over
    ``tensor``): looking rows up in a table split on D would hand the first block activations split
    on D, which XLA can only re-layout by copying the whole batch to every device.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        table = self.param(
            "embedding",
            nn.initializers.normal(cfg.initializer_range),
            (cfg.vocab_size, cfg.hidden_size),
            cfg.weight_dtype,
        )
        table = constrain(table.astype(cfg.compute_dtype), P("tensor", None))
        return jnp.take(table, input_ids, axis=0)


class LlamaAttention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, mask, stacked_cache, layer, cache_index):
        cfg = self.config
        batch, length, _ = x.shape
        kv_features = cfg.num_key_value_heads * cfg.head_dim
        q, k, v = projections(
            cfg,
            x,
            (("q_proj", cfg.num_attention_heads * cfg.head_dim), ("k_proj", kv_features), ("v_proj", kv_features)),
        )
        q = q.reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(batch, length, cfg.num_key_value_heads, cfg.head_dim)
        v = v.reshape(batch, length, cfg.num_key_value_heads, cfg.head_dim)
        inv_freq = rope_inverse_frequencies(cfg)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if stacked_cache is not None:
            # Write only the new tokens' slots of this layer, in place in the stacked [L, B, S, ...]
            # buffer, then read this layer back for attention: no per-step copy of the whole cache.
            all_k, all_v = stacked_cache
            start = (layer, 0, cache_index, 0, 0)
            all_k = jax.lax.dynamic_update_slice(all_k, k[None].astype(all_k.dtype), start)
            all_v = jax.lax.dynamic_update_slice(all_v, v[None].astype(all_v.dtype), start)
            stacked_cache = (all_k, all_v)
            k = jax.lax.dynamic_index_in_dim(all_k, layer, keepdims=False)
            v = jax.lax.dynamic_index_in_dim(all_v, layer, keepdims=False)
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale=1.0 / math.sqrt(cfg.head_dim))
        out = out.reshape(batch, length, cfg.num_attention_heads * cfg.head_dim)
        return dense(cfg, cfg.hidden_size, "o_proj")(out), stacked_cache


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate, up = projections(cfg, x, (("gate_proj", cfg.intermediate_size), ("up_proj", cfg.intermediate_size)))
        return dense(cfg, cfg.hidden_size, "down_proj")(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    """Pre-norm attention and SwiGLU MLP with residuals.

    ``((hidden, stacked_cache), layer) -> ((hidden, stacked_cache), None)`` so the same block runs
    unrolled or under ``nn.scan``; the stacked KV cache (or None) travels in the carry, and each layer
    updates its own slots of it in place.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, carry, layer, positions, mask, cache_index):
        hidden, stacked_cache = carry
        hidden = constrain(hidden, P(BATCH_AXES))
        attn_out, stacked_cache = LlamaAttention(self.config, name="self_attn")(
            RMSNorm(self.config, name="input_layernorm")(hidden), positions, mask, stacked_cache, layer, cache_index
        )
        hidden = hidden + attn_out
        mlp_out = LlamaMLP(self.config, name="mlp")(RMSNorm(self.config, name="post_attention_layernorm")(hidden))
        return (hidden + mlp_out, stacked_cache), None


def _attention_mask(attention_mask: jax.Array, cache: KVCache | None) -> tuple[jax.Array, jax.Array | None]:
    """[B, 1, T, S] boolean mask: causal, and blind to padding (and to empty cache slots)."""
    length = attention_mask.shape[1]
    query_slots = jnp.arange(length)[:, None]
    if cache is None:
        key_valid = attention_mask.astype(jnp.bool_)
        key_slots = jnp.arange(length)[None, :]
        new_cache_mask = None
    else:
        new_cache_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask.astype(jnp.bool_), (0, cache.index))
        key_valid = new_cache_mask
        key_slots = jnp.arange(cache.max_length)[None, :]
        query_slots = query_slots + cache.index
    causal = key_slots <= query_slots  # [T, S]
    return (causal[None, None] & key_valid[:, None, None, :]), new_cache_mask


def default_position_ids(attention_mask: jax.Array, cache: KVCache | None = None) -> jax.Array:
    """Positions that count only real tokens, so left padding does not shift RoPE."""
    mask = attention_mask.astype(jnp.int32)
    offset = 0 if cache is None else cache.mask.sum(axis=-1, keepdims=True, dtype=jnp.int32)
    return jnp.maximum(offset + jnp.cumsum(mask, axis=-1) - 1, 0)


class LlamaModel(nn.Module):
    """Embeddings, the decoder stack and the final norm: hidden states [B, T, D]."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, cache)
        mask, new_cache_mask = _attention_mask(attention_mask, cache)
        cache_index = None if cache is None else cache.index

        hidden = Embedding(cfg, name="embed_tokens")(input_ids)

        block = LlamaBlock
        if REMAT_POLICIES[cfg.remat] is not None:
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)

        carry = (hidden, None if cache is None else (cache.keys, cache.values))
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_hidden_layers,
            )
            layers = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
            (hidden, stacked_cache), _ = stack(cfg, name="layers")(carry, layers, position_ids, mask, cache_index)
        else:
            for i in range(cfg.num_hidden_layers):
                carry, _ = block(cfg, name=f"layers_{i}")(carry, i, position_ids, mask, cache_index)
            hidden, stacked_cache = carry
        hidden = RMSNorm(cfg, name="norm")(constrain(hidden, P(BATCH_AXES)))
        if cache is None:
            return hidden, None
        keys, values = stacked_cache
        new_cache = KVCache(keys=keys, values=values, mask=new_cache_mask, index=cache.index + input_ids.shape[1])
        return hidden, new_cache


def output_embedding(params: dict, config: LlamaConfig) -> jax.Array:
    """The [D, V] matrix that maps hidden states to logits: ``lm_head`` or the tied embedding."""
    if config.tie_word_embeddings:
        return params["model"]["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


def project_logits(hidden: jax.Array, kernel: jax.Array, config: LlamaConfig) -> jax.Array:
    """Hidden states times the [D, V] output matrix, in the compute dtype with float32 results."""
    return jnp.einsum("...d,dv->...v", hidden, kernel.astype(config.compute_dtype), preferred_element_type=jnp.float32)


class LMHead(nn.Module):
    """The untied output projection; a module of its own so its parameter is ``lm_head/kernel``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        cfg = self.config
        kernel = self.param(
            "kernel",
            nn.initializers.normal(cfg.initializer_range),
            (cfg.hidden_size, cfg.vocab_size),
            cfg.weight_dtype,
        )
        return project_logits(hidden, kernel, cfg)


class LlamaForCausalLM(nn.Module):
    """Next-token logits (float32) [B, T, V]; with a ``cache``, returns ``(logits, new_cache)``."""

    config: LlamaConfig

    def setup(self):
        self.model = LlamaModel(self.config)
        if not self.config.tie_word_embeddings:
            self.lm_head = LMHead(self.config)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """Final normed hidden states [B, T, D] (and the new cache when one is given).

        Algorithms use this with ``output_embedding`` to compute log-probs in chunks, never holding
        the float32 [B, T, V] logits of a long batch at once.
        """
        hidden, new_cache = self.model(input_ids, attention_mask, position_ids, cache)
        return hidden if cache is None else (hidden, new_cache)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        hidden, new_cache = self.model(input_ids, attention_mask, position_ids, cache)
        if self.config.tie_word_embeddings:
            embedding = self.model.variables["params"]["embed_tokens"]["embedding"]
            logits = project_logits(hidden, embedding.T, self.config)
        else:
            logits = self.lm_head(hidden)
        return logits if cache is None else (logits, new_cache)


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the last real token of each row; works for left and right padding alike."""
    positions = jnp.arange(attention_mask.shape[-1])
    return jnp.argmax(jnp.where(attention_mask.astype(jnp.bool_), positions, -1), axis=-1)


def score_token_index(input_ids: jax.Array, attention_mask: jax.Array, pad_token_id: int | None) -> jax.Array:
    """Where a reward model reads each row's score: its last real token that is not the pad id.

    This is ``transformers``' rule for ``LlamaForSequenceClassification`` (the last position whose id is
    not ``pad_token_id``), so scores agree with it even when the pad id is the EOS id and rows end in
    EOS (Llama 3 checkpoints often set ``pad_token_id = eos_token_id``): both then read the token before
    the final EOS. Where the pad id never occurs in a row's text, this is its last real token.
    """
    readable = attention_mask.astype(jnp.bool_)
    if pad_token_id is not None:
        readable &= input_ids != pad_token_id
    return last_token_index(readable)


class LlamaForScore(nn.Module):
    """Scalar head on the trunk: ``head="reward"`` gives [B] where ``transformers`` reads it (the last real
    token that is not the pad id: ``score_token_index``), ``"value"`` [B, T].

    The head is a bias-free ``score`` projection (HF's ``LlamaForSequenceClassification`` with one
    label) initialised with std 1/sqrt(D), so the initial scores are O(1) whatever the width.
    """

    config: LlamaConfig
    head: Literal["reward", "value"] = "reward"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        if self.head not in ("reward", "value"):
            raise ValueError(f"head={self.head!r} must be 'reward' or 'value'")
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        hidden, _ = LlamaModel(cfg, name="model")(input_ids, attention_mask, position_ids)
        scores = nn.Dense(
            1,
            use_bias=False,
            dtype=jnp.float32,
            param_dtype=cfg.weight_dtype,
            kernel_init=nn.initializers.normal(1.0 / math.sqrt(cfg.hidden_size)),
            name="score",
        )(hidden.astype(jnp.float32))[..., 0]
        if self.head == "value":
            return scores
        index = score_token_index(input_ids, attention_mask, cfg.pad_token_id)
        return jnp.take_along_axis(scores, index[:, None], axis=1)[:, 0]


def make_model(config: LlamaConfig, kind: str = "causal_lm") -> nn.Module:
    """The module for ``kind`` in {"causal_lm", "reward", "value"}."""
    if kind == "causal_lm":
        return LlamaForCausalLM(config)
    if kind in ("reward", "value"):
        return LlamaForScore(config, head=kind)
    raise ValueError(f"kind={kind!r} must be one of 'causal_lm', 'reward', 'value'")


def init_params(config: LlamaConfig, kind: str, rng: jax.Array, *, seq_len: int = 8) -> dict:
    """Unsharded random parameters (tests and tiny models); see ``easyppo.core.sharding`` for sharded init."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return jax.jit(make_model(config, kind).init)(rng, tokens)["params"]


def abstract_params(config: LlamaConfig, kind: str) -> dict:
    """Shapes and dtypes of ``kind``'s parameter tree, allocating nothing (a fresh tree: callers may edit it).

    The one builder of abstract parameters; ``easyppo.weights.loading.abstract_params`` adds shardings.
    """
    return jax.tree.map(lambda leaf: leaf, _traced_params(config, kind))


@functools.lru_cache(maxsize=16)
def _traced_params(config: LlamaConfig, kind: str) -> dict:
    # Tracing the model takes a noticeable fraction of a second; a run and a conversion ask several times.
    return jax.eval_shape(functools.partial(init_params, config, kind), jax.random.key(0))


def stack_layers(params: dict, num_layers: int) -> dict:
    """Unrolled layout (``model/layers_{i}``) -> scanned layout (``model/layers`` with a layer axis)."""
    model = dict(params["model"])
    layers = [model.pop(f"layers_{i}") for i in range(num_layers)]
    model["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return {**params, "model": model}


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Scanned layout -> unrolled layout; the inverse of ``stack_layers``."""
    model = dict(params["model"])
    stacked = model.pop("layers")
    for i in range(num_layers):
        model[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {**params, "model": model}
