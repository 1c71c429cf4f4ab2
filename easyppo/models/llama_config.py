"""The LLaMA architecture as data: ``LlamaConfig``, its RoPE scaling, remat policies and presets.

Hashable and free of arrays, so jitted programs close over it and Hugging Face ``config.json`` files
convert to and from it (``from_hf_dict`` / ``to_hf_dict``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

from easyppo.models.lora import LoraConfig

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-frequency rescaling for long contexts (``rope_scaling`` in a HF config)."""

    rope_type: Literal["llama3", "linear"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any] | None) -> RopeScaling | None:
        if not d:
            return None
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type == "default":
            return None
        if rope_type == "linear":
            return cls(rope_type="linear", factor=float(d["factor"]))
        if rope_type == "llama3":
            return cls(
                rope_type="llama3",
                factor=float(d["factor"]),
                low_freq_factor=float(d["low_freq_factor"]),
                high_freq_factor=float(d["high_freq_factor"]),
                original_max_position_embeddings=int(d["original_max_position_embeddings"]),
            )
        raise ValueError(f"rope_scaling.rope_type={rope_type!r} is not supported (use 'llama3' or 'linear')")

    def to_hf_dict(self) -> dict[str, Any]:
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.factor}
        return {
            "rope_type": "llama3",
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        }


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture plus compute settings. Field names follow Hugging Face's ``LlamaConfig``."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: multi-head attention (= num_attention_heads)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    # Compute settings: not part of the architecture, never written to a HF config.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False
    fuse_projections: bool = False
    # Low-rank adapters on the trunk's projections (easyppo.models.lora); None: none.
    lora: LoraConfig | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_hf_dict(self.rope_scaling))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
        for name in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, name))  # fails early on a typo such as "bfloat"

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def num_params(self, *, include_embeddings: bool = True) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        block = attn + 3 * d * f + 2 * d
        total = self.num_hidden_layers * block + d
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return total

    _HF_FIELDS = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "tie_word_embeddings",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **compute: Any) -> LlamaConfig:
        """Builds a config from a HF ``config.json`` dict; ``compute`` sets dtype/remat/scan."""
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type={d.get('model_type')!r} is not a LLaMA model")
        for unsupported in ("attention_bias", "mlp_bias"):
            if d.get(unsupported):
                raise ValueError(f"{unsupported}=true is not supported by easyppo's LLaMA")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
        kwargs = {k: d[k] for k in cls._HF_FIELDS if d.get(k) is not None}
        if "rope_theta" not in kwargs and isinstance(d.get("rope_parameters"), dict):
            kwargs["rope_theta"] = d["rope_parameters"].get("rope_theta", 10000.0)
        scaling = d.get("rope_scaling") or d.get("rope_parameters")
        kwargs["rope_scaling"] = RopeScaling.from_hf_dict(scaling)
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(kwargs.get(key), list):  # Llama 3.1 lists several EOS ids; the first is EOS
                kwargs[key] = kwargs[key][0]
        return cls(**kwargs, **compute)

    def to_hf_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self._HF_FIELDS}
        d.update(
            model_type="llama",
            architectures=["LlamaForCausalLM"],
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            rope_scaling=self.rope_scaling.to_hf_dict() if self.rope_scaling else None,
            torch_dtype=self.param_dtype,
        )
        return d


PRESETS: dict[str, LlamaConfig] = {
    # A model that compiles in about a second on a CPU: for tests and the demo.
    "tiny": LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
    "llama2_7b": LlamaConfig(),
    "llama2_13b": LlamaConfig(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
    ),
    "llama2_70b": LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
    "llama3_8b": LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama3_70b": LlamaConfig(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
}
PRESETS["llama3.1_8b"] = PRESETS["llama3_8b"].replace(
    max_position_embeddings=131072, eos_token_id=128009, rope_scaling=RopeScaling()
)
PRESETS["llama3.1_70b"] = PRESETS["llama3_70b"].replace(
    max_position_embeddings=131072, eos_token_id=128009, rope_scaling=RopeScaling()
)
PRESETS["tulu2_7b"] = PRESETS["llama2_7b"].replace(max_position_embeddings=8192)
PRESETS["tulu2_13b"] = PRESETS["llama2_13b"].replace(max_position_embeddings=8192)
PRESETS["tulu2_70b"] = PRESETS["llama2_70b"].replace(max_position_embeddings=8192)


def get_preset(name: str, **overrides: Any) -> LlamaConfig:
    """Returns a named architecture, optionally with fields replaced (``get_preset("tiny", dtype=...)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    if {"hidden_size", "num_attention_heads"} & overrides.keys() and "head_dim" not in overrides:
        overrides["head_dim"] = None  # derive it again from the new width / head count
    return PRESETS[name].replace(**overrides)
