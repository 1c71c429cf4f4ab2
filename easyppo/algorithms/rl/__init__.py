"""Reinforcement learning from a reward, as composable programs over small typed structures.

    rollout (rollout.py)   prompts -> Rollout: sampled responses and the sampler's log-probs
    scoring (scoring.py)   Rollout -> Scored: an Experience (old and reference log-probs, values,
                           KL-shaped rewards, advantages) plus per-row scores and rollout metrics
    advantages             per-token rewards and values -> advantages and returns (GAE today)
    update (update.py)     Experience -> new RLState: epochs x minibatches of clipped policy and value steps

Each stage is a module-level function; ``easyppo.algorithms.ppo`` only loads the models, jits these
with explicit shardings and runs them in order. Options live in ``options.py``, pure per-token
formulas in ``losses.py``, model forward passes in ``forward.py``.
"""
