"""DPO's response log-probs, and the reference's: on the fly, or one precomputed, cached pass.

``response_logprobs`` scores chosen and rejected responses together as one [2B, T] batch,
interleaved row by row so that each device keeps exactly the rows it already holds.
``precomputed_reference_tables`` runs the frozen reference once over each split before training (a
jitted, sharded forward pass) and keeps the [num_rows, 2] table on disk through
``easyppo.algorithms.reference_cache``, keyed by the dataset fingerprint and the reference's identity.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from easyppo.algorithms import reference_cache
from easyppo.algorithms.sft import sequence_logprobs
from easyppo.core import ops, sharding
from easyppo.data import pipeline
from easyppo.models import llama
from easyppo.weights.loading import load_model

logger = logging.getLogger(__name__)


def _interleave_pairs(batch, name: str) -> jax.Array:
    """[B, T] chosen and rejected arrays -> [2B, T] rows (c0, r0, c1, r1, ...).

    Interleaving rather than concatenating keeps each pair's two rows on the device that holds the
    pair, so a batch sharded over the data axes needs no communication to be reshaped.
    """
    both = jnp.stack([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=1)
    return both.reshape(-1, *both.shape[2:])


def response_logprobs(
    module, model_config: llama.LlamaConfig, params, batch, *, chunk_size: int, rng: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Summed log-probs of the response tokens and their counts, both float32 [B, 2] (chosen, rejected).

    Both sides run through the model as one [2B, T] batch (``rng``: adapter dropout's key in training).
    """
    names = ["input_ids", "attention_mask", "position_ids", "loss_mask"]
    names += [name for name in ("window_start", "window_targets", "window_mask") if f"chosen_{name}" in batch]
    pairs = {name: _interleave_pairs(batch, name) for name in names}
    logprobs, mask = sequence_logprobs(
        module,
        model_config,
        params,
        pairs["input_ids"],
        pairs["attention_mask"],
        pairs["position_ids"],
        ops.target_window(pairs),
        chunk_size=chunk_size,
        rng=rng,
    )
    sums = ops.masked_sum(logprobs, mask, axis=-1)
    counts = ops.masked_count(logprobs, mask, axis=-1)
    return sums.reshape(-1, 2), counts.reshape(-1, 2)


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
    reference_cfg: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    splits: dict[str, pipeline.PreparedData],
    *,
    cache_dir: str,
    batch_size: int,
    chunk_size: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """The [num_rows, 2] reference table of every split, from the cache or computed (and cached).

    ``reference_cfg`` is the reference's ``model`` config section. The reference model is loaded
    only if some split misses the cache, and dropped afterwards.
    """
    sharding.check_batch_fits_mesh(batch_size, mesh, name="dpo.reference_batch_size")

    @functools.cache
    def reference():
        source = reference_cfg.init_from or "random init"
        logger.info("loading the reference model for the precomputed pass: %s", source)
        model_config, module, params = load_model(reference_cfg, "causal_lm", mesh=mesh, rng=jax.random.key(seed))
        return make_reference_forward(module, model_config, mesh, chunk_size=chunk_size), params

    tables = {}
    for split, data in splits.items():

        def compute(data=data, split=split):
            logger.info("computing reference log-probs of the %s split (%d rows)", split, len(data.batcher))
            forward, params = reference()
            return compute_reference_table(forward, params, data, mesh, batch_size=batch_size)

        tables[split], _ = reference_cache.load_or_compute(
            cache_dir,
            reference_cache_components(data, reference_cfg, seed=seed),
            compute,
            shape=(len(data.batcher), 2),
        )
    return tables
