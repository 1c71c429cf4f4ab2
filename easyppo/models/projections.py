"""The LLaMA trunk's linear projections: plain dense layers, or several fused into one matmul.

Fusing (``LlamaConfig.fuse_projections``) concatenates the kernels of projections that read the same
input (attention's q/k/v, the MLP's gate/up) at compute time. The parameter tree stays the one the
unfused model has, so conversion, partition rules and checkpoints never see the difference. On a
mesh that splits the projections' outputs over ``tensor``, the concatenated kernel needs a re-layout
every step; fuse on data / FSDP meshes, where each device gathers whole kernels anyway.
"""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp

from easyppo.models.llama_config import LlamaConfig


def dense(config: LlamaConfig, features: int, name: str) -> nn.Dense:
    """A bias-free projection to ``features`` in the config's compute and parameter dtypes."""
    return nn.Dense(
        features,
        use_bias=False,
        dtype=config.compute_dtype,
        param_dtype=config.weight_dtype,
        kernel_init=nn.initializers.normal(config.initializer_range),
        name=name,
    )


class Kernel(nn.Module):
    """A bare ``kernel`` parameter [in, out], initialised like the dense layers', so that a fused
    projection keeps the parameter tree (``q_proj/kernel``, ...) that conversion and sharding know."""

    config: LlamaConfig
    shape: tuple[int, int]

    @nn.compact
    def __call__(self) -> jax.Array:
        init = nn.initializers.normal(self.config.initializer_range)
        return self.param("kernel", init, self.shape, self.config.weight_dtype)


def projections(cfg: LlamaConfig, x: jax.Array, outputs: tuple[tuple[str, int], ...]) -> list[jax.Array]:
    """``x`` projected by each named [D, features] kernel; with ``cfg.fuse_projections`` as one matmul
    over the kernels concatenated along their outputs (one wide GEMM runs faster than several narrow
    ones, and its weight gradient is one dot), then split. The parameters are the same either way."""
    if not cfg.fuse_projections:
        return [dense(cfg, features, name)(x) for name, features in outputs]
    kernels = [Kernel(cfg, (x.shape[-1], features), name=name)() for name, features in outputs]
    fused = jnp.concatenate(kernels, axis=1).astype(cfg.compute_dtype)
    out = jnp.einsum("...d,df->...f", x.astype(cfg.compute_dtype), fused)
    bounds = list(itertools.accumulate(features for _, features in outputs))[:-1]
    return jnp.split(out, bounds, axis=-1)
