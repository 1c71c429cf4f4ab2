"""DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476): keep only groups that carry a signal.

A group whose samples all get the same reward has zero advantage under every group estimator: it
adds nothing but noise and dilutes the loss normalisation. Dynamic sampling drops such groups and
samples further prompts until the batch holds ``B`` informative groups, at most
``max_sampling_rounds`` rollouts per iteration. If the bound is reached, the batch is completed
with dropped groups whose rows are masked out (they count nowhere), and ``dynamic_sampling_short``
says how many.

Determinism: the extra prompts of round ``r`` of iteration ``t`` are a pure function of
``(seed, t, r)`` (:func:`refill_positions`), and each round samples with ``fold_in(rng, r)``, so a
resumed run draws exactly what the uninterrupted run drew and the data iterator's position is
untouched.
"""

from __future__ import annotations

import numpy as np

from easyppo.data.iterator import epoch_order

# Keeps refill draws apart from the data iterator's own epoch orders.
_REFILL_STREAM = 0x5DA9


def informative_groups(rewards: np.ndarray, real_rows: np.ndarray, group_size: int) -> np.ndarray:
    """bool [groups]: real groups whose rewards are not all equal."""
    groups = rewards.reshape(-1, group_size)
    real = real_rows.reshape(-1, group_size)[:, 0]
    return real & (groups.max(axis=-1) != groups.min(axis=-1))


def refill_positions(num_rows: int, batch_size: int, *, seed: int, step: int, round_index: int) -> np.ndarray:
    """The dataset positions of the prompts round ``round_index`` (>= 1) of iteration ``step`` samples."""
    order = epoch_order(num_rows, seed=seed ^ _REFILL_STREAM, epoch=step * 1024 + round_index)
    return np.resize(order, batch_size)  # a dataset smaller than a batch repeats


def select_groups(kept: list[tuple[int, int]], dropped: list[tuple[int, int]], num_groups: int):
    """The (round, group) pairs of the final batch: kept groups in the order sampled, completed with
    dropped ones if there are too few; and how many of them are dropped (masked) groups."""
    chosen = kept[:num_groups]
    short = num_groups - len(chosen)
    return chosen + dropped[:short], short
