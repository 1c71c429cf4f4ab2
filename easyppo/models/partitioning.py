"""LLaMA's partition rules and the check that a LLaMA architecture splits over a mesh.

The rule machinery (matching, optimizer-state mirroring, sharded init) is model-agnostic and lives in
``easyppo.core.sharding``; this module holds what only the LLaMA layout knows: which parameter path
splits over which mesh axis, and which architecture fields must divide which axis.
"""

from __future__ import annotations

from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from easyppo.models.llama import LlamaConfig

# Megatron tensor parallelism over ``tensor`` combined with FSDP over ``fsdp``. Dense kernels are
# (in, out):
# * q/k/v/gate/up are column-parallel: their output features (whole heads, or a slice of the MLP
#   width) are split over ``tensor``, so attention and the SwiGLU run without communication;
# * o/down are row-parallel: their input features are split over ``tensor`` to match, and one
#   reduction over ``tensor`` per block restores the full hidden state;
# * the embedding [V, D] splits the vocabulary over ``tensor`` so that, transposed for tied
#   embeddings, it has exactly the lm_head [D, V] layout: logits (and the chunked log-probs computed
#   from them) are vocab-parallel either way. The lookup itself wants the table gathered over
#   ``fsdp`` first (``constrain(table, P("tensor", None))``), leaving one all-reduce over ``tensor``;
# * the hidden dimension D of every matrix is split over ``fsdp``: that is what shards parameters and
#   optimizer state across the data-parallel replicas (XLA gathers each one when it is used);
# * RMSNorm scales are tiny and replicated; the score head [D, 1] can only split D.
LLAMA_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"self_attn/(q|k|v)_proj/kernel$", P("fsdp", "tensor")),
    (r"self_attn/o_proj/kernel$", P("tensor", "fsdp")),
    (r"mlp/(gate|up)_proj/kernel$", P("fsdp", "tensor")),
    (r"mlp/down_proj/kernel$", P("tensor", "fsdp")),
    # LoRA adapters (easyppo.models.lora) follow their kernel: lora_a [in, r] splits ``in`` as the
    # kernel does, lora_b [r, out] splits ``out``; the rank is never split. The low-rank product
    # then needs no communication beyond what the kernel's own product has.
    (r"(self_attn/(q|k|v)_proj|mlp/(gate|up)_proj)/lora_a$", P("fsdp", None)),
    (r"(self_attn/(q|k|v)_proj|mlp/(gate|up)_proj)/lora_b$", P(None, "tensor")),
    (r"(self_attn/o_proj|mlp/down_proj)/lora_a$", P("tensor", None)),
    (r"(self_attn/o_proj|mlp/down_proj)/lora_b$", P(None, "fsdp")),
    (r"norm/scale$", P()),  # input_layernorm, post_attention_layernorm and the final norm
    (r"(^|/)lm_head/kernel$", P("fsdp", "tensor")),
    (r"(^|/)score/kernel$", P("fsdp", None)),
)


def check_model_fits_mesh(model_config: LlamaConfig, mesh: Mesh) -> None:
    """Fails, naming each config field and mesh axis at fault, if ``LLAMA_RULES`` cannot split the model.

    Called before anything compiles: XLA's own error for an indivisible sharding names neither the
    config field nor the remedy. Whole heads go to each ``tensor`` shard (so attention needs no
    communication), hence head counts, not just ``heads * head_dim``, must divide.
    """
    axis_sizes = dict(mesh.shape)
    required = (
        ("num_attention_heads", "tensor"),
        ("num_key_value_heads", "tensor"),
        ("intermediate_size", "tensor"),
        ("vocab_size", "tensor"),
        ("hidden_size", "fsdp"),
    )
    problems = [
        f"{field}={getattr(model_config, field)} is not divisible by mesh axis {axis}={axis_sizes[axis]}"
        for field, axis in required
        if getattr(model_config, field) % axis_sizes[axis]
    ]
    if problems:
        raise ValueError(
            "the model does not fit the mesh: "
            + "; ".join(problems)
            + ". Change the mesh sizes (mesh.tensor / mesh.fsdp) or the model."
        )
