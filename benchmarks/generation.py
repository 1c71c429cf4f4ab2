"""Generation throughput of ``easyppo.models.generation.generate``, and its share of this machine's matmul peak.

    python benchmarks/generation.py                                  # batch 8 and 64, 128 + 128 tokens
    python benchmarks/generation.py --batch-sizes 8 --hidden-size 256 --num-layers 2 --vocab-size 8000
    python benchmarks/generation.py --preset tiny --dtype bfloat16 --top-p 0.9

For each batch size, a random model of the chosen shape generates ``--new-tokens`` tokens after
``--prompt-len`` random prompt tokens (stop tokens disabled, so every row runs to the end). Timed
separately, after one warm-up call each (compilation is reported on its own):

* prefill: a ``max_new_tokens=1`` call (the prompt forward pass plus one sampled token);
* generate: the full call; decode = generate - prefill, i.e. the ``lax.while_loop``.

Throughput is reported as new tokens per second (``batch * new_tokens / generate seconds``). Model
FLOPs count matmuls only (``2 * params`` per token for the blocks, the LM head once per step and
sequence, and attention over the real context), and are divided by the machine's own matmul peak,
measured in the same process right before and after each batch size (the machine is noisy, so only
the ratio is comparable across runs). Decoding is bound by memory traffic (weights, the KV cache)
and by per-token sampling work over the vocabulary, not by FLOPs, so its ratio is expected to be far
below prefill's.

Prints one JSON object (machine-readable) and a small table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from easyppo.models import generation, llama


def build_model_config(args: argparse.Namespace) -> llama.LlamaConfig:
    if args.preset:
        return llama.get_preset(args.preset, dtype=args.dtype)
    return llama.LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.prompt_len + args.new_tokens,
        dtype=args.dtype,
    )


def matmul_peak_flops(dtype: str, size: int = 2048, repeats: int = 5) -> float:
    """Best observed FLOP/s of a square matmul in the compute dtype (bf16 accumulates in float32, as
    the model's matmuls do)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype))
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    matmul(a, b).block_until_ready()
    best = min(_seconds(lambda: matmul(a, b)) for _ in range(repeats))
    return 2 * size**3 / best


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def forward_flops(config: llama.LlamaConfig, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """Matmul FLOPs of (prefill, decode) for the tokens that are real work (padding slots excluded)."""
    block_params = config.num_params(include_embeddings=False) - config.hidden_size  # minus the final norm
    lm_head = 2 * config.hidden_size * config.vocab_size
    # Scores and weighted values: 2 matmuls * 2 FLOPs * heads * head_dim per (query, key) pair.
    attention_per_pair = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    prefill_pairs = prompt_len * (prompt_len + 1) / 2
    prefill = batch * (prompt_len * 2 * block_params + lm_head + attention_per_pair * prefill_pairs)
    # Decode feeds new_tokens - 1 tokens; the token at step t attends to prompt_len + t positions.
    steps = np.arange(1, new_tokens)
    decode = batch * float(np.sum(2 * block_params + lm_head + attention_per_pair * (prompt_len + steps)))
    return prefill, decode


def time_generation(config, params, sampling, batch: int, prompt_len: int, repeats: int) -> dict:
    """Compile and best-of-``repeats`` wall times of a prefill-only call and of the full generation."""
    rng = np.random.default_rng(batch)
    prompt_ids = jnp.asarray(rng.integers(3, config.vocab_size, (batch, prompt_len)), jnp.int32)
    prompt_mask = jnp.ones_like(prompt_ids)
    key = jax.random.key(0)
    seconds = {}
    for name, s in (("prefill", dataclasses.replace(sampling, max_new_tokens=1)), ("generate", sampling)):
        start = time.perf_counter()
        compiled = generation.generate.lower(
            params, prompt_ids, prompt_mask, key, model_config=config, sampling=s
        ).compile()
        seconds[f"{name}_compile"] = time.perf_counter() - start
        out = jax.block_until_ready(compiled(params, prompt_ids, prompt_mask, key))  # warm-up
        seconds[name] = min(_seconds(lambda: compiled(params, prompt_ids, prompt_mask, key)) for _ in range(repeats))  # noqa: B023
    if int(out.response_mask.sum()) != batch * sampling.max_new_tokens:
        raise RuntimeError("a row stopped early; the benchmark needs every row to generate max_new_tokens")
    return seconds


def summarize(config, batch: int, prompt_len: int, new_tokens: int, seconds: dict, peak: float) -> dict:
    prefill_s, total_s = seconds["prefill"], seconds["generate"]
    decode_s = max(total_s - prefill_s, 1e-9)
    prefill_flops, decode_flops = forward_flops(config, batch, prompt_len, new_tokens)
    cache_bytes = (
        2
        * config.num_hidden_layers
        * batch
        * (prompt_len + new_tokens - 1)
        * config.num_key_value_heads
        * config.head_dim
        * jnp.dtype(config.dtype).itemsize
    )
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "compile_s": round(seconds["generate_compile"], 2),
        "generate_s": round(total_s, 4),
        "prefill_s": round(prefill_s, 4),
        "decode_s": round(decode_s, 4),
        "new_tokens_per_s": round(batch * new_tokens / total_s, 1),
        "prefill_tokens_per_s": round(batch * prompt_len / prefill_s, 1),
        "decode_tokens_per_s": round(batch * (new_tokens - 1) / decode_s, 1),
        "ms_per_decode_step": round(1e3 * decode_s / max(new_tokens - 1, 1), 3),
        "kv_cache_mb": round(cache_bytes / 2**20, 1),
        "matmul_peak_gflops_per_s": round(peak / 1e9, 1),
        "prefill_gflops_per_s": round(prefill_flops / prefill_s / 1e9, 1),
        "decode_gflops_per_s": round(decode_flops / decode_s / 1e9, 1),
        "overall_gflops_per_s": round((prefill_flops + decode_flops) / total_s / 1e9, 1),
        "prefill_peak_fraction": round(prefill_flops / prefill_s / peak, 3),
        "decode_peak_fraction": round(decode_flops / decode_s / peak, 3),
        "overall_peak_fraction": round((prefill_flops + decode_flops) / total_s / peak, 3),
    }


def run(args: argparse.Namespace) -> dict:
    config = build_model_config(args)
    sampling = generation.SamplingConfig(
        max_new_tokens=args.new_tokens,
        greedy=args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_at_eos=False,
    )
    params = llama.init_params(config, "causal_lm", jax.random.key(0))
    results = []
    for batch in args.batch_sizes:
        # The peak is measured right before and after each batch size and the better reading kept:
        # the machine's speed drifts, and a reading taken while it was busy would flatter the ratio.
        before = matmul_peak_flops(args.dtype)
        seconds = time_generation(config, params, sampling, batch, args.prompt_len, args.repeats)
        peak = max(before, matmul_peak_flops(args.dtype))
        results.append(summarize(config, batch, args.prompt_len, args.new_tokens, seconds, peak))
    return {
        "benchmark": "generation",
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "model": {
            "params": config.num_params(),
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_layers": config.num_hidden_layers,
            "num_heads": config.num_attention_heads,
            "num_kv_heads": config.num_key_value_heads,
            "dtype": config.dtype,
        },
        "sampling": {
            "greedy": sampling.greedy,
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
        },
        "results": results,
    }


def print_table(report: dict) -> None:
    model = report["model"]
    print(
        f"\nmodel: {model['params'] / 1e6:.1f}M params ({model['num_layers']} layers, d={model['hidden_size']}, "
        f"vocab {model['vocab_size']}, {model['dtype']}); %peak: share of the matmul peak measured "
        "around each batch"
    )
    columns = [
        ("batch", "batch"),
        ("new tok/s", "new_tokens_per_s"),
        ("prefill tok/s", "prefill_tokens_per_s"),
        ("decode tok/s", "decode_tokens_per_s"),
        ("ms/step", "ms_per_decode_step"),
        ("KV cache MB", "kv_cache_mb"),
        ("prefill %peak", "prefill_peak_fraction"),
        ("decode %peak", "decode_peak_fraction"),
        ("peak GFLOP/s", "matmul_peak_gflops_per_s"),
        ("compile s", "compile_s"),
    ]
    print("  ".join(f"{title:>13}" for title, _ in columns))
    for row in report["results"]:
        cells = []
        for _, key in columns:
            value = row[key]
            cells.append(f"{100 * value:12.1f}%" if key.endswith("fraction") else f"{value:>13}")
        print("  ".join(cells))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement; the best counts")
    parser.add_argument("--preset", default=None, help="a llama preset name instead of the shape flags")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=688)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    report = run(parse_args(sys.argv[1:] if argv is None else argv))
    print(json.dumps(report))
    print_table(report)


if __name__ == "__main__":
    main()
