"""The options of an RL run: what every RL algorithm shares, and what PPO and the group family add.

``RLOptions`` holds the rollout, the reward sources, the KL regulariser, the policy loss and the
sampler/trainer correction; ``PPOOptions`` adds GAE and the critic (``config.ppo``);
``GroupRLOptions`` adds the group advantage estimator and dynamic sampling (``config.grpo``). Each is
one frozen dataclass that validates itself (hashable, so jitted programs close over it). Sources of
each choice are in docs/algorithms.md.
"""

from __future__ import annotations

import dataclasses

from easyppo.core.options import option, require, require_finite
from easyppo.models.generation import SamplingConfig
from easyppo.rewards.sources import parse_reward_spec

KL_ESTIMATORS = ("k1", "k3")
MISSING_EOS_MODES = ("replace", "add")
TRUNCATED_RESPONSES = ("keep", "mask")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
IMPORTANCE_CORRECTIONS = ("none", "tis", "mask")
LOGPROB_TEMPERATURES = ("one", "sampling")
ROLLOUT_DTYPES = ("", "float32", "bfloat16", "float16")
OLD_LOGPROBS = ("recompute", "sampler")
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")


@dataclasses.dataclass(frozen=True)
class RLOptions:
    """Sampling, rewards, KL, the clipped policy loss and sampler correction (docs/algorithms.md)."""

    # Rollout.
    samples_per_prompt: int = option(1, "responses sampled per prompt (rollout rows = prompts x this)")
    rollout_batch_size: int = option(
        0, "prompts sampled and scored at once (0: the whole batch); fewer cap the KV cache and scoring memory"
    )
    sampling: SamplingConfig = option(
        SamplingConfig(temperature=0.7, max_new_tokens=128), "temperature, top-p/k, max_new_tokens, stop ids"
    )
    rollout_dtype: str = option("", f"compute dtype of the sampler, one of {ROLLOUT_DTYPES}; '': the policy's")
    reference_init_from: str = option("", "frozen reference weights; '': the policy's own model.init_from")
    # Rewards.
    rewards: str = option("reward_model", "reward sources 'name[=weight],...' (easyppo.rewards; module:function)")
    reward_format_pattern: str = option("", "regular expression the 'format' reward searches a response for")
    reward_numeric_tolerance: float = option(1e-6, "relative tolerance of the 'numeric' reward")
    missing_eos_penalty: float | None = option(None, "score of a response without a stop token; None: no penalty")
    missing_eos_mode: str = option("replace", f"one of {MISSING_EOS_MODES}: score := penalty, or score += penalty")
    overlong_buffer: int = option(0, "DAPO's soft overlong penalty over the last this many tokens (0: off)")
    overlong_penalty: float = option(1.0, "the soft overlong penalty at max_new_tokens (linear from 0)")
    truncated_responses: str = option(
        "keep", f"one of {TRUNCATED_RESPONSES}: 'mask' drops unfinished rows from the loss"
    )
    # KL to the frozen reference (both coefficients 0: no reference model is loaded).
    kl_coef: float = option(0.05, "weight of the per-token KL penalty in the reward (initial value if adaptive)")
    kl_estimator: str = option("k1", f"one of {KL_ESTIMATORS}: the KL estimate in the reward")
    adaptive_kl: bool = option(False, "Ziegler et al.'s proportional controller towards kl_target")
    kl_target: float = option(6.0, "target KL per sequence (nats) of the adaptive controller")
    kl_horizon: int = option(10000, "the adaptive controller's horizon in rollout rows")
    kl_loss_coef: float = option(0.0, "weight of a k3 KL term in the policy loss (GRPO's beta)")
    # The policy update.
    gamma: float = option(1.0, "discount of the per-token returns (GAE, REINFORCE++)")
    ppo_epochs: int = option(1, "passes over each rollout (GRPO's mu)")
    num_minibatches: int = option(1, "minibatches per pass (each is one optimizer step of each model)")
    clip_ratio: float = option(0.2, "policy ratio clipped below at 1 - clip_ratio (and above, see clip_ratio_high)")
    clip_ratio_high: float | None = option(None, "upper clip 1 + this (DAPO's clip-higher); None: clip_ratio")
    loss_aggregation: str = option("token-mean", f"one of {LOSS_AGGREGATIONS}")
    loss_length_divisor: int = option(0, "seq-mean-token-sum-norm's constant per-row divisor; 0: max_new_tokens")
    entropy_coef: float = option(0.0, "weight of the entropy bonus (0: off)")
    # Sampler/trainer mismatch.
    importance_correction: str = option("none", f"one of {IMPORTANCE_CORRECTIONS}: truncated IS or masking")
    importance_cap: float = option(2.0, "C: tis caps weights at C; mask drops tokens outside [1/C, C]")
    logprob_temperature: str = option(
        "one", f"one of {LOGPROB_TEMPERATURES}: score log-probs at T=1 or at the sampler's T"
    )
    old_logprobs: str = option(
        "recompute",
        f"one of {OLD_LOGPROBS}: the old log-probs from a scoring pass, or the sampler's own (same precision only)",
    )
    mismatch_check_every: int = option(10, "old_logprobs='sampler': run the scoring pass every this many iterations")
    # Evaluation on held-out prompts (eval.path).
    eval_greedy: bool = option(True, "greedy held-out responses (deterministic); False: the training sampler")
    logprob_chunk_size: int = option(256, "sequence positions per chunk of the vocabulary projection")

    # Fields of one subclass, fixed here for the others, so the shared programs read them alike
    # (class attributes, not fields: they appear in no other config section).
    value_warmup_steps = 0  # PPOOptions: iterations that train only the critic
    dynamic_sampling = False  # GroupRLOptions: DAPO's dynamic sampling

    def __post_init__(self):
        for key in ("samples_per_prompt", "ppo_epochs", "num_minibatches", "kl_horizon", "logprob_chunk_size"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.rollout_batch_size >= 0, "rollout_batch_size", f"must be >= 0, got {self.rollout_batch_size}")
        for key, allowed in (
            ("kl_estimator", KL_ESTIMATORS),
            ("missing_eos_mode", MISSING_EOS_MODES),
            ("truncated_responses", TRUNCATED_RESPONSES),
            ("loss_aggregation", LOSS_AGGREGATIONS),
            ("importance_correction", IMPORTANCE_CORRECTIONS),
            ("logprob_temperature", LOGPROB_TEMPERATURES),
            ("rollout_dtype", ROLLOUT_DTYPES),
            ("old_logprobs", OLD_LOGPROBS),
        ):
            require(getattr(self, key) in allowed, key, f"{getattr(self, key)!r} is not one of {allowed}")
        floats = ["kl_coef", "kl_loss_coef", "clip_ratio", "entropy_coef", "kl_target", "gamma", "importance_cap"]
        floats += ["reward_numeric_tolerance", "overlong_penalty"]
        for key in floats:
            require_finite(getattr(self, key), key)
        for key in ("kl_coef", "kl_loss_coef", "clip_ratio", "entropy_coef", "reward_numeric_tolerance"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("overlong_buffer", "loss_length_divisor", "overlong_penalty"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(
            self.clip_ratio < 1, "clip_ratio", f"must be < 1 (the ratio's lower bound 1 - c), got {self.clip_ratio}"
        )
        if self.clip_ratio_high is not None:
            require_finite(self.clip_ratio_high, "clip_ratio_high")
            require(self.clip_ratio_high >= 0, "clip_ratio_high", f"must be >= 0, got {self.clip_ratio_high}")
        require(self.kl_target > 0, "kl_target", f"must be > 0, got {self.kl_target}")
        require(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1], got {self.gamma}")
        require(self.importance_cap > 1, "importance_cap", f"must be > 1, got {self.importance_cap}")
        require(
            self.overlong_buffer <= self.sampling.max_new_tokens,
            "overlong_buffer",
            f"{self.overlong_buffer} exceeds sampling.max_new_tokens={self.sampling.max_new_tokens}",
        )
        if self.missing_eos_penalty is not None:
            require_finite(self.missing_eos_penalty, "missing_eos_penalty")
        parse_reward_spec(self.rewards, key="rewards")  # a typo fails here, before anything loads
        require(
            self.mismatch_check_every >= 0, "mismatch_check_every", f"must be >= 0, got {self.mismatch_check_every}"
        )
        if self.old_logprobs == "sampler":
            # The sampler's log-probs stand in for the trainer's only where both run the same weights in
            # the same precision; otherwise the mismatch is real and must be scored (and corrected).
            require(
                self.rollout_dtype == "",
                "old_logprobs",
                f"'sampler' needs the sampler in the policy's precision (rollout_dtype='', got {self.rollout_dtype!r})",
            )
            require(
                self.importance_correction == "none",
                "old_logprobs",
                f"'sampler' leaves no mismatch to correct (importance_correction={self.importance_correction!r})",
            )

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps of each model per iteration."""
        return self.ppo_epochs * self.num_minibatches

    @property
    def clip_high(self) -> float:
        return self.clip_ratio if self.clip_ratio_high is None else self.clip_ratio_high

    @property
    def estimator(self) -> str:
        """The advantage estimator: "gae" for PPO, the configured group estimator otherwise."""
        return "gae"

    @property
    def uses_critic(self) -> bool:
        return self.estimator == "gae"

    @property
    def uses_reference(self) -> bool:
        """Whether a frozen reference is needed at all (a KL term with a non-zero weight)."""
        return self.kl_coef > 0 or self.adaptive_kl or self.kl_loss_coef > 0

    @property
    def uses_reward_model(self) -> bool:
        return "reward_model" in parse_reward_spec(self.rewards)

    @property
    def length_divisor(self) -> int:
        return self.loss_length_divisor or self.sampling.max_new_tokens


@dataclasses.dataclass(frozen=True)
class PPOOptions(RLOptions):
    """PPO: GAE advantages with a trained critic (``config.ppo``)."""

    lam: float = option(0.95, "lambda of GAE")
    whiten_advantages: bool = option(True, "whiten advantages over the rollout's response tokens")
    value_clip: float = option(0.2, "new values kept within +- this of the rollout's values")
    vf_coef: float = option(0.1, "weight of the value loss")
    value_warmup_steps: int = option(0, "first iterations train only the value model (the policy is frozen)")

    def __post_init__(self):
        super().__post_init__()
        for key in ("lam", "value_clip", "vf_coef"):
            require_finite(getattr(self, key), key)
        for key in ("value_clip", "vf_coef", "value_warmup_steps"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")


@dataclasses.dataclass(frozen=True)
class GroupRLOptions(RLOptions):
    """The critic-free group family (``config.grpo``): GRPO, Dr.GRPO, DAPO settings, RLOO, REINFORCE++."""

    samples_per_prompt: int = option(4, "responses sampled per prompt: the group the baseline is taken over")
    rewards: str = option("", "reward sources 'name[=weight],...', e.g. 'math_verify,format=0.1' (easyppo.rewards)")
    kl_coef: float = option(0.0, "weight of the per-token KL penalty in the reward (REINFORCE++ uses it)")
    advantage_estimator: str = option("grpo", f"one of {GROUP_ESTIMATORS}")
    std_epsilon: float = option(1e-6, "added to the group std before dividing (grpo)")
    dynamic_sampling: bool = option(False, "DAPO: drop groups whose rewards all agree and sample more prompts")
    max_sampling_rounds: int = option(3, "dynamic sampling's bound on rollouts per iteration (the first included)")

    def __post_init__(self):
        super().__post_init__()
        require(
            self.advantage_estimator in GROUP_ESTIMATORS,
            "advantage_estimator",
            f"{self.advantage_estimator!r} is not one of {GROUP_ESTIMATORS}",
        )
        require(
            self.samples_per_prompt >= 2,
            "samples_per_prompt",
            f"a group needs at least 2 samples per prompt, got {self.samples_per_prompt}",
        )
        require_finite(self.std_epsilon, "std_epsilon")
        require(self.std_epsilon > 0, "std_epsilon", f"must be > 0, got {self.std_epsilon}")
        require(self.max_sampling_rounds >= 1, "max_sampling_rounds", f"must be >= 1, got {self.max_sampling_rounds}")

    @property
    def estimator(self) -> str:
        return self.advantage_estimator
