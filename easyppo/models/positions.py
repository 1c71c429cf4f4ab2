"""Where a token is: rotary position embeddings (with the llama3 frequency rescaling) and the
fixed-size KV cache that incremental decoding writes into with ``dynamic_update_slice``."""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from easyppo.models.llama_config import LlamaConfig

# --------------------------------------------------------------------------------------------- RoPE


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """Per-pair rotation frequencies, rescaled the way HF's ``rope_type`` says (a trace-time constant)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, and the band between them is
    # interpolated smoothly.
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates ``x`` [B, T, heads, head_dim] by ``positions`` [B, T] in HF's ``rotate_half`` layout."""
    angles = (positions[..., None].astype(jnp.float32) * inv_freq)[:, :, None, :]  # [B, T, 1, head_dim / 2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    first, second = xf[..., :half], xf[..., half:]
    # x * cos + rotate_half(x) * sin, per half: the same operations in the same order as HF's, without
    # building the doubled angles or the rotated copy.
    return jnp.concatenate([first * cos + (-second) * sin, second * cos + first * sin], axis=-1).astype(x.dtype)


# ------------------------------------------------------------------------------------------ KV cache


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for a fixed number of slots.

    ``keys``/``values`` are [layers, batch, slots, kv_heads, head_dim]; ``mask`` [batch, slots] marks
    slots holding a real token (left padding leaves holes); ``index`` is the next slot to write and is
    shared by the batch, which is what lets one ``dynamic_update_slice`` write a whole step.
    """

    keys: jax.Array
    values: jax.Array
    mask: jax.Array
    index: jax.Array

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]


def init_cache(config: LlamaConfig, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty cache with room for ``max_length`` tokens (prompt plus generated)."""
    shape = (config.num_hidden_layers, batch_size, max_length, config.num_key_value_heads, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    return KVCache(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        mask=jnp.zeros((batch_size, max_length), jnp.bool_),
        index=jnp.zeros((), jnp.int32),
    )
