"""Reinforcement learning from rewards, as composable programs over small typed structures.

    rollout (rollout.py)        prompts -> Rollout: sampled responses and the sampler's log-probs
    scoring.judge               Rollout -> Judgement: old, reference and critic views, reward-model score
    host_rewards                Rollout -> per-row rewards of the host sources (easyppo.rewards)
    dynamic_sampling            which groups carry a signal; the refill prompts of each round
    scoring.assemble            scores -> KL-shaped rewards -> advantages -> Experience (+ metrics)
    advantages                  GAE with a critic, or a group estimator (grpo, dr_grpo, rloo, reinforce_pp)
    update (update.py)          Experience -> new RLState: epochs x minibatches of clipped steps

Each stage is a module-level function. ``trainer.RLTrainer`` jits them with explicit shardings and
runs them in order for PPO and the group family; ``setup`` loads only the models the options call
for. Options live in ``options.py``, pure per-token formulas in ``losses.py``, model forward passes
in ``forward.py``.
"""
