"""Direct preference optimisation (DPO) and its relatives, on log-probs of the response tokens.

Every loss here is a pure function of per-pair log-probs: the policy's log pi(y_w | x), log pi(y_l | x)
of the chosen (w) and rejected (l) responses and, except for SimPO, the frozen reference model's
log pi_ref(y | x). With the log-ratio margin

    h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]

the per-pair losses are (docs/algorithms.md explains each and when to use it):

* ``sigmoid`` (DPO):            -log sigmoid(beta h)
  with ``label_smoothing`` e (conservative DPO):  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
* ``ipo``:                      (h - 1 / (2 beta))^2
* ``hinge`` (SLiC):             max(0, 1 - beta h)
* ``simpo`` (reference-free):   -log sigmoid(beta (avg log pi(y_w) - avg log pi(y_l)) - gamma)

A log-prob is the sum over the response tokens, or with ``length_normalize`` their mean (SimPO always
uses the mean); the same choice applies to policy and reference. The implicit reward of a response
is beta (log pi - log pi_ref) (SimPO: beta avg log pi); accuracy is the fraction of pairs whose chosen
response has the higher implicit reward, ties counting half (so a policy equal to its reference
scores exactly chance, 0.5).

Chosen and rejected sequences go through the model together as one [2B, T] batch, interleaved row
by row so that each device keeps exactly the rows it already holds. Token log-probs come from the
chunked log-softmax of ``easyppo.core.ops.token_logprobs`` (never the float32 [2B, T, V] logits at once).

The reference log-probs come from one of two places (``dpo.reference``):

* ``on_the_fly``: frozen reference parameters, sharded like the policy and without optimizer state,
  run forward in every step;
* ``precomputed``: one jitted, sharded forward pass over the train and eval splits before training,
  cached on disk by ``easyppo.algorithms.reference_cache`` (keyed by the dataset fingerprint and the reference
  checkpoint), so resumed and later runs skip it. Steps then gather rows of a small [num_rows, 2]
  table by the batch's ``example_index`` and the reference model is never held in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_dict

from easyppo.algorithms import base, reference_cache
from easyppo.algorithms.sft import sequence_logprobs
from easyppo.core import ops, sharding
from easyppo.data import pipeline
from easyppo.models import llama
from easyppo.weights import loading
from easyppo.weights.loading import load_model

logger = logging.getLogger(__name__)

NAME = "dpo"
DATA_KIND = "preference"
MODEL_KIND = "causal_lm"

LOSSES = ("sigmoid", "ipo", "hinge", "simpo")
REFERENCE_MODES = ("on_the_fly", "precomputed")
_SMOOTHABLE_LOSSES = ("sigmoid", "simpo")  # label smoothing flips the sigmoid's label; others have none


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.loss = "sigmoid"  # One of LOSSES.
    c.beta = 0.1  # Inverse temperature of the implicit reward (strength of the pull to the reference).
    c.label_smoothing = 0.0  # Conservative DPO: assumed probability that a pair's label is flipped.
    c.length_normalize = False  # Mean instead of sum of response-token log-probs (SimPO: always).
    c.simpo_gamma = 1.0  # SimPO's target reward margin gamma.
    c.reference = "on_the_fly"  # One of REFERENCE_MODES (ignored by the reference-free simpo).
    c.reference_init_from = ""  # Reference weights; "": the policy's own model.init_from.
    c.reference_cache_dir = ""  # Precomputed log-probs; "": <data.cache_dir>/reference_logprobs.
    c.reference_batch_size = config_dict.placeholder(int)  # Precompute pass; None: eval/train batch.
    c.logprob_chunk_size = 256  # Sequence positions per chunk of the vocab projection.
    return c


# ------------------------------------------------------------------------------------------ losses


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """Which DPO-family loss, with its hyperparameters; validated on construction."""

    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    length_normalize: bool = False
    simpo_gamma: float = 1.0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"config.dpo.loss: {self.loss!r} is not one of {LOSSES}")
        if not self.beta > 0:
            raise ValueError(f"config.dpo.beta: must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"config.dpo.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss not in _SMOOTHABLE_LOSSES:
            raise ValueError(
                f"config.dpo.label_smoothing: only the {_SMOOTHABLE_LOSSES} losses have a label to smooth; "
                f"set it to 0 for loss={self.loss!r}"
            )

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> LossSettings:
        return cls(
            loss=cfg.loss,
            beta=float(cfg.beta),
            label_smoothing=float(cfg.label_smoothing),
            length_normalize=bool(cfg.length_normalize),
            simpo_gamma=float(cfg.simpo_gamma),
        )

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


# ------------------------------------------------------------------------------- response log-probs


def _interleave_pairs(batch, name: str) -> jax.Array:
    """[B, T] chosen and rejected arrays -> [2B, T] rows (c0, r0, c1, r1, ...).

    Interleaving rather than concatenating keeps each pair's two rows on the device that holds the
    pair, so a batch sharded over the data axes needs no communication to be reshaped.
    """
    both = jnp.stack([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=1)
    return both.reshape(-1, *both.shape[2:])


def response_logprobs(
    module, model_config: llama.LlamaConfig, params, batch, *, chunk_size: int
) -> tuple[jax.Array, jax.Array]:
    """Summed log-probs of the response tokens and their counts, both float32 [B, 2] (chosen, rejected).

    Both sides run through the model as one [2B, T] batch.
    """
    input_ids, attention_mask, position_ids, loss_mask = (
        _interleave_pairs(batch, name) for name in ("input_ids", "attention_mask", "position_ids", "loss_mask")
    )
    logprobs, mask = sequence_logprobs(
        module, model_config, params, input_ids, attention_mask, position_ids, loss_mask, chunk_size=chunk_size
    )
    sums = ops.masked_sum(logprobs, mask, axis=-1)
    counts = ops.masked_count(logprobs, mask, axis=-1)
    return sums.reshape(-1, 2), counts.reshape(-1, 2)


# ------------------------------------------------------------------------------------- loss_fn


def reference_sums(frozen, batch, reference_model, *, chunk_size: int) -> jax.Array:
    """Summed reference log-probs [B, 2]: a forward pass of frozen params, or a precomputed table lookup."""
    if not frozen:
        raise ValueError("this DPO loss needs the reference: frozen must hold reference_params or reference_logps")
    if "reference_params" in frozen:
        module, model_config = reference_model
        sums, _ = response_logprobs(module, model_config, frozen["reference_params"], batch, chunk_size=chunk_size)
    else:
        sums = jnp.take(frozen["reference_logps"], batch["example_index"], axis=0, mode="clip")
    return jax.lax.stop_gradient(sums)


def make_loss_fn(
    module,
    model_config: llama.LlamaConfig,
    config: ml_collections.ConfigDict,
    *,
    reference_model: tuple[Any, llama.LlamaConfig] | None = None,
) -> base.LossFn:
    """The DPO loss_fn(params, frozen, batch, rng) -> (summed pair loss, {metric: (sum, count)}).

    ``frozen`` is None (SimPO), ``{"reference_params": ...}`` (on the fly, run with
    ``reference_model = (module, config)``) or ``{"reference_logps": [num_rows, 2]}`` (precomputed).
    """
    settings = LossSettings.from_config(config.dpo)
    chunk_size = config.dpo.logprob_chunk_size

    def loss_fn(params, frozen, batch, rng):
        del rng
        policy_sums, counts = response_logprobs(module, model_config, params, batch, chunk_size=chunk_size)
        as_used = (lambda sums: ops.safe_divide(sums, counts)) if settings.averages_logprobs else (lambda sums: sums)
        policy = as_used(policy_sums)
        reference = None
        if settings.uses_reference:
            reference = as_used(reference_sums(frozen, batch, reference_model, chunk_size=chunk_size))
        losses, rewards = preference_losses(settings, policy, reference)

        weight = batch["example_mask"].astype(jnp.float32)
        pairs = jnp.sum(weight)
        total = lambda x: (jnp.sum(x * weight), pairs)
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        wins = jnp.where(chosen > rejected, 1.0, jnp.where(chosen == rejected, 0.5, 0.0))
        loss_sum = jnp.sum(losses * weight)
        metrics = {
            "loss": (loss_sum, pairs),
            "accuracy": total(wins),
            "reward_chosen": total(chosen),
            "reward_rejected": total(rejected),
            "reward_margin": total(chosen - rejected),
            "logps_chosen": total(policy[:, 0]),
            "logps_rejected": total(policy[:, 1]),
            "tokens_chosen": total(counts[:, 0]),
            "tokens_rejected": total(counts[:, 1]),
        }
        if reference is not None:
            metrics["ref_logps_chosen"] = total(reference[:, 0])
            metrics["ref_logps_rejected"] = total(reference[:, 1])
        return loss_sum, metrics

    return loss_fn


# --------------------------------------------------------------------- the precomputed reference


def reference_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``model`` config of the reference: the policy's, with ``dpo.reference_init_from`` if set."""
    return loading.frozen_config(config.model, config.dpo.reference_init_from)


def make_reference_forward(module, model_config: llama.LlamaConfig, mesh: jax.sharding.Mesh, *, chunk_size: int):
    """The jitted pass ``(params, batch) -> (sums [B, 2], example_index, example_mask)``, replicated.

    Made once per model and mesh so that every split and batch of the pass reuses one compilation.
    """

    def forward(params, batch):
        sums, _ = response_logprobs(module, model_config, params, batch, chunk_size=chunk_size)
        return sums, batch["example_index"], batch["example_mask"]

    return jax.jit(forward, out_shardings=NamedSharding(mesh, P()))


def compute_reference_table(
    forward, params, data: pipeline.PreparedData, mesh: jax.sharding.Mesh, *, batch_size: int
) -> np.ndarray:
    """Summed reference log-probs [len(data.batcher), 2] of every usable row, in one sharded pass.

    ``forward`` comes from :func:`make_reference_forward`. Row ``i`` belongs to batcher position ``i``,
    the ``example_index`` that training batches carry. Every host feeds its share of each batch and
    receives the whole (replicated) result, so every host ends with the full table.
    """
    num_rows = len(data.batcher)
    order = ml_collections.ConfigDict(
        dict(global_batch_size=batch_size, seed=0, shuffle=False, drop_remainder=False, num_epochs=1)
    )
    table = np.full((num_rows, 2), np.nan, np.float32)
    with jax.set_mesh(mesh):
        for host_batch in pipeline.make_iterator(data, order):
            sums, index, mask = jax.device_get(forward(params, sharding.host_local_to_global(host_batch, mesh)))
            real = mask.astype(bool)
            table[index[real]] = sums[real]
    missing = int(np.sum(np.isnan(table).any(axis=1)))
    if missing:
        raise RuntimeError(f"the reference pass left {missing} of {num_rows} rows without log-probs")
    return table


def reference_cache_components(
    data: pipeline.PreparedData, reference_cfg: ml_collections.ConfigDict, *, seed: int
) -> dict[str, Any]:
    """Everything the precomputed table depends on (the cache key; see easyppo.algorithms.reference_cache).

    The table holds *summed* log-probs, so length normalisation, the loss and beta do not enter: one
    entry serves every DPO variant on the same data and reference.
    """
    return {
        "what": "dpo_reference_response_logprob_sums",
        "dataset_fingerprint": data.fingerprint,
        "num_rows": len(data.batcher),
        "tokenization": dataclasses.asdict(data.settings),
        "reference": reference_cache.model_identity(reference_cfg, seed=seed),
    }


def precomputed_reference_tables(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, splits: dict[str, pipeline.PreparedData]
) -> dict[str, np.ndarray]:
    """The [num_rows, 2] reference table of every split, from the cache or computed (and cached).

    The reference model is loaded only if some split misses the cache, and dropped afterwards.
    """
    reference_cfg = reference_model_config(config)
    cache_dir = config.dpo.reference_cache_dir or os.path.join(config.data.cache_dir, "reference_logprobs")
    batch_size = config.dpo.reference_batch_size or config.eval.batch_size or config.data.global_batch_size
    sharding.check_batch_fits_mesh(batch_size, mesh, name="dpo.reference_batch_size")
    chunk_size = config.dpo.logprob_chunk_size

    @functools.cache
    def reference():
        source = reference_cfg.init_from or "random init"
        logger.info("loading the reference model for the precomputed pass: %s", source)
        model_config, module, params = load_model(reference_cfg, MODEL_KIND, mesh=mesh, rng=jax.random.key(config.seed))
        return make_reference_forward(module, model_config, mesh, chunk_size=chunk_size), params

    tables = {}
    for split, data in splits.items():

        def compute(data=data, split=split):
            logger.info("computing reference log-probs of the %s split (%d rows)", split, len(data.batcher))
            forward, params = reference()
            return compute_reference_table(forward, params, data, mesh, batch_size=batch_size)

        tables[split], _ = reference_cache.load_or_compute(
            cache_dir,
            reference_cache_components(data, reference_cfg, seed=config.seed),
            compute,
            shape=(len(data.batcher), 2),
        )
    return tables


# --------------------------------------------------------------------------------------- trainer


def validate_config(config: ml_collections.ConfigDict) -> LossSettings:
    """Checks every ``dpo`` option that needs no weights and no data; errors name the config key."""
    settings = LossSettings.from_config(config.dpo)
    if config.dpo.reference not in REFERENCE_MODES:
        raise ValueError(f"config.dpo.reference: {config.dpo.reference!r} is not one of {REFERENCE_MODES}")
    if config.dpo.logprob_chunk_size < 1:
        raise ValueError(f"config.dpo.logprob_chunk_size: must be >= 1, got {config.dpo.logprob_chunk_size}")
    if config.dpo.reference_batch_size is not None and config.dpo.reference_batch_size < 1:
        raise ValueError(f"config.dpo.reference_batch_size: must be >= 1, got {config.dpo.reference_batch_size}")
    return settings


def make_trainer(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    total_steps: int,
    *,
    train_data,
    eval_data,
    resuming: bool = False,
) -> base.GradientTrainer:
    """The gradient trainer with the reference wired in as ``dpo.reference`` asks (see module doc)."""
    settings = validate_config(config)
    frozen = eval_frozen = None
    reference_model = None
    if settings.uses_reference and config.dpo.reference == "on_the_fly":
        model_config, module, params = load_model(
            reference_model_config(config), MODEL_KIND, mesh=mesh, rng=jax.random.key(config.seed)
        )
        frozen, reference_model = {"reference_params": params}, (module, model_config)
    elif settings.uses_reference:
        splits = {"train": train_data} | ({"eval": eval_data} if eval_data is not None else {})
        tables = precomputed_reference_tables(config, mesh, splits)
        replicated = NamedSharding(mesh, P())
        frozen = {"reference_logps": jax.device_put(tables["train"], replicated)}
        if "eval" in tables:
            eval_frozen = {"reference_logps": jax.device_put(tables["eval"], replicated)}
    return base.make_gradient_trainer(
        config,
        mesh,
        total_steps,
        name=NAME,
        data_kind=DATA_KIND,
        kind=MODEL_KIND,
        make_loss_fn=functools.partial(make_loss_fn, reference_model=reference_model),
        frozen=frozen,
        eval_frozen=eval_frozen,
        resuming=resuming,
    )
