"""LoRA: low-rank adapters on the trunk's projections, and the parameter-tree operations they need.

A projection ``W`` [in, out] named in ``LoraConfig.targets`` gains two parameters beside its
``kernel``: ``lora_a`` [in, r] and ``lora_b`` [r, out], and computes

    y = x W + (alpha / r) * dropout(x) lora_a lora_b

(the ``peft`` formula, so adapters move between the two libraries by transposing each matrix).
``lora_b`` starts at zero, so the adapted model starts exactly at its base. Adapters are float32
master weights whatever ``param_dtype`` is, so a bfloat16 base halves the frozen memory while the
trained part (and its optimizer state) keeps full precision.

**Adapters apply where the tree holds them.** The module creates adapters at init, and at apply time
uses those present in the parameters it is given. The base tree alone (``split(params)[1]``) is
therefore the model with its adapters switched off: that is the frozen reference of DPO, PPO and
GRPO, computed by the same weights, with no second copy loaded.

**Trained and frozen.** ``split`` divides a tree into what a LoRA run trains (the adapters and the
scalar ``score`` head of reward and value models, which has no pretrained value worth keeping frozen)
and the frozen base; ``merge`` joins them again, which costs nothing (it shares the arrays). A run's
state, optimizer state and checkpoints hold only the trained part.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

PyTree = Any

PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_LEAVES: tuple[str, ...] = ("lora_a", "lora_b")
# Leaves a LoRA run trains in full: the scalar head of reward and value models (created fresh on a
# pretrained trunk, so freezing it would leave it random).
TRAINED_HEADS: tuple[str, ...] = ("score",)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, scale, dropout and target projections of a model's adapters (hashable: jit closes over it)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = PROJECTIONS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora rank={self.rank} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout={self.dropout} must be in [0, 1)")
        unknown = sorted(set(self.targets) - set(PROJECTIONS))
        if unknown or not self.targets:
            raise ValueError(f"lora targets {list(self.targets)} must be a non-empty subset of {list(PROJECTIONS)}")

    @property
    def scale(self) -> float:
        """peft's ``scaling``: alpha / rank."""
        return self.alpha / self.rank


# ------------------------------------------------------------------------------ tree operations


def _flat(tree: PyTree) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(tree) if tree else {}


def is_adapter(path: tuple[str, ...]) -> bool:
    """Whether a flattened parameter path is an adapter matrix."""
    return path[-1] in ADAPTER_LEAVES


def is_trained(path: tuple[str, ...]) -> bool:
    """Whether a LoRA run trains this parameter: an adapter, or a scalar head."""
    return is_adapter(path) or path[0] in TRAINED_HEADS


def split(params: PyTree) -> tuple[dict, dict]:
    """``(trained, base)``: the adapters and heads, and everything else (works on abstract trees too)."""
    flat = _flat(params)
    trained = {path: leaf for path, leaf in flat.items() if is_trained(path)}
    base = {path: leaf for path, leaf in flat.items() if not is_trained(path)}
    return traverse_util.unflatten_dict(trained), traverse_util.unflatten_dict(base)


def merge(trained: PyTree, base: PyTree | None) -> PyTree:
    """The whole tree from ``split``'s two parts; ``base=None`` (no LoRA) returns ``trained`` itself."""
    if base is None:
        return trained
    return traverse_util.unflatten_dict({**_flat(base), **_flat(trained)})


def adapters(params: PyTree) -> dict:
    """Only the adapter matrices of ``params``."""
    return traverse_util.unflatten_dict({path: leaf for path, leaf in _flat(params).items() if is_adapter(path)})


def merged_weights(params: PyTree, lora: LoraConfig) -> dict:
    """A plain tree (no adapters) computing what the adapted ``params`` compute: each adapted
    ``kernel`` becomes ``kernel + scale * lora_a @ lora_b`` (in float32, cast back to its dtype).

    Works for stacked layers too (a leading layer axis on all three matrices). The same weights come
    out however the arrays are sharded (``_fold``), so a run's export and a later conversion agree.
    """
    flat = _flat(params)
    out = {}
    for path, leaf in flat.items():
        if is_adapter(path):
            continue
        parent = path[:-1]
        if path[-1] == "kernel" and parent + ("lora_a",) in flat:
            leaf = _fold(leaf, flat[parent + ("lora_a",)], flat[parent + ("lora_b",)], lora.scale)
        out[path] = leaf
    return traverse_util.unflatten_dict(out)


@functools.partial(jax.jit, static_argnums=3)
def _fold(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``kernel + scale * a @ b`` in float32, as rank-one terms added in a fixed order: a matmul's
    summation order depends on the shapes each device holds, and so would the last bit of the sum."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    delta = a[..., :, 0, None] * b[..., None, 0, :]
    for r in range(1, a.shape[-1]):
        delta = delta + a[..., :, r, None] * b[..., None, r, :]
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def dropout_rngs(rng: jax.Array | None) -> dict[str, jax.Array] | None:
    """The ``rngs`` of a training forward pass: adapter dropout draws from ``rng`` (None: no dropout)."""
    return None if rng is None else {"dropout": rng}


def count(params: PyTree) -> int:
    """Number of scalars in a tree of arrays or shape structs."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
