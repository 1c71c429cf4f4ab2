"""Model FLOPs and streamed bytes of the passes a run makes, counted from the architecture.

The planner's time estimate needs the work of a whole program, and XLA's ``cost_analysis`` cannot
give it: it counts a loop body once, so a model with ``scan_layers`` is counted as one layer and the
sampler's decode loop as one token (measured: a 7B train step came out at 1/22 of this count). These
formulas are the ones the benchmarks use for MFU (``benchmarks/canonical_flops.py`` is built on them),
and tests/test_plan.py checks them against XLA's own count on programs without loops.

Conventions: a weight does 2 FLOPs per token in a forward pass and 4 more in the backward pass;
attention's scores and weighted values are 4 x layers x heads x head_dim x queries x keys forward;
the LM head counts only at the positions whose log-probs are used. Norms, softmax, the embedding
gather and optimizer arithmetic are left out (a few per cent at these sizes). Remat ``full``
recomputes each layer's forward pass in the backward pass (2 more FLOPs per weight per token);
the other policies keep the matmul outputs, so their recomputation is counted as free.

Streamed bytes are the HBM traffic the roofline's memory side needs: a pass reads every weight of
the model once (in the compute dtype), and a decoded token reads the weights and the KV cache.
"""

from __future__ import annotations

from typing import Literal

from easyppo.models import llama

Head = Literal["lm", "score"]


def matmul_params(config: llama.LlamaConfig, head: Head) -> dict[str, int]:
    """Weights that multiply every token: ``{"blocks": ..., "head": ...}`` (no embedding table, norms)."""
    if head not in ("lm", "score"):
        raise ValueError(f"matmul_params: head={head!r} must be 'lm' or 'score'")
    d, hd, f = config.hidden_size, config.head_dim, config.intermediate_size
    attention = d * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    blocks = config.num_hidden_layers * (attention + 3 * d * f)
    return {"blocks": blocks, "head": d * config.vocab_size if head == "lm" else d}


def attention(config: llama.LlamaConfig, rows: int, query_len: float, key_len: float) -> float:
    """Forward FLOPs of attention scores and weighted values: 4 rows L H hd q k."""
    return 4.0 * rows * config.num_hidden_layers * config.num_attention_heads * config.head_dim * query_len * key_len


def forward(config: llama.LlamaConfig, *, rows: int, seq_len: int, head_positions: int, head: Head) -> float:
    """A forward pass: the trunk over every token, attention over the full square, the head where used."""
    weights = matmul_params(config, head)
    return (
        2.0 * rows * seq_len * weights["blocks"]
        + 2.0 * rows * head_positions * weights["head"]
        + attention(config, rows, seq_len, seq_len)
    )


def forward_backward(
    config: llama.LlamaConfig, *, rows: int, seq_len: int, head_positions: int, head: Head, remat: str = "none"
) -> float:
    """A training pass: three times the forward, plus the trunk's forward again under remat ``full``."""
    flops = 3.0 * forward(config, rows=rows, seq_len=seq_len, head_positions=head_positions, head=head)
    if remat == "full":
        weights = matmul_params(config, head)
        flops += 2.0 * rows * seq_len * weights["blocks"] + attention(config, rows, seq_len, seq_len)
    return flops


def generation(config: llama.LlamaConfig, *, rows: int, prompt_len: int, new_tokens: int) -> float:
    """Prefill over the prompt, then one token at a time, each attending to the context so far."""
    weights = matmul_params(config, "lm")
    flops = 2.0 * rows * (prompt_len + new_tokens) * weights["blocks"] + 2.0 * rows * new_tokens * weights["head"]
    flops += attention(config, rows, prompt_len, prompt_len)
    # Token i attends to prompt_len + i + 1 keys: the sum over i of (prompt_len + i + 1).
    keys = new_tokens * (prompt_len + 1) + new_tokens * (new_tokens - 1) / 2
    return flops + attention(config, rows, 1, keys)


def weight_bytes(config: llama.LlamaConfig, head: Head) -> float:
    """Bytes of the matmul weights in the compute dtype: what one pass reads from memory."""
    weights = matmul_params(config, head)
    return float(weights["blocks"] + weights["head"]) * config.compute_dtype.itemsize


def kv_cache_bytes_per_token(config: llama.LlamaConfig) -> float:
    """Keys and values of one token over every layer, in the compute dtype."""
    per_layer = 2 * config.num_key_value_heads * config.head_dim
    return float(config.num_hidden_layers * per_layer) * config.compute_dtype.itemsize


def decode_bytes(config: llama.LlamaConfig, *, rows: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
    """Weights and KV cache read by ``new_tokens`` decode steps: ``{"weights": ..., "kv_cache": ...}``.

    Each step reads every weight once and the whole cache buffer, which the sampler allocates at
    full length (prompt + new tokens) for every row.
    """
    return {
        "weights": new_tokens * weight_bytes(config, "lm"),
        "kv_cache": new_tokens * rows * (prompt_len + new_tokens) * kv_cache_bytes_per_token(config),
    }
