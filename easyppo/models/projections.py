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
    """A bare ``kernel`` parameter [in, out], initialised like a dense layer's, and its LoRA adapter.

    Called on the projection's input ``x``, returns ``(kernel, delta)``: ``delta`` is the adapter's
    contribution ``scale * dropout(x) @ lora_a @ lora_b`` [..., out], or None for a projection without
    one. Adapters are created at init when ``config.lora`` targets this projection, and applied where
    the parameters hold them (``easyppo.models.lora``). Dropout acts only when the caller passes a
    ``dropout`` rng (the training forward passes).
    """

    config: LlamaConfig
    shape: tuple[int, int]

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.config
        # The kernel first: in an unrolled stack its init key is then the same with and without
        # adapters (a scanned one differs, which is why weights/loading.py builds bases without them).
        kernel = self.param("kernel", nn.initializers.normal(cfg.initializer_range), self.shape, cfg.weight_dtype)
        lora = cfg.lora
        if lora is None or self.name not in lora.targets:
            return kernel, None
        if not (self.is_initializing() or self.has_variable("params", "lora_a")):
            return kernel, None  # adapters switched off: the base tree alone
        fan_in, fan_out = self.shape
        # Float32 master weights whatever the base's param_dtype: a bfloat16 base halves the frozen
        # memory while the trained part keeps full precision (its optimizer state follows it).
        a = self.param("lora_a", nn.initializers.lecun_normal(), (fan_in, lora.rank), jnp.float32)
        b = self.param("lora_b", nn.initializers.zeros, (lora.rank, fan_out), jnp.float32)
        if lora.dropout and self.has_rng("dropout"):
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - lora.dropout), 0.0).astype(x.dtype)
        return kernel, matmul(matmul(x, a, cfg), b, cfg) * jnp.asarray(lora.scale, cfg.compute_dtype)


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
    over the kernels concatenated along their outputs, then split. The parameters are the same either
    way. Adapters add their low-rank term to their own projection's output."""
    pairs = [Kernel(cfg, (x.shape[-1], features), name=name)(x) for name, features in outputs]
    kernels = [kernel for kernel, _ in pairs]
    if not cfg.fuse_projections or len(kernels) == 1:
        outs = [matmul(x, kernel, cfg) for kernel in kernels]
    else:
        out = matmul(x, jnp.concatenate(kernels, axis=1), cfg)
        bounds = list(itertools.accumulate(features for _, features in outputs))[:-1]
        outs = jnp.split(out, bounds, axis=-1)
    return [out if delta is None else out + delta for out, (_, delta) in zip(outs, pairs)]
