"""The chunked token log-prob's forward + backward: the hand-written VJP against plain autodiff, in one process.

    python benchmarks/logprob_grad.py [--rows 8] [--seq_len 256] [--hidden 256] [--vocab 32000]
                                      [--chunk 256] [--dtype float32] [--repeats 7] [--json_out PATH]

* **autodiff**: the same chunked ``lax.scan`` with each chunk under ``jax.checkpoint``, differentiated
  by JAX (what ``easyppo.core.logprobs`` did before its custom VJP): the backward recomputes each
  chunk's forward, then transposes the gather into a scatter and the log-sum-exp into a softmax.
* **custom_vjp**: ``easyppo.core.logprobs.token_logprobs``: one recomputation of each chunk's
  logits, ``g (onehot - softmax)`` in one element-wise pass, two matmuls.

Both compute ``grad(sum(logp * g))`` with respect to the hidden states and the LM head, jitted,
timed alternately (``--repeats`` rounds, medians), after checking that they agree. The defaults are
the canonical DPO workload's head: 4 pairs (8 rows) x 256 positions, hidden 256, vocab 32000.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    import pathlib

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import common
from easyppo.core.logprobs import gather_last, token_logprobs


def autodiff_logprobs(hidden: jax.Array, weight: jax.Array, targets: jax.Array, *, chunk_size: int) -> jax.Array:
    """The baseline: chunked, rematerialised, differentiated by JAX."""
    batch, seq_len, _ = hidden.shape
    num_chunks = seq_len // chunk_size
    hidden_chunks = hidden.reshape(batch, num_chunks, chunk_size, -1).swapaxes(0, 1)
    target_chunks = targets.reshape(batch, num_chunks, chunk_size).swapaxes(0, 1)
    weight = weight.astype(hidden.dtype)

    @jax.checkpoint
    def chunk_logp(hidden_chunk, target_chunk):
        logits = jnp.einsum("bcd,dv->bcv", hidden_chunk, weight, preferred_element_type=jnp.float32)
        return gather_last(logits, target_chunk) - jax.nn.logsumexp(logits, axis=-1)

    _, logp = lax.scan(lambda carry, chunk: (carry, chunk_logp(*chunk)), None, (hidden_chunks, target_chunks))
    return logp.swapaxes(0, 1).reshape(batch, seq_len)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json_out", default=None)
    args = p.parse_args(argv)
    if args.seq_len % args.chunk:
        p.error(f"--seq_len {args.seq_len} must be a multiple of --chunk {args.chunk}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    keys = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(keys[0], (args.rows, args.seq_len, args.hidden)).astype(args.dtype)
    weight = jax.random.normal(keys[1], (args.hidden, args.vocab)) * args.hidden**-0.5
    targets = jax.random.randint(keys[2], (args.rows, args.seq_len), 0, args.vocab)
    cotangent = jax.random.normal(keys[3], (args.rows, args.seq_len))

    def gradient_of(logprobs):
        loss = lambda h, w: jnp.sum(logprobs(h, w, targets, chunk_size=args.chunk) * cotangent)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    variants = {"autodiff": gradient_of(autodiff_logprobs), "custom_vjp": gradient_of(token_logprobs)}
    results = {name: jax.block_until_ready(fn(hidden, weight)) for name, fn in variants.items()}  # compile
    for ours, theirs in zip(results["custom_vjp"], results["autodiff"]):
        tolerance = 1e-4 if args.dtype == "float32" else 5e-2
        np.testing.assert_allclose(
            np.asarray(ours, np.float32), np.asarray(theirs, np.float32), rtol=tolerance, atol=tolerance
        )
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # alternating, so both see the same machine
        for name, fn in variants.items():
            samples[name].append(common.seconds(lambda fn=fn: jax.block_until_ready(fn(hidden, weight))))
    runs = [
        {"variant": name, "median_s": statistics.median(s), "min_s": min(s), "max_s": max(s)}
        for name, s in samples.items()
    ]
    speedup = runs[0]["median_s"] / runs[1]["median_s"]
    report = {
        "benchmark": "logprob_grad",
        "shape": {k: getattr(args, k) for k in ("rows", "seq_len", "hidden", "vocab", "chunk", "dtype")},
        "machine": common.machine_info(),
        "runs": runs,
        "speedup": speedup,
    }
    columns = (
        common.Column("variant", lambda r: r["variant"]),
        common.Column(
            "ms (min-max)", lambda r: f"{1e3 * r['median_s']:.1f} ({1e3 * r['min_s']:.1f}-{1e3 * r['max_s']:.1f})"
        ),
    )
    title = f"grad of the chunked log-prob, {args.rows} x {args.seq_len} x {args.hidden} -> {args.vocab}, {args.dtype}"
    common.emit(
        report, f"{title}\n{common.format_table(runs, columns)}\nspeedup: {speedup:.2f}x", json_out=args.json_out
    )
    return report


if __name__ == "__main__":
    main()
