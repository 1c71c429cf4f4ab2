"""Reward model: Bradley-Terry on preference pairs.

loss = -log sigmoid(r_chosen - r_rejected - margin) per pair, averaged over the pairs of the batch,
optionally plus ``center_coef * (r_chosen + r_rejected)^2`` to keep rewards centred on zero (useful
when the reward later feeds PPO, whose KL-shaped rewards assume an O(1), zero-mean score). Chosen
and rejected sequences go through the model as one batch of 2B rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from easyppo.algorithms import base
from easyppo.algorithms.contract import Algorithm, RunInputs
from easyppo.core.options import option, require, require_finite
from easyppo.models import lora


@dataclasses.dataclass(frozen=True)
class RMOptions:
    """The ``rm`` options."""

    use_margin: bool = option(True, "subtract each row's `margin` (0 where the data has none)")
    center_coef: float = option(0.0, "weight of the (r_chosen + r_rejected)^2 centring penalty")

    def __post_init__(self):
        require_finite(self.center_coef, "center_coef")
        require(self.center_coef >= 0, "center_coef", f"must be >= 0, got {self.center_coef}")


def bradley_terry_loss(chosen: jax.Array, rejected: jax.Array, margin: jax.Array) -> jax.Array:
    """Per-pair -log sigmoid(chosen - rejected - margin), stable for large reward gaps."""
    return -jax.nn.log_sigmoid(chosen - rejected - margin)


def pair_scores(module, params, batch, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Rewards of the chosen and rejected sequences, scored together as one [2B, T] batch (``rng``:
    adapter dropout's key in training)."""
    both = {
        name: jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=0)
        for name in ("input_ids", "attention_mask", "position_ids")
    }
    scores = module.apply(
        {"params": params},
        both["input_ids"],
        both["attention_mask"],
        both["position_ids"],
        rngs=lora.dropout_rngs(rng),
    )
    return jnp.split(scores, 2)


def make_loss_fn(module, model_config, options: RMOptions) -> base.LossFn:
    use_margin, center_coef = options.use_margin, options.center_coef

    def loss_fn(params, frozen, batch, rng):
        del frozen
        chosen, rejected = pair_scores(module, params, batch, rng)
        weight = batch["example_mask"].astype(jnp.float32)
        margin = batch["margin"] if use_margin else jnp.zeros_like(chosen)
        per_pair = bradley_terry_loss(chosen, rejected, margin) + center_coef * (chosen + rejected) ** 2
        pairs = jnp.sum(weight)
        total = lambda x: jnp.sum(x * weight)
        loss_sum = total(per_pair)
        return loss_sum, {
            "loss": (loss_sum, pairs),
            "accuracy": (total((chosen > rejected).astype(jnp.float32)), pairs),
            "reward_chosen": (total(chosen), pairs),
            "reward_rejected": (total(rejected), pairs),
            "reward_chosen_sq": (total(chosen**2), pairs),
            "reward_rejected_sq": (total(rejected**2), pairs),
            "reward_margin": (total(chosen - rejected), pairs),
        }

    return loss_fn


def finalize_metrics(means: dict[str, float]) -> dict[str, float]:
    """Turns aggregated second moments into standard deviations."""
    out = {k: v for k, v in means.items() if not k.endswith("_sq")}
    for name in ("reward_chosen", "reward_rejected"):
        if f"{name}_sq" in means:
            out[f"{name}_std"] = base.std_from_moments(means, name)
    return out


def make_trainer(
    config: ml_collections.ConfigDict,
    options: RMOptions,
    mesh: jax.sharding.Mesh,
    total_steps: int,
    *,
    inputs: RunInputs,
    resuming: bool = False,
) -> base.GradientTrainer:
    return base.make_gradient_trainer(
        config,
        mesh,
        total_steps,
        kind="reward",
        pad_token_id=inputs.tokenizer.pad_id,
        resuming=resuming,
        abstract=inputs.abstract,
        loss_fn_for=lambda module, model_config: make_loss_fn(module, model_config, options),
        metric_finalizer=finalize_metrics,
    )


ALGORITHM = Algorithm(
    name="rm",
    data_kind="preference",
    model_kind="reward",
    options_type=RMOptions,
    make_trainer=make_trainer,
)
