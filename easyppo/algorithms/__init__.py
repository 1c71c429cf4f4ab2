"""The algorithms the train loop can run, by the name a config's ``algorithm`` field uses.

Each is a module with ``NAME``, ``DATA_KIND`` (the batches it consumes), ``MODEL_KIND`` (what it
trains), ``default_config()`` (its own options, under ``config.<name>``) and
``make_trainer(config, mesh, total_steps, *, train_data, eval_data, resuming=False) -> easyppo.algorithms.base.Trainer``
(``train_data`` / ``eval_data``: ``easyppo.data.pipeline.PreparedData``, the latter possibly None, for
algorithms that precompute something over the dataset, such as DPO's reference log-probs; ``resuming``: a checkpoint will replace the trained models' weights, so they
need not be read).

Optional hooks: ``validate_config(config)`` (the algorithm's own checks, run by ``config.validate``
before anything loads), ``rows_per_update(config)`` (rows one optimizer step sees, when that is not
the data batch: PPO updates on minibatches of its rollout), and ``PROGRESS_BAR_METRICS``.
"""

from __future__ import annotations

import types

from easyppo.algorithms import dpo, ppo, rm, sft

ALGORITHMS: dict[str, types.ModuleType] = {module.NAME: module for module in (sft, rm, dpo, ppo)}


def get_algorithm(name: str) -> types.ModuleType:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]
