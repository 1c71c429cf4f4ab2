"""The algorithms the train loop can run, by the name a config's ``algorithm`` field uses.

Each module defines one ``ALGORITHM`` (an ``easyppo.algorithms.contract.Algorithm``: name, data and
model kind, options type, trainer factory, ...). Adding an algorithm is a module plus one line here.
"""

from __future__ import annotations

from easyppo.algorithms import dpo, grpo, online_dpo, ppo, rm, sft
from easyppo.algorithms.contract import Algorithm

REGISTRY: dict[str, Algorithm] = {
    module.ALGORITHM.name: module.ALGORITHM for module in (sft, rm, dpo, ppo, grpo, online_dpo)
}


def get_algorithm(name: str) -> Algorithm:
    if name not in REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
