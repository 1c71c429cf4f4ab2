"""The LLaMA trunk's linear projections: plain dense layers, or several fused into one matmul.

Every projection is applied as one 2-D matrix product over all leading positions ([B * T, D] by
[D, F]). With [B, T, D] inputs the weight gradient contracts over two dimensions, which XLA:CPU runs
on a slow path; flattened it is one plain matrix product (the MLP's backward: -27% on a 2-core AMD
EPYC, docs/performance.md).

Fusing (``LlamaConfig.fuse_projections``) concatenates the kernels of projections that read the same
input (attention's q/k/v, the MLP's gate/up) at compute time. The parameter tree stays the one the
unfused model has (``q_proj/kernel`` ..., as ``nn.Dense`` names it), so conversion, partition rules
and checkpoints never see the difference. On a mesh that splits the projections' outputs over
``tensor``, the concatenated kernel needs a re-layout every step; fuse on data / FSDP meshes, where
each device gathers whole kernels anyway.
"""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp

from easyppo.models.llama_config import LlamaConfig


class Kernel(nn.Module):
    """A bare ``kernel`` parameter [in, out], initialised like a dense layer's."""

    config: LlamaConfig
    shape: tuple[int, int]

    @nn.compact
    def __call__(self) -> jax.Array:
        init = nn.initializers.normal(self.config.initializer_range)
        return self.param("kernel", init, self.shape, self.config.weight_dtype)


def matmul(x: jax.Array, kernel: jax.Array, config: LlamaConfig) -> jax.Array:
    """``x`` [..., D] times ``kernel`` [D, F] in the compute dtype, as one [N, D] x [D, F] product."""
    dtype = config.compute_dtype
    flat = x.reshape(-1, x.shape[-1]).astype(dtype)
    return jnp.dot(flat, kernel.astype(dtype)).reshape(*x.shape[:-1], kernel.shape[-1])


def dense(config: LlamaConfig, features: int, name: str):
    """The projection called ``name`` to ``features`` outputs: a callable on [..., D] inputs."""
    return lambda x: projections(config, x, ((name, features),))[0]


def projections(cfg: LlamaConfig, x: jax.Array, outputs: tuple[tuple[str, int], ...]) -> list[jax.Array]:
    """``x`` projected by each named [D, features] kernel; with ``cfg.fuse_projections`` as one matmul
    over the kernels concatenated along their outputs, then split. The parameters are the same either way."""
    kernels = [Kernel(cfg, (x.shape[-1], features), name=name)() for name, features in outputs]
    if not cfg.fuse_projections or len(kernels) == 1:
        return [matmul(x, kernel, cfg) for kernel in kernels]
    out = matmul(x, jnp.concatenate(kernels, axis=1), cfg)
    bounds = list(itertools.accumulate(features for _, features in outputs))[:-1]
    return jnp.split(out, bounds, axis=-1)
