"""Proximal policy optimisation from a reward model: the classic RLHF recipe, done correctly.

One train step of the loop is one PPO *iteration* over a batch of prompts:

1. **rollout** - ``easyppo.models.generation.generate`` samples ``samples_per_prompt`` responses per prompt
   with the current policy (one jitted prefill + ``lax.while_loop`` decode);
2. **scoring**, once, with the rollout's own parameters (one jitted program): the policy's log-probs
   of the sampled tokens (the *old* log-probs), the frozen reference's, the value model's per-token
   values and the reward model's score of each full sequence; a response that never emitted a stop
   token has its score replaced by (or shifted by) ``missing_eos_penalty``;
3. **rewards**: per token ``-kl_coef * KL_t`` (``kl_estimator`` k1 by default, k3 optional), plus
   the score on the last response token; ``kl_coef`` is fixed or follows the adaptive controller of
   Ziegler et al. (2019), and lives in the checkpointed state;
4. **advantages**: GAE(gamma, lambda) by a reverse ``lax.scan`` (``easyppo.core.ops.gae``); returns =
   advantages + values; advantages whitened over the rollout's response tokens;
5. **updates** (one jitted program, donating the state): ``ppo_epochs`` passes over shuffled
   minibatches, each a clipped-surrogate policy step and a clipped value step with their own
   optimizers, with gradient accumulation over ``train.grad_accum_steps`` microbatches.

The one thing that makes PPO PPO: the ratio ``pi(a|s) / pi_old(a|s)`` divides by the log-probs
*stored in step 2*, never recomputed before an update. After the first minibatch step the policy has
moved, the ratio leaves 1 and clipping acts (the ``policy_clip_fraction`` metric shows it). An
existing JAX implementation recomputed "old" log-probs right before each update, which makes every
ratio exactly 1 and silently turns PPO into vanilla policy gradient.

Models: the policy (``config.model``, trained, with optimizer state), the value model
(``ppo.value_model``, trained; by default initialised from the reward model, head included), the
reference (the policy's initial weights or ``ppo.reference_init_from``) and the reward model
(``ppo.reward_model``), both frozen: held as parameters only, never in a checkpoint or an optimizer.
The reward model must use the policy's tokenizer; it may be larger than the policy (Tulu 2.5 scores a
13B policy with a 70B reward model).

A checkpoint (``PPOState``) holds the policy and value parameters, both optimizer states and the KL
coefficient; the loop adds the data position, and the step's RNG is ``fold_in(seed, step)``, so a
resumed run repeats the uninterrupted one exactly. The policy sits in the state's ``params`` field,
like every other algorithm's model, so a PPO run directory can start another run or be converted.

Everything the iteration measures (docs/algorithms.md explains how to read it) comes back as metrics:
scores, KL, non-score reward, entropy, clip fractions, approx-KL, explained variance, response length,
EOS rate and the sampler-vs-trainer log-prob gap; ``rollout_samples`` gives the last rollout as a
table for the samples log.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_dict

from easyppo.algorithms import base
from easyppo.core import ops, optim, sharding
from easyppo.data import pipeline
from easyppo.models import generation, llama, partitioning
from easyppo.models.sequences import Sequences, join_prompt_and_response, response_columns
from easyppo.weights import huggingface, loading

logger = logging.getLogger(__name__)

NAME = "ppo"
DATA_KIND = "prompt"
MODEL_KIND = "causal_lm"
PROGRESS_BAR_METRICS = ("score", "kl_per_sequence")

KL_ESTIMATORS = ("k1", "k3")
MISSING_EOS_MODES = ("replace", "add")

PyTree = Any


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Rollout.
    c.samples_per_prompt = 1  # Responses sampled per prompt (rollout rows = prompts x this).
    c.sampling = generation.default_config()  # Temperature, top-p/k, max_new_tokens, stop ids.
    c.sampling.temperature = 0.7
    c.sampling.max_new_tokens = 128
    # The models besides the policy (config.model).
    c.reference_init_from = ""  # Frozen reference; "": the policy's own model.init_from.
    c.reward_model = loading.default_config()  # Frozen scorer of (prompt, response).
    c.value_model = loading.default_config()  # Trained critic; init_from "": reward_model's weights.
    c.value_optim = optim.default_config()  # The value model's optimizer (the policy uses config.optim).
    # Rewards.
    c.kl_coef = 0.05  # Initial (adaptive) or fixed weight of the per-token KL penalty.
    c.kl_estimator = "k1"  # One of KL_ESTIMATORS (easyppo.core.ops.kl_estimate).
    c.adaptive_kl = False  # Ziegler et al.'s proportional controller towards kl_target.
    c.kl_target = 6.0  # Target KL per sequence (nats) of the adaptive controller.
    c.kl_horizon = 10000  # Its horizon in rollout rows.
    c.missing_eos_penalty = config_dict.placeholder(float)  # None: no penalty; e.g. -10.
    c.missing_eos_mode = "replace"  # One of MISSING_EOS_MODES: score := penalty, or score += penalty.
    # Advantages and updates.
    c.gamma = 1.0
    c.lam = 0.95
    c.whiten_advantages = True
    c.ppo_epochs = 1  # Passes over each rollout.
    c.num_minibatches = 1  # Minibatches per pass (each is one optimizer step of each model).
    c.clip_ratio = 0.2  # Policy ratio clipped to [1 - c, 1 + c].
    c.value_clip = 0.2  # New values kept within +- this of the rollout's values.
    c.vf_coef = 0.1  # Weight of the value loss.
    c.entropy_coef = 0.0  # Weight of the entropy bonus (0: off).
    c.value_warmup_steps = 0  # First iterations train only the value model (the policy is frozen).
    # Evaluation on held-out prompts (eval.path): the reward of the policy's responses.
    c.eval_greedy = True  # Greedy responses (deterministic); False: the training sampler, fixed seed.
    # Logging.
    c.samples_every_steps = 0  # Write a table of sampled prompts/responses/rewards every N steps (0: never).
    c.samples_to_log = 8  # Rows per table.
    c.logprob_chunk_size = 256  # Sequence positions per chunk of the vocabulary projection.
    return c


# ---------------------------------------------------------------------------------- pure functions


def apply_missing_eos_penalty(score: jax.Array, finished: jax.Array, penalty: float | None, mode: str) -> jax.Array:
    """The score PPO optimises: a response without a stop token gets ``penalty`` (or score + penalty)."""
    if penalty is None:
        return score
    penalised = jnp.full_like(score, penalty) if mode == "replace" else score + penalty
    return jnp.where(finished, score, penalised)


def kl_shaped_rewards(
    score: jax.Array, kl: jax.Array, mask: jax.Array, kl_coef: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-token rewards [R, N]: ``-kl_coef * kl`` on every response token, plus ``score`` on the last.

    Returns (rewards, non_score_rewards); both 0 outside ``mask``. A row without response tokens (a
    padding row) gets nothing.
    """
    mask = mask.astype(jnp.float32)
    non_score = -kl_coef * kl * mask
    last = llama.last_token_index(mask)
    has_tokens = jnp.any(mask > 0, axis=-1)
    at_last = jax.nn.one_hot(last, mask.shape[-1], dtype=jnp.float32) * has_tokens[:, None]
    return non_score + at_last * score[:, None], non_score


def clipped_policy_loss(
    logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, clip_ratio: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token clipped surrogate loss, whether clipping was active, and the ratio.

    ``max(-A r, -A clip(r, 1 - c, 1 + c))`` with ``r = exp(logp - logp_old)``: the pessimistic bound
    of Schulman et al. (2017). A token counts as clipped when the clipped term is the larger one.
    """
    ratio = jnp.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    return jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32), ratio


def clipped_value_loss(
    values: jax.Array, old_values: jax.Array, returns: jax.Array, value_clip: float
) -> tuple[jax.Array, jax.Array]:
    """Per-token ``0.5 max((v - R)^2, (v_clip - R)^2)`` with ``v_clip`` within +-c of the old value.

    Returns the loss and whether the clipped term was the larger one.
    """
    clipped_values = old_values + jnp.clip(values - old_values, -value_clip, value_clip)
    unclipped_sq = jnp.square(values - returns)
    clipped_sq = jnp.square(clipped_values - returns)
    return 0.5 * jnp.maximum(unclipped_sq, clipped_sq), (clipped_sq > unclipped_sq).astype(jnp.float32)


def explained_variance(predictions: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var(targets - predictions) / Var(targets) over masked elements (1: perfect, <= 0: useless)."""
    return 1.0 - ops.safe_divide(ops.masked_var(targets - predictions, mask), ops.masked_var(targets, mask))


def adaptive_kl_coef(
    kl_coef: jax.Array, observed_kl: jax.Array, *, target: float, horizon: int, batch_rows: int
) -> jax.Array:
    """Ziegler et al. (2019): move the coefficient proportionally to KL/target - 1, clipped to +-20%."""
    error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * batch_rows / horizon)


# ------------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """The ``ppo`` options the jitted functions need, validated once (hashable, static)."""

    samples_per_prompt: int
    kl_estimator: str
    adaptive_kl: bool
    kl_target: float
    kl_horizon: int
    missing_eos_penalty: float | None
    missing_eos_mode: str
    gamma: float
    lam: float
    whiten_advantages: bool
    ppo_epochs: int
    num_minibatches: int
    clip_ratio: float
    value_clip: float
    vf_coef: float
    entropy_coef: float
    value_warmup_steps: int
    logprob_chunk_size: int
    grad_accum_steps: int

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Settings:
        c = config.ppo
        return cls(
            samples_per_prompt=int(c.samples_per_prompt),
            kl_estimator=c.kl_estimator,
            adaptive_kl=bool(c.adaptive_kl),
            kl_target=float(c.kl_target),
            kl_horizon=int(c.kl_horizon),
            missing_eos_penalty=None if c.missing_eos_penalty is None else float(c.missing_eos_penalty),
            missing_eos_mode=c.missing_eos_mode,
            gamma=float(c.gamma),
            lam=float(c.lam),
            whiten_advantages=bool(c.whiten_advantages),
            ppo_epochs=int(c.ppo_epochs),
            num_minibatches=int(c.num_minibatches),
            clip_ratio=float(c.clip_ratio),
            value_clip=float(c.value_clip),
            vf_coef=float(c.vf_coef),
            entropy_coef=float(c.entropy_coef),
            value_warmup_steps=int(c.value_warmup_steps),
            logprob_chunk_size=int(c.logprob_chunk_size),
            grad_accum_steps=int(config.train.grad_accum_steps),
        )

    def updates_per_step(self) -> int:
        return self.ppo_epochs * self.num_minibatches


def rows_per_update(config: ml_collections.ConfigDict) -> int:
    """Rows one optimizer step sees (a minibatch of the rollout); config.validate checks its split."""
    return config.data.global_batch_size * config.ppo.samples_per_prompt // max(config.ppo.num_minibatches, 1)


def validate_config(config: ml_collections.ConfigDict) -> Settings:
    """Every ``ppo`` check that needs no weights and no data; errors name the config key."""
    c = config.ppo

    def fail(key: str, message: str):
        raise ValueError(f"config.ppo.{key}: {message}")

    for key in (
        "samples_per_prompt",
        "ppo_epochs",
        "num_minibatches",
        "kl_horizon",
        "logprob_chunk_size",
        "samples_to_log",
    ):
        if int(c[key]) < 1:
            fail(key, f"must be >= 1, got {c[key]}")
    if c.kl_estimator not in KL_ESTIMATORS:
        fail("kl_estimator", f"{c.kl_estimator!r} is not one of {KL_ESTIMATORS}")
    if c.missing_eos_mode not in MISSING_EOS_MODES:
        fail("missing_eos_mode", f"{c.missing_eos_mode!r} is not one of {MISSING_EOS_MODES}")
    for key in (
        "kl_coef",
        "clip_ratio",
        "value_clip",
        "vf_coef",
        "entropy_coef",
        "value_warmup_steps",
        "samples_every_steps",
    ):
        if c[key] < 0:
            fail(key, f"must be >= 0, got {c[key]}")
    if not c.kl_target > 0:
        fail("kl_target", f"must be > 0, got {c.kl_target}")
    if not 0 <= c.gamma <= 1 or not 0 <= c.lam <= 1:
        fail("gamma" if not 0 <= c.gamma <= 1 else "lam", "must be in [0, 1]")
    rows = config.data.global_batch_size * c.samples_per_prompt
    if rows % c.num_minibatches:
        fail(
            "num_minibatches",
            f"the rollout's {rows} rows (data.global_batch_size x samples_per_prompt) do not split into {c.num_minibatches} minibatches",
        )
    try:
        generation.SamplingConfig.from_config(c.sampling)
    except ValueError as e:
        raise ValueError(f"config.ppo.{e}") from None
    policy = loading.resolve_architecture(config.model)
    total = config.data.max_prompt_len + c.sampling.max_new_tokens
    for key, model_cfg in (
        ("model", config.model),
        ("ppo.reward_model", c.reward_model),
        ("ppo.value_model", value_model_config(config)),
    ):
        architecture = policy if key == "model" else loading.resolve_architecture(model_cfg)
        if total > architecture.max_position_embeddings:
            raise ValueError(
                f"config.ppo.sampling.max_new_tokens: data.max_prompt_len ({config.data.max_prompt_len}) + "
                f"{c.sampling.max_new_tokens} new tokens exceed {key}'s max_position_embeddings="
                f"{architecture.max_position_embeddings}"
            )
        if architecture.vocab_size < policy.vocab_size and key != "model":
            raise ValueError(
                f"config.{key}: its vocabulary ({architecture.vocab_size}) is smaller than the policy's "
                f"({policy.vocab_size}); the reward and value models must share the policy's tokenizer"
            )
    return Settings.from_config(config)


def value_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The value model's ``model`` config: ``ppo.value_model``, or the reward model's if unset."""
    value = config.ppo.value_model
    if value.init_from:
        return value
    start = ml_collections.ConfigDict(config.ppo.reward_model.to_dict())
    for key in ("dtype", "param_dtype", "remat", "scan_layers"):
        start[key] = value[key]  # the trained copy keeps its own compute settings
    return start


def reference_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The reference's ``model`` config: the policy's, with ``ppo.reference_init_from`` if set."""
    return loading.frozen_config(config.model, config.ppo.reference_init_from)


# ---------------------------------------------------------------------------------------- state


@flax.struct.dataclass
class PPOState:
    """What a PPO run checkpoints (the loop adds the data position).

    ``params`` / ``opt_state`` are the policy's, named like every algorithm's trained model.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    value_params: PyTree
    value_opt_state: PyTree
    kl_coef: jax.Array


@flax.struct.dataclass
class Rollout:
    """Sampled responses of one iteration, one row per (prompt, sample)."""

    prompt_ids: jax.Array  # int32 [R, P], left-padded
    prompt_mask: jax.Array  # int32 [R, P]
    response_ids: jax.Array  # int32 [R, N]
    response_mask: jax.Array  # int32 [R, N], 1 up to and including the stop token; 0 on padding rows
    sampler_logprobs: jax.Array  # float32 [R, N], the sampler's raw (temperature 1) log-probs
    finished: jax.Array  # bool [R]
    row_mask: jax.Array  # float32 [R], 0 for padding rows of a partial prompt batch


@dataclasses.dataclass
class PPOTrainer:
    """Rollout, scoring and update for one PPO iteration, as three jitted programs (see module doc).

    ``rollout``, ``score`` and ``update`` are public so that benchmarks can time each phase;
    ``train_step`` runs them in order.
    """

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    total_steps: int
    settings: Settings
    sampling: generation.SamplingConfig
    eval_sampling: generation.SamplingConfig
    policy_config: llama.LlamaConfig
    value_config: llama.LlamaConfig
    reward_config: llama.LlamaConfig
    initial_params: PyTree
    initial_value_params: PyTree
    frozen: dict  # {"reference": params, "reward": params}
    pad_token_id: int
    name: str = NAME
    data_kind: str = DATA_KIND

    def __post_init__(self):
        s = self.settings
        policy_updates = max(self.total_steps - s.value_warmup_steps, 1) * s.updates_per_step()
        value_updates = self.total_steps * s.updates_per_step()
        self.policy_schedule = optim.make_schedule(self.config.optim, policy_updates)
        self.value_schedule = optim.make_schedule(self.config.ppo.value_optim, value_updates)
        self.policy_optimizer = optim.make_optimizer(self.config.optim, policy_updates)
        self.value_optimizer = optim.make_optimizer(self.config.ppo.value_optim, value_updates)
        self.policy_module = llama.make_model(self.policy_config, "causal_lm")
        self.value_module = llama.make_model(self.value_config, "value")
        self.reward_module = llama.make_model(self.reward_config, "reward")
        replicated = NamedSharding(self.mesh, P())
        self._replicated = replicated
        shardings_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
        self.state_shardings = PPOState(
            step=replicated,
            params=shardings_of(self.initial_params),
            opt_state=sharding.optimizer_state_shardings(
                self.policy_optimizer, self.initial_params, self.mesh, partitioning.LLAMA_RULES
            ),
            value_params=shardings_of(self.initial_value_params),
            value_opt_state=sharding.optimizer_state_shardings(
                self.value_optimizer, self.initial_value_params, self.mesh, partitioning.LLAMA_RULES
            ),
            kl_coef=replicated,
        )
        self.rollout = jax.jit(self._rollout_impl, static_argnames=("sampling",))
        self.score = jax.jit(self._score_impl)
        self._update = jax.jit(
            self._update_impl,
            static_argnames=("train_policy",),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )
        self._eval = jax.jit(self._eval_impl, out_shardings=replicated)
        self._last_rollout: tuple[Rollout, dict] | None = None

    # ------------------------------------------------------------------------------------ state

    def init_state(self) -> PPOState:
        return PPOState(
            step=jax.device_put(jnp.zeros((), jnp.int32), self._replicated),
            params=self.initial_params,
            opt_state=sharding.sharded_optimizer_init(
                self.policy_optimizer, self.initial_params, mesh=self.mesh, rules=partitioning.LLAMA_RULES
            ),
            value_params=self.initial_value_params,
            value_opt_state=sharding.sharded_optimizer_init(
                self.value_optimizer, self.initial_value_params, mesh=self.mesh, rules=partitioning.LLAMA_RULES
            ),
            kl_coef=jax.device_put(jnp.asarray(self.config.ppo.kl_coef, jnp.float32), self._replicated),
        )

    def abstract_state(self) -> PPOState:
        params, value_params = base.abstract_tree(self.initial_params), base.abstract_tree(self.initial_value_params)
        scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
        state = PPOState(
            step=scalar(jnp.int32),
            params=params,
            opt_state=jax.eval_shape(self.policy_optimizer.init, params),
            value_params=value_params,
            value_opt_state=jax.eval_shape(self.value_optimizer.init, value_params),
            kl_coef=scalar(jnp.float32),
        )
        return base.with_shardings(state, self.state_shardings)

    # ---------------------------------------------------------------------------------- rollout

    def _rollout_impl(self, params, batch, rng, *, sampling: generation.SamplingConfig) -> Rollout:
        k = self.settings.samples_per_prompt
        # Repeating row by row (p0, p0, p1, p1, ...) keeps every sample on its prompt's device.
        repeat = lambda x: jnp.repeat(x, k, axis=0)
        prompt_ids = repeat(batch["prompt_input_ids"]).astype(jnp.int32)
        prompt_mask = repeat(batch["prompt_attention_mask"]).astype(jnp.int32)
        row_mask = repeat(batch["example_mask"]).astype(jnp.float32)
        out = generation.generate(
            params, prompt_ids, prompt_mask, rng, model_config=self.policy_config, sampling=sampling
        )
        response_mask = out.response_mask * (row_mask[:, None] > 0)
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=out.tokens,
            response_mask=response_mask,
            sampler_logprobs=out.logprobs,
            finished=out.finished,
            row_mask=row_mask,
        )

    # ---------------------------------------------------------------------------------- scoring

    def _response_logprobs(self, params, seqs: Sequences, response_ids, *, with_entropy: bool = False):
        """log pi(response token) [R, N] (and the entropy of each predictive distribution)."""
        hidden = self.policy_module.apply(
            {"params": params}, seqs.input_ids, seqs.attention_mask, seqs.position_ids, method="hidden_states"
        )
        hidden = response_columns(hidden, seqs.input_ids.shape[1] - response_ids.shape[1], response_ids.shape[1])
        return ops.token_logprobs(
            hidden,
            llama.output_embedding(params, self.policy_config),
            response_ids,
            chunk_size=self.settings.logprob_chunk_size,
            return_entropy=with_entropy,
        )

    def _values(self, value_params, seqs: Sequences, num_new: int) -> jax.Array:
        values = self.value_module.apply(
            {"params": value_params}, seqs.input_ids, seqs.attention_mask, seqs.position_ids
        )
        return response_columns(values, seqs.input_ids.shape[1] - num_new, num_new)

    def _frozen_judgement(self, frozen: dict, seqs: Sequences, response_ids) -> tuple[jax.Array, jax.Array]:
        """The reference's log-probs of the response tokens [R, N] and the reward model's score [R]."""
        ref_logprobs = self._response_logprobs(frozen["reference"], seqs, response_ids)
        score = self.reward_module.apply(
            {"params": frozen["reward"]}, seqs.input_ids, seqs.attention_mask, seqs.position_ids
        )
        return ref_logprobs, score

    def _score_impl(self, state: PPOState, frozen: dict, rollout: Rollout) -> tuple[dict, dict, dict]:
        """Old log-probs, reference log-probs, values, scores -> rewards and GAE advantages.

        Returns (experience: the per-row arrays the update reads, per_row: score and KL of each row
        for the samples log, metrics: rollout statistics).
        """
        s = self.settings
        num_new = rollout.response_ids.shape[1]
        seqs = join_prompt_and_response(
            rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask
        )
        mask = rollout.response_mask.astype(jnp.float32)
        logprobs, entropy = self._response_logprobs(state.params, seqs, rollout.response_ids, with_entropy=True)
        ref_logprobs, raw_score = self._frozen_judgement(frozen, seqs, rollout.response_ids)
        values = self._values(state.value_params, seqs, num_new)
        score = apply_missing_eos_penalty(raw_score, rollout.finished, s.missing_eos_penalty, s.missing_eos_mode)

        kl = ops.kl_estimate(logprobs, ref_logprobs, s.kl_estimator) * mask
        rewards, non_score = kl_shaped_rewards(score, kl, mask, state.kl_coef)
        advantages, returns = ops.gae(rewards, values, mask, s.gamma, s.lam)
        whitened = ops.masked_whiten(advantages, mask) if s.whiten_advantages else advantages

        constrain_rows = lambda x: sharding.constrain(x, P(sharding.BATCH_AXES))
        experience = {
            "input_ids": seqs.input_ids,
            "attention_mask": seqs.attention_mask,
            "position_ids": seqs.position_ids,
            "response_ids": rollout.response_ids,
            "mask": mask,
            "old_logprobs": logprobs,
            "old_values": values * mask,
            "advantages": whitened,
            "returns": returns,
        }
        experience = jax.tree.map(constrain_rows, experience)
        per_row = jax.tree.map(constrain_rows, {"raw_score": raw_score, "score": score, "kl": jnp.sum(kl, axis=-1)})

        rows = rollout.row_mask
        num_rows = jnp.maximum(jnp.sum(rows), 1.0)
        row_mean = lambda x: jnp.sum(x * rows) / num_rows
        token_mean = lambda x: ops.masked_mean(x, mask)
        lengths = jnp.sum(mask, axis=-1)
        kl_per_sequence = jnp.sum(kl, axis=-1)
        gap = jnp.abs(rollout.sampler_logprobs - logprobs)
        metrics = {
            "score": row_mean(raw_score),
            "score_std": jnp.sqrt(jnp.maximum(row_mean(raw_score**2) - row_mean(raw_score) ** 2, 0.0)),
            "score_penalized": row_mean(score),
            "kl_per_token": token_mean(kl),
            "kl_per_sequence": row_mean(kl_per_sequence),
            "kl_coef": state.kl_coef,
            "non_score_reward": row_mean(jnp.sum(non_score, axis=-1)),
            "total_reward": row_mean(jnp.sum(rewards, axis=-1)),
            "entropy": token_mean(entropy),
            "response_length": row_mean(lengths),
            "eos_rate": row_mean(rollout.finished.astype(jnp.float32)),
            "logprob_gap": token_mean(gap),
            "logprob_gap_max": jnp.max(jnp.where(mask > 0, gap, 0.0)),
            "value_mean": token_mean(values),
            "return_mean": token_mean(returns),
            "advantage_mean": token_mean(advantages),
            "explained_variance": explained_variance(values, returns, mask),
            "num_tokens": jnp.sum(seqs.attention_mask).astype(jnp.float32),
        }
        # Replicated, so every host of a multi-host job can read them.
        metrics = jax.tree.map(lambda x: sharding.constrain(x, P()), metrics)
        return experience, per_row, metrics

    # ----------------------------------------------------------------------------------- update

    def _policy_loss_fn(self, params, minibatch, rng):
        del rng
        s = self.settings
        seqs = Sequences(minibatch["input_ids"], minibatch["attention_mask"], minibatch["position_ids"])
        mask = minibatch["mask"]
        tokens = jnp.sum(mask)
        total = lambda x: (ops.masked_sum(x, mask), tokens)
        metrics = {}
        # The entropy over the vocabulary costs a pass over every chunk's logits in the forward and
        # the backward: computed only when it is part of the loss (scoring reports it anyway).
        if s.entropy_coef:
            logprobs, entropy = self._response_logprobs(params, seqs, minibatch["response_ids"], with_entropy=True)
            metrics["update_entropy"] = total(entropy)
        else:
            logprobs, entropy = self._response_logprobs(params, seqs, minibatch["response_ids"]), 0.0
        losses, clipped, ratio = clipped_policy_loss(
            logprobs, minibatch["old_logprobs"], minibatch["advantages"], s.clip_ratio
        )
        loss_sum = ops.masked_sum(losses - s.entropy_coef * entropy, mask)
        log_ratio = logprobs - minibatch["old_logprobs"]
        return loss_sum, {
            "loss": (loss_sum, tokens),
            "policy_loss": total(losses),
            "policy_clip_fraction": total(clipped),
            "approx_kl": total(jnp.expm1(log_ratio) - log_ratio),  # k3 estimate of KL(old || new)
            "ratio": total(ratio),
            **metrics,
        }

    def _value_loss_fn(self, value_params, minibatch, rng):
        del rng
        s = self.settings
        seqs = Sequences(minibatch["input_ids"], minibatch["attention_mask"], minibatch["position_ids"])
        values = self._values(value_params, seqs, minibatch["response_ids"].shape[1])
        mask = minibatch["mask"]
        losses, clipped = clipped_value_loss(values, minibatch["old_values"], minibatch["returns"], s.value_clip)
        tokens = jnp.sum(mask)
        loss_sum = s.vf_coef * ops.masked_sum(losses, mask)
        return loss_sum, {
            "loss": (loss_sum, tokens),
            "value_loss": (ops.masked_sum(losses, mask), tokens),
            "value_clip_fraction": (ops.masked_sum(clipped, mask), tokens),
        }

    def _update_impl(self, state: PPOState, experience: dict, observed_kl, rng, *, train_policy: bool):
        s = self.settings
        rows = experience["mask"].shape[0]
        per_minibatch = rows // s.num_minibatches

        def minibatch_step(carry, inputs):
            state, skipped = carry
            index, minibatch = inputs
            minibatch = jax.tree.map(lambda x: sharding.constrain(x, P(sharding.BATCH_AXES)), minibatch)
            key = jax.random.fold_in(rng, index)
            metrics = {}
            accum = s.grad_accum_steps
            if train_policy:
                policy = base.gradient_update(
                    self._policy_loss_fn, self.policy_optimizer, state.params, state.opt_state, minibatch, key, accum
                )
                state = state.replace(params=policy.params, opt_state=policy.opt_state)
                metrics.update(
                    {k: v for k, v in policy.metrics.items() if k != "loss"}, policy_grad_norm=policy.grad_norm
                )
                skipped = skipped + (~policy.finite)
            value = base.gradient_update(
                self._value_loss_fn,
                self.value_optimizer,
                state.value_params,
                state.value_opt_state,
                minibatch,
                key,
                accum,
            )
            state = state.replace(value_params=value.params, value_opt_state=value.opt_state)
            metrics.update({k: v for k, v in value.metrics.items() if k != "loss"}, value_grad_norm=value.grad_norm)
            return (state, skipped + (~value.finite)), metrics

        def epoch(carry, epoch_index):
            order = jax.random.permutation(jax.random.fold_in(rng, 1_000_003 + epoch_index), rows)
            shuffled = jax.tree.map(lambda x: jnp.take(x, order, axis=0), experience)
            minibatches = jax.tree.map(lambda x: x.reshape(s.num_minibatches, per_minibatch, *x.shape[1:]), shuffled)
            indices = epoch_index * s.num_minibatches + jnp.arange(s.num_minibatches)
            return lax.scan(minibatch_step, carry, (indices, minibatches))

        (state, skipped), metrics = lax.scan(epoch, (state, jnp.int32(0)), jnp.arange(s.ppo_epochs))
        metrics = jax.tree.map(jnp.mean, metrics)
        kl_coef = state.kl_coef
        if s.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, observed_kl, target=s.kl_target, horizon=s.kl_horizon, batch_rows=rows)
        state = state.replace(step=state.step + 1, kl_coef=kl_coef)
        metrics["skipped_updates"] = skipped.astype(jnp.float32)
        metrics["skipped"] = (skipped > 0).astype(jnp.float32)
        return state, metrics

    def update(
        self, state: PPOState, experience: dict, observed_kl: jax.Array, rng: jax.Array, *, train_policy: bool = True
    ):
        """``ppo_epochs`` x ``num_minibatches`` steps of both models on one scored rollout (donates ``state``)."""
        return self._update(state, experience, observed_kl, rng, train_policy=train_policy)

    # ------------------------------------------------------------------------------- train step

    def train_step(self, state: PPOState, batch: Mapping[str, jax.Array], rng: jax.Array) -> tuple[PPOState, dict]:
        step = int(jax.device_get(state.step)) + 1  # the step this call completes
        train_policy = step > self.settings.value_warmup_steps
        with jax.set_mesh(self.mesh):
            rollout = self.rollout(state.params, batch, jax.random.fold_in(rng, 0), sampling=self.sampling)
            experience, per_row, metrics = self.score(state, self.frozen, rollout)
            self._last_rollout = (rollout, per_row)
            state, update_metrics = self.update(
                state, experience, metrics["kl_per_sequence"], jax.random.fold_in(rng, 1), train_policy=train_policy
            )
        updates = self.settings.updates_per_step()
        policy_updates_done = max(step - self.settings.value_warmup_steps, 0) * updates
        metrics = {**metrics, **update_metrics}
        metrics["learning_rate"] = float(self.policy_schedule(max(policy_updates_done - 1, 0))) if train_policy else 0.0
        metrics["value_learning_rate"] = float(self.value_schedule(step * updates - 1))
        return state, metrics

    def rollout_samples(self, tokenizer, max_rows: int | None = None) -> dict[str, list]:
        """The last training rollout as columns for the samples log (empty before the first step).

        Columns: prompt and response text (special tokens kept, so a missing stop token shows),
        response length, whether it stopped, the reward model's score, the score after the
        missing-EOS penalty, and the sequence's KL to the reference.
        """
        if self._last_rollout is None:
            return {}
        rollout, per_row = self._last_rollout
        # A collective in a multi-host job (every host calls this at the same step); rows span hosts.
        host = multihost_utils.process_allgather(
            {
                "prompt_ids": rollout.prompt_ids,
                "prompt_mask": rollout.prompt_mask,
                "response_ids": rollout.response_ids,
                "response_mask": rollout.response_mask,
                "finished": rollout.finished,
                "row_mask": rollout.row_mask,
                **per_row,
            },
            tiled=True,
        )
        columns: dict[str, list] = {
            "prompt": [],
            "response": [],
            "response_tokens": [],
            "finished": [],
            "score": [],
            "score_penalized": [],
            "kl": [],
        }
        for row in np.flatnonzero(host["row_mask"] > 0)[: max_rows or self.config.ppo.samples_to_log]:
            prompt = host["prompt_ids"][row][host["prompt_mask"][row] > 0]
            response = host["response_ids"][row][host["response_mask"][row] > 0]
            columns["prompt"].append(tokenizer.decode(prompt.tolist(), skip_special_tokens=False))
            columns["response"].append(tokenizer.decode(response.tolist(), skip_special_tokens=False))
            columns["response_tokens"].append(len(response))
            columns["finished"].append(bool(host["finished"][row]))
            columns["score"].append(float(host["raw_score"][row]))
            columns["score_penalized"].append(float(host["score"][row]))
            columns["kl"].append(float(host["kl"][row]))
        return columns

    # ------------------------------------------------------------------------------------- eval

    def _eval_impl(self, params, frozen, batch):
        sampling = self.eval_sampling
        rollout = self._rollout_impl(params, batch, jax.random.key(0), sampling=sampling)
        seqs = join_prompt_and_response(
            rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask
        )
        mask = rollout.response_mask.astype(jnp.float32)
        ref_logprobs, score = self._frozen_judgement(frozen, seqs, rollout.response_ids)
        kl = ops.kl_estimate(rollout.sampler_logprobs, ref_logprobs, "k1") * mask
        rows = rollout.row_mask
        count = jnp.sum(rows)
        total = lambda x: (jnp.sum(x * rows), count)
        return {
            "score": total(score),
            "score_sq": total(score**2),
            "kl_per_sequence": total(jnp.sum(kl, axis=-1)),
            "response_length": total(jnp.sum(mask, axis=-1)),
            "eos_rate": total(rollout.finished.astype(jnp.float32)),
        }

    def eval_step(self, state: PPOState, batch) -> base.MetricPairs:
        with jax.set_mesh(self.mesh):
            return self._eval(state.params, self.frozen, batch)

    def finalize_metrics(self, means: dict[str, float]) -> dict[str, float]:
        out = {k: v for k, v in means.items() if not k.endswith("_sq")}
        if "score_sq" in means:
            out["score_std"] = base.std_from_moments(means, "score")
        return out

    # ----------------------------------------------------------------------------------- export

    def export(self, state: PPOState, directory: str) -> list[str]:
        """The policy to ``directory`` and the value model to ``<directory>_value`` (HF format)."""
        value_dir = value_export_dir(directory)
        huggingface.save_hf(
            directory, self.policy_config, state.params, kind="causal_lm", pad_token_id=self.pad_token_id
        )
        huggingface.save_hf(
            value_dir, self.value_config, state.value_params, kind="value", pad_token_id=self.pad_token_id
        )
        return [directory, value_dir]


def value_export_dir(policy_dir: str) -> str:
    """Where the value model is exported beside the policy (a sibling, so the policy dir stays a clean model)."""
    return policy_dir.rstrip("/") + "_value"


def make_trainer(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    total_steps: int,
    *,
    train_data,
    eval_data,
    resuming: bool = False,
) -> PPOTrainer:
    """Loads the four models named by the config and builds the PPO trainer.

    ``resuming``: the policy and value weights will come from the checkpoint, so only their shapes are
    built; the frozen reference and reward model are always read.
    """
    del train_data, eval_data  # prompts arrive batch by batch; nothing is precomputed
    settings = validate_config(config)
    tokenizer, chat_format = pipeline.load_tokenizer_and_format(config.data)
    rng = jax.random.key(config.seed)
    policy_config, _, params = loading.load_model(config.model, MODEL_KIND, mesh=mesh, rng=rng, abstract=resuming)
    _, _, reference = loading.load_model(reference_model_config(config), MODEL_KIND, mesh=mesh, rng=rng)
    # The reward model and (by default) the value model start from the same weights: the value head
    # begins as the reward head, Tulu 2.5's and InstructGPT's choice.
    reward_rng = jax.random.fold_in(rng, 1)
    reward_config, _, reward = loading.load_model(
        loading.frozen_config(config.ppo.reward_model), "reward", mesh=mesh, rng=reward_rng
    )
    value_config, _, value = loading.load_model(
        value_model_config(config), "value", mesh=mesh, rng=reward_rng, abstract=resuming
    )

    logger.info(
        "PPO models: policy %s, reference %s, reward %s, value %s%s",
        config.model.init_from or f"random {config.model.preset}",
        reference_model_config(config).init_from or "the policy's random init",
        config.ppo.reward_model.init_from or f"random {config.ppo.reward_model.preset}",
        value_model_config(config).init_from or "the reward model's random init",
        " (policy and value restored from the checkpoint)" if resuming else "",
    )
    pad_id = config.data.pad_id if config.data.pad_id is not None else policy_config.pad_token_id
    pad_id = pad_id if pad_id is not None else tokenizer.pad_id
    sampling_values = config.ppo.sampling.to_dict()
    stop_ids = list(sampling_values["stop_token_ids"])
    if chat_format.end_of_turn_id not in stop_ids and chat_format.end_of_turn_id != policy_config.eos_token_id:
        stop_ids.append(chat_format.end_of_turn_id)  # e.g. Llama 3's <|eot_id|> ends an assistant turn
    sampling_values.update(stop_token_ids=tuple(stop_ids), pad_token_id=int(pad_id))
    sampling = generation.SamplingConfig.from_config(sampling_values)
    eval_sampling = dataclasses.replace(sampling, greedy=True) if config.ppo.eval_greedy else sampling
    return PPOTrainer(
        config=config,
        mesh=mesh,
        total_steps=total_steps,
        settings=settings,
        sampling=sampling,
        eval_sampling=eval_sampling,
        policy_config=policy_config,
        value_config=value_config,
        reward_config=reward_config,
        initial_params=params,
        initial_value_params=value,
        frozen={"reference": reference, "reward": reward},
        pad_token_id=int(pad_id),
    )
