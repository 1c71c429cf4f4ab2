"""The DPO family's losses: pure functions of per-pair log-probs (see ``easyppo.algorithms.dpo``).

With the log-ratio margin ``h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]``:

* ``sigmoid`` (DPO):            -log sigmoid(beta h)
  with ``label_smoothing`` e (conservative DPO):  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
* ``ipo``:                      (h - 1 / (2 beta))^2
* ``hinge`` (SLiC):             max(0, 1 - beta h)
* ``simpo`` (reference-free):   -log sigmoid(beta (avg log pi(y_w) - avg log pi(y_l)) - gamma)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from easyppo.core.options import option, require, require_finite

LOSSES = ("sigmoid", "ipo", "hinge", "simpo")
_SMOOTHABLE_LOSSES = ("sigmoid", "simpo")  # label smoothing flips the sigmoid's label; others have none


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """Which DPO-family loss, with its hyperparameters; validated on construction."""

    loss: str = option("sigmoid", f"one of {LOSSES}")
    beta: float = option(0.1, "inverse temperature of the implicit reward (strength of the pull to the reference)")
    label_smoothing: float = option(0.0, "conservative DPO: assumed probability that a pair's label is flipped")
    length_normalize: bool = option(False, "mean instead of sum of response-token log-probs (SimPO: always)")
    simpo_gamma: float = option(1.0, "SimPO's target reward margin gamma")

    def __post_init__(self):
        require(self.loss in LOSSES, "loss", f"{self.loss!r} is not one of {LOSSES}")
        require_finite(self.beta, "beta")
        require(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        require(
            0.0 <= self.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}"
        )
        require(
            not self.label_smoothing or self.loss in _SMOOTHABLE_LOSSES,
            "label_smoothing",
            f"only the {_SMOOTHABLE_LOSSES} losses have a label to smooth; set it to 0 for loss={self.loss!r}",
        )
        require_finite(self.simpo_gamma, "simpo_gamma")

    @property
    def uses_reference(self) -> bool:
        return self.loss != "simpo"

    @property
    def averages_logprobs(self) -> bool:
        """Mean (not summed) response log-probs: length-normalised DPO, and SimPO by definition."""
        return self.length_normalize or self.loss == "simpo"


def smoothed_sigmoid_loss(z: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """-(1 - e) log sigmoid(z) - e log sigmoid(-z): logistic loss whose label is wrong with probability e."""
    loss = -jax.nn.log_sigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * jax.nn.log_sigmoid(-z)
    return loss


def sigmoid_loss(h: jax.Array, *, beta: float, label_smoothing: float = 0.0) -> jax.Array:
    """DPO (Rafailov et al. 2023); conservative DPO with ``label_smoothing`` > 0 (Mitchell 2023)."""
    return smoothed_sigmoid_loss(beta * h, label_smoothing)


def ipo_loss(h: jax.Array, *, beta: float) -> jax.Array:
    """IPO (Azar et al. 2023): regresses the log-ratio margin onto 1 / (2 beta) instead of pushing it up forever."""
    return jnp.square(h - 1.0 / (2.0 * beta))


def hinge_loss(h: jax.Array, *, beta: float) -> jax.Array:
    """SLiC-style hinge (Zhao et al. 2023): zero loss once beta h exceeds 1."""
    return jax.nn.relu(1.0 - beta * h)


def simpo_loss(
    policy_chosen: jax.Array, policy_rejected: jax.Array, *, beta: float, gamma: float, label_smoothing: float = 0.0
) -> jax.Array:
    """SimPO (Meng et al. 2024) on mean token log-probs: no reference model, target margin ``gamma``."""
    return smoothed_sigmoid_loss(beta * (policy_chosen - policy_rejected) - gamma, label_smoothing)


def preference_losses(
    settings: LossSettings, policy: jax.Array, reference: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Per-pair losses [B] and implicit rewards [B, 2] (chosen, rejected) from log-probs [B, 2].

    ``policy`` and ``reference`` hold the (summed or mean) response log-probs of each pair's chosen
    (column 0) and rejected (column 1) response; ``reference`` is None for SimPO.
    """
    if not settings.uses_reference:
        losses = simpo_loss(
            policy[:, 0],
            policy[:, 1],
            beta=settings.beta,
            gamma=settings.simpo_gamma,
            label_smoothing=settings.label_smoothing,
        )
        return losses, settings.beta * policy
    if reference is None:
        raise ValueError(f"loss={settings.loss!r} needs reference log-probs")
    log_ratios = policy - reference
    h = log_ratios[:, 0] - log_ratios[:, 1]
    if settings.loss == "sigmoid":
        losses = sigmoid_loss(h, beta=settings.beta, label_smoothing=settings.label_smoothing)
    elif settings.loss == "ipo":
        losses = ipo_loss(h, beta=settings.beta)
    else:
        losses = hinge_loss(h, beta=settings.beta)
    return losses, settings.beta * log_ratios
