"""Token log-probabilities from final hidden states, chunked, with a hand-written backward pass.

Every algorithm's loss reads ``log p(target)`` at some positions: ``token_logprobs`` computes it
from the trunk's hidden states and the LM-head matrix without ever holding the [B, T, V] logits:
the sequence is cut into chunks of ``chunk_size`` positions and a ``lax.scan`` projects one chunk at
a time.

Why a custom VJP: the autodiff of ``logits[target] - logsumexp(logits)`` transposes the gather into
a scatter into a [B, C, V] zero array and the logsumexp into a second softmax pass, and under
rematerialisation it recomputes the forward of each chunk before doing so. The derivative is known
in closed form, ``d logp / d logits = onehot(target) - softmax(logits)``, so the backward here
recomputes each chunk's logits once, forms ``g * (onehot - p)`` in one fused element-wise pass
from the log-normaliser saved by the forward ([B, T] floats), and multiplies it into both
gradients: ``dh = dlogits W^T`` and ``dW += h^T dlogits`` (accumulated over chunks in float32).
tests/test_logprobs.py checks both gradients against autodiff of the naive full-logits formula.

The entropy (``return_entropy``, used only by an entropy bonus) keeps the autodiff path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def gather_last(values: jax.Array, ids: jax.Array) -> jax.Array:
    """values[..., ids] along the last axis, ids clipped into range."""
    picked = jnp.take_along_axis(values, ids[..., None].astype(jnp.int32), axis=-1, mode="clip")
    return picked[..., 0]


def token_logprobs(
    hidden: jax.Array,
    output_embedding: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int,
    return_entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """log p(target) per position from final hidden states, without materialising [B, T, V] logits.

    Args:
      hidden: [B, T, D] final (normed) hidden states in the compute dtype.
      output_embedding: [D, V] LM-head matrix (`llama.output_embedding(params, config)`). It is cast
        to `hidden.dtype`, so the matmul runs in the compute dtype (bf16 on accelerators) while
        accumulating in float32; the gradient still flows to the float32 master weights.
      targets: [B, T] integer ids; position t holds the token that position t predicts (see
        `ops.shift_for_next_token`). Ids outside [0, V) are clipped, so masked positions may hold
        any id.
      chunk_size: number of sequence positions per chunk. Peak extra memory is about
        B * chunk_size * V float32 values, in the forward *and* the backward pass.
      return_entropy: also return the per-position entropy of the predictive distribution.

    Returns:
      float32 [B, T] log-probs, or (log-probs, entropy) when `return_entropy`.
    """
    if hidden.ndim != 3:
        raise ValueError(f"token_logprobs: hidden must be [B, T, D], got shape {hidden.shape}")
    if output_embedding.ndim != 2 or output_embedding.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"token_logprobs: output_embedding must be [D={hidden.shape[-1]}, V], got shape {output_embedding.shape}"
        )
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"token_logprobs: targets shape {targets.shape} must equal hidden's [B, T] {hidden.shape[:2]}")
    if chunk_size < 1:
        raise ValueError(f"token_logprobs: chunk_size must be >= 1, got {chunk_size}")

    batch, seq_len, _ = hidden.shape
    chunk_size = max(min(chunk_size, seq_len), 1)
    num_chunks = -(-seq_len // chunk_size)
    pad = num_chunks * chunk_size - seq_len
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))

    # [B, N*C, ...] -> [N, B, C, ...]: the scan walks over the leading chunk axis.
    hidden_chunks = hidden.reshape(batch, num_chunks, chunk_size, -1).swapaxes(0, 1)
    target_chunks = targets.reshape(batch, num_chunks, chunk_size).swapaxes(0, 1).astype(jnp.int32)
    weight = output_embedding.astype(hidden.dtype)

    def unchunk(x):  # [N, B, C] -> [B, T]
        return x.swapaxes(0, 1).reshape(batch, num_chunks * chunk_size)[:, :seq_len]

    if return_entropy:
        logp, entropy = _logprobs_and_entropy(hidden_chunks, weight, target_chunks)
        return unchunk(logp), unchunk(entropy)
    return unchunk(chunked_logprobs(hidden_chunks, weight, target_chunks))


def _chunk_logits(hidden_chunk: jax.Array, weight: jax.Array) -> jax.Array:
    return jnp.einsum("bcd,dv->bcv", hidden_chunk, weight, preferred_element_type=jnp.float32)


def _forward(hidden_chunks, weight, target_chunks):
    """(log-probs, log-normalisers), both float32 [N, B, C]."""

    def body(carry, chunk):
        hidden_chunk, target_chunk = chunk
        logits = _chunk_logits(hidden_chunk, weight)
        log_normalizer = jax.nn.logsumexp(logits, axis=-1)
        return carry, (gather_last(logits, target_chunk) - log_normalizer, log_normalizer)

    _, (logp, log_normalizer) = lax.scan(body, None, (hidden_chunks, target_chunks))
    return logp, log_normalizer


@jax.custom_vjp
def chunked_logprobs(hidden_chunks: jax.Array, weight: jax.Array, target_chunks: jax.Array) -> jax.Array:
    """log p(target) [N, B, C] of chunked hidden states [N, B, C, D] under the head ``weight`` [D, V]."""
    return _forward(hidden_chunks, weight, target_chunks)[0]


def _chunked_logprobs_fwd(hidden_chunks, weight, target_chunks):
    logp, log_normalizer = _forward(hidden_chunks, weight, target_chunks)
    return logp, (hidden_chunks, weight, target_chunks, log_normalizer)


def _chunked_logprobs_bwd(residuals, cotangent):
    hidden_chunks, weight, target_chunks, log_normalizer = residuals
    vocab = weight.shape[-1]

    def body(weight_grad, chunk):
        hidden_chunk, target_chunk, normalizer_chunk, g = chunk
        logits = _chunk_logits(hidden_chunk, weight)
        probs = jnp.exp(logits - normalizer_chunk[..., None])
        onehot = jnp.arange(vocab, dtype=jnp.int32) == jnp.clip(target_chunk, 0, vocab - 1)[..., None]
        dlogits = (g[..., None] * (onehot.astype(jnp.float32) - probs)).astype(hidden_chunk.dtype)
        hidden_grad = jnp.einsum("bcv,dv->bcd", dlogits, weight, preferred_element_type=jnp.float32)
        # As one [D, B*C] x [B*C, V] product: contracting two dimensions takes XLA:CPU's slow path.
        flat_hidden, flat_dlogits = hidden_chunk.reshape(-1, hidden_chunk.shape[-1]), dlogits.reshape(-1, vocab)
        weight_grad = weight_grad + jnp.dot(flat_hidden.T, flat_dlogits, preferred_element_type=jnp.float32)
        return weight_grad, hidden_grad.astype(hidden_chunk.dtype)

    zero = jnp.zeros(weight.shape, jnp.float32)
    weight_grad, hidden_grad = lax.scan(body, zero, (hidden_chunks, target_chunks, log_normalizer, cotangent))
    return hidden_grad, weight_grad.astype(weight.dtype), None


chunked_logprobs.defvjp(_chunked_logprobs_fwd, _chunked_logprobs_bwd)


def _logprobs_and_entropy(hidden_chunks, weight, target_chunks):
    """Log-probs and entropies [N, B, C] by autodiff, each chunk rematerialised in the backward."""

    @jax.checkpoint
    def chunk_stats(hidden_chunk, target_chunk):
        logits = _chunk_logits(hidden_chunk, weight)
        log_normalizer = jax.nn.logsumexp(logits, axis=-1)
        logp = gather_last(logits, target_chunk) - log_normalizer
        # H = log Z - E_p[logit], which avoids forming a second [B, C, V] array of log-probs.
        probs = jnp.exp(logits - log_normalizer[..., None])
        return logp, log_normalizer - jnp.sum(probs * logits, axis=-1)

    _, (logp, entropy) = lax.scan(
        lambda carry, chunk: (carry, chunk_stats(*chunk)), None, (hidden_chunks, target_chunks)
    )
    return logp, entropy
