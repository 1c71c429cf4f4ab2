"""The options of a PPO run (``config.ppo``): one frozen dataclass, validated on construction.

Hashable, so the jitted programs can close over it. The sections that belong to other components
(``reward_model``, ``value_model``, ``value_optim``) are declared by the algorithm's registry entry.
"""

from __future__ import annotations

import dataclasses

from easyppo.core.options import option, require, require_finite
from easyppo.models.generation import SamplingConfig

KL_ESTIMATORS = ("k1", "k3")
MISSING_EOS_MODES = ("replace", "add")


@dataclasses.dataclass(frozen=True)
class RLOptions:
    """How PPO samples, rewards, estimates advantages and updates (docs/algorithms.md)."""

    # Rollout.
    samples_per_prompt: int = option(1, "responses sampled per prompt (rollout rows = prompts x this)")
    sampling: SamplingConfig = option(
        SamplingConfig(temperature=0.7, max_new_tokens=128), "temperature, top-p/k, max_new_tokens, stop ids"
    )
    reference_init_from: str = option("", "frozen reference weights; '': the policy's own model.init_from")
    # Rewards.
    kl_coef: float = option(0.05, "initial (adaptive) or fixed weight of the per-token KL penalty")
    kl_estimator: str = option("k1", f"one of {KL_ESTIMATORS} (easyppo.core.ops.kl_estimate)")
    adaptive_kl: bool = option(False, "Ziegler et al.'s proportional controller towards kl_target")
    kl_target: float = option(6.0, "target KL per sequence (nats) of the adaptive controller")
    kl_horizon: int = option(10000, "the adaptive controller's horizon in rollout rows")
    missing_eos_penalty: float | None = option(None, "score of a response without a stop token; None: no penalty")
    missing_eos_mode: str = option("replace", f"one of {MISSING_EOS_MODES}: score := penalty, or score += penalty")
    # Advantages and updates.
    gamma: float = option(1.0, "discount of GAE")
    lam: float = option(0.95, "lambda of GAE")
    whiten_advantages: bool = option(True, "whiten advantages over the rollout's response tokens")
    ppo_epochs: int = option(1, "passes over each rollout")
    num_minibatches: int = option(1, "minibatches per pass (each is one optimizer step of each model)")
    clip_ratio: float = option(0.2, "policy ratio clipped to [1 - c, 1 + c]")
    value_clip: float = option(0.2, "new values kept within +- this of the rollout's values")
    vf_coef: float = option(0.1, "weight of the value loss")
    entropy_coef: float = option(0.0, "weight of the entropy bonus (0: off)")
    value_warmup_steps: int = option(0, "first iterations train only the value model (the policy is frozen)")
    # Evaluation on held-out prompts (eval.path): the reward of the policy's responses.
    eval_greedy: bool = option(True, "greedy held-out responses (deterministic); False: the training sampler")
    logprob_chunk_size: int = option(256, "sequence positions per chunk of the vocabulary projection")

    def __post_init__(self):
        for key in ("samples_per_prompt", "ppo_epochs", "num_minibatches", "kl_horizon", "logprob_chunk_size"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(
            self.kl_estimator in KL_ESTIMATORS, "kl_estimator", f"{self.kl_estimator!r} is not one of {KL_ESTIMATORS}"
        )
        require(
            self.missing_eos_mode in MISSING_EOS_MODES,
            "missing_eos_mode",
            f"{self.missing_eos_mode!r} is not one of {MISSING_EOS_MODES}",
        )
        for key in ("kl_coef", "clip_ratio", "value_clip", "vf_coef", "entropy_coef", "kl_target", "gamma", "lam"):
            require_finite(getattr(self, key), key)
        for key in ("kl_coef", "clip_ratio", "value_clip", "vf_coef", "entropy_coef", "value_warmup_steps"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(self.kl_target > 0, "kl_target", f"must be > 0, got {self.kl_target}")
        for key in ("gamma", "lam"):
            require(0 <= getattr(self, key) <= 1, key, f"must be in [0, 1], got {getattr(self, key)}")
        if self.missing_eos_penalty is not None:
            require_finite(self.missing_eos_penalty, "missing_eos_penalty")

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps of each model per iteration."""
        return self.ppo_epochs * self.num_minibatches
