"""The optimizer every algorithm uses: global-norm clipping, then AdamW on a warmup+decay schedule.

Build it once per run (`make_optimizer(cfg, total_steps)`) and keep the object: a fresh optax
transform per call gives an optimizer state with a different tree structure, which breaks sharding
and checkpoint trees that were derived from the first one.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from ml_collections import config_dict

from easyppo.core.options import require, require_finite

SCHEDULES: tuple[str, ...] = ("linear", "cosine", "constant")

# Leaf names that are never weight-decayed, whatever their rank: RMSNorm gains and biases. Rank
# alone is not enough, because with `scan_layers=True` every leaf gains a leading [L] axis.
NO_DECAY_LEAF_NAMES: frozenset[str] = frozenset({"scale", "bias"})


def default_config() -> ml_collections.ConfigDict:
    """Every optimizer option with its default; algorithm configs embed this under a key."""
    cfg = ml_collections.ConfigDict()
    cfg.learning_rate = 1e-5  # peak learning rate, reached at the end of warmup
    cfg.schedule = "linear"  # decay after warmup: one of SCHEDULES
    # Warmup length: set at most one of the two (neither means no warmup). The ratio is a fraction
    # of total steps, rounded up to whole steps.
    cfg.warmup_steps = config_dict.placeholder(int)  # warmup length in steps (set this or warmup_ratio)
    cfg.warmup_ratio = config_dict.placeholder(float)  # warmup as a fraction of total steps, rounded up
    cfg.end_lr_ratio = 0.0  # final learning rate as a fraction of the peak (linear and cosine)
    cfg.b1 = 0.9  # Adam decay of the first moment
    cfg.b2 = 0.999  # Adam decay of the second moment
    cfg.eps = 1e-8  # Adam epsilon, added to the root of the second moment
    cfg.weight_decay = 0.0  # decoupled (AdamW); never applied to norm scales or 1-D parameters
    cfg.clip_grad_norm = 1.0  # max global gradient norm; 0 or None disables clipping
    return cfg


def check_config(cfg: ml_collections.ConfigDict, *, section: str = "optim") -> None:
    """Every optimizer option that needs no step count, checked before a run starts (errors name
    ``<section>.<key>``). A learning rate or epsilon beyond float32's range would become inf on device."""
    for key in ("learning_rate", "end_lr_ratio", "b1", "b2", "eps", "weight_decay"):
        require_finite(cfg[key], f"{section}.{key}")
    require(cfg.learning_rate >= 0, f"{section}.learning_rate", f"must be >= 0, got {cfg.learning_rate}")
    require(cfg.schedule in SCHEDULES, f"{section}.schedule", f"{cfg.schedule!r} is not one of {SCHEDULES}")
    require(cfg.end_lr_ratio >= 0, f"{section}.end_lr_ratio", f"must be >= 0, got {cfg.end_lr_ratio}")
    for key in ("b1", "b2"):
        require(0.0 <= cfg[key] < 1.0, f"{section}.{key}", f"must be in [0, 1), got {cfg[key]}")
    require(cfg.eps > 0, f"{section}.eps", f"must be > 0, got {cfg.eps}")
    require(cfg.weight_decay >= 0, f"{section}.weight_decay", f"must be >= 0, got {cfg.weight_decay}")
    if cfg.clip_grad_norm is not None:
        require_finite(cfg.clip_grad_norm, f"{section}.clip_grad_norm")
        require(
            cfg.clip_grad_norm >= 0, f"{section}.clip_grad_norm", f"must be >= 0 (0 disables), got {cfg.clip_grad_norm}"
        )
    require(
        cfg.warmup_steps is None or cfg.warmup_ratio is None,
        f"{section}.warmup_steps",
        f"set only one of warmup_steps={cfg.warmup_steps} and warmup_ratio={cfg.warmup_ratio}",
    )
    if cfg.warmup_ratio is not None:
        require(0.0 <= cfg.warmup_ratio <= 1.0, f"{section}.warmup_ratio", f"must be in [0, 1], got {cfg.warmup_ratio}")
    if cfg.warmup_steps is not None:
        require(cfg.warmup_steps >= 0, f"{section}.warmup_steps", f"must be >= 0, got {cfg.warmup_steps}")


def warmup_steps(cfg: ml_collections.ConfigDict, total_steps: int) -> int:
    """Warmup length in steps from whichever of `warmup_steps` / `warmup_ratio` is set."""
    check_config(cfg)
    steps, ratio = cfg.warmup_steps, cfg.warmup_ratio
    if ratio is not None:
        # Round first so that float noise (0.1 * 30 = 3.0000000000000004) does not add a step.
        return math.ceil(round(ratio * total_steps, 6))
    if steps is None:
        return 0
    if steps > total_steps:
        raise ValueError(f"optim.warmup_steps: must be in [0, total_steps={total_steps}], got {steps}")
    return steps


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer step: linear warmup from 0 to the peak, then the chosen decay.

    Step s of warmup (0 <= s < W) has lr = peak * s / W. After warmup, with progress
    p = (s - W) / (total_steps - W) clipped to [0, 1] and end = peak * end_lr_ratio:
      linear:   peak + (end - peak) * p
      cosine:   end + (peak - end) * (1 + cos(pi * p)) / 2
      constant: peak
    Steps count optimizer updates from 0 (optax passes the update count before incrementing it),
    so s = total_steps, one past the last update, is exactly `end`; later steps stay there.
    """
    if total_steps < 1:
        raise ValueError(f"make_schedule: total_steps must be >= 1, got {total_steps}")
    check_config(cfg)
    peak = cfg.learning_rate
    end = peak * cfg.end_lr_ratio
    warmup = warmup_steps(cfg, total_steps)
    decay_steps = max(total_steps - warmup, 1)

    if cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_ratio)
    else:
        decay = optax.constant_schedule(peak)

    schedule = decay
    if warmup:
        schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], boundaries=[warmup])
    # optax's constant schedule returns a Python float: every schedule here returns a float32 array,
    # so callers can log and cast it alike.
    return lambda step: jnp.asarray(schedule(step), jnp.float32)


def weight_decay_mask(params: Any) -> Any:
    """True for the leaves AdamW should decay: matrices, not norm scales, biases or 1-D leaves.

    Works on arrays and on `jax.ShapeDtypeStruct`s, so it can be used under `jax.eval_shape`.
    """

    def decays(path, leaf) -> bool:
        return len(leaf.shape) >= 2 and _leaf_name(path) not in NO_DECAY_LEAF_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def _leaf_name(path) -> str:
    last = path[-1] if path else None
    for attr in ("key", "name", "idx"):
        if hasattr(last, attr):
            return str(getattr(last, attr))
    return str(last)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Clip gradients by global norm (if enabled), then AdamW with the schedule and decay mask.

    Clipping comes first so that it acts on the raw gradient, before Adam's normalisation and the
    decoupled weight decay.
    """
    check_config(cfg)
    clip = optax.clip_by_global_norm(cfg.clip_grad_norm) if cfg.clip_grad_norm else optax.identity()
    adamw = optax.adamw(
        learning_rate=make_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=weight_decay_mask,
    )
    return optax.chain(clip, adamw)
