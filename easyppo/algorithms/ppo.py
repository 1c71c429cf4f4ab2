"""Proximal policy optimisation from a reward model: the classic RLHF recipe, done correctly.

One train step of the loop is one PPO *iteration* over a batch of prompts, composed of the programs
of ``easyppo.algorithms.rl``:

1. **rollout** (``rl.rollout``): ``samples_per_prompt`` responses per prompt from the current policy;
2. **scoring** (``rl.scoring``), once, with the rollout's own parameters: the *old* log-probs, the
   frozen reference's, the critic's values and the reward model's score; a response that never
   emitted a stop token has its score replaced by (or shifted by) ``missing_eos_penalty``; per token
   ``-kl_coef * KL_t`` (k1 or k3) plus the score on the last token; GAE advantages;
3. **update** (``rl.update``, donating the state): ``ppo_epochs`` passes over shuffled minibatches,
   each a clipped-surrogate policy step and a clipped value step with their own optimizers.

The one thing that makes PPO PPO: the ratio ``pi(a|s) / pi_old(a|s)`` divides by the log-probs
*stored in step 2*, never recomputed before an update. After the first minibatch step the policy has
moved, the ratio leaves 1 and clipping acts (``policy_clip_fraction`` shows it). An existing JAX
implementation recomputed "old" log-probs right before each update, which makes every ratio exactly 1
and silently turns PPO into vanilla policy gradient.

Models: the policy (``config.model``, trained), the value model (``ppo.value_model``, trained; by
default initialised from the reward model, head included), the reference (the policy's initial
weights or ``ppo.reference_init_from``) and the reward model (``ppo.reward_model``), both frozen:
held as parameters only, never in a checkpoint or an optimizer. The reward model must use the
policy's tokenizer; it may be larger than the policy (Tulu 2.5 scores a 13B policy with a 70B RM).

A checkpoint (``RLState``) holds the policy and value parameters, both optimizer states and the KL
coefficient; the loop adds the data position and the step's RNG is ``fold_in(seed, step)``, so a
resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from easyppo.algorithms import base
from easyppo.algorithms.contract import Algorithm, MetricPairs, RunInputs, StepResult
from easyppo.algorithms.rl import forward, rollout, scoring
from easyppo.algorithms.rl.options import RLOptions
from easyppo.algorithms.rl.update import Optimizers, RLState, update
from easyppo.core import ops, optim, sharding
from easyppo.core.options import OptionError
from easyppo.data import chat
from easyppo.models import generation, partitioning
from easyppo.models.sequences import join_prompt_and_response
from easyppo.weights import huggingface, loading

logger = logging.getLogger(__name__)

PyTree = Any


def value_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The value model's ``model`` config: ``ppo.value_model``, or the reward model's if unset."""
    value = config.ppo.value_model
    if value.init_from:
        return value
    start = ml_collections.ConfigDict(config.ppo.reward_model.to_dict())
    for key in ("dtype", "param_dtype", "remat", "scan_layers"):
        start[key] = value[key]  # the trained copy keeps its own compute settings
    return start


def reference_model_config(config: ml_collections.ConfigDict, options: RLOptions) -> ml_collections.ConfigDict:
    """The reference's ``model`` config: the policy's, with ``ppo.reference_init_from`` if set."""
    return loading.frozen_config(config.model, options.reference_init_from)


def value_export_dir(policy_dir: str) -> str:
    """Where the value model is exported beside the policy (a sibling, so the policy dir stays a clean model)."""
    return policy_dir.rstrip("/") + "_value"


# ------------------------------------------------------------------------------------- checks


def rows_per_update(config: ml_collections.ConfigDict, options: RLOptions) -> int:
    """Rows one optimizer step sees: a minibatch of the rollout."""
    return config.data.global_batch_size * options.samples_per_prompt // options.num_minibatches


def check_run(config: ml_collections.ConfigDict, options: RLOptions) -> None:
    """The checks that need more than the ``ppo`` section: the rollout's split, lengths and vocabularies."""
    optim.check_config(config.ppo.value_optim, section="ppo.value_optim")
    rows = config.data.global_batch_size * options.samples_per_prompt
    if rows % options.num_minibatches:
        raise OptionError(
            "ppo.num_minibatches",
            f"the rollout's {rows} rows (data.global_batch_size x samples_per_prompt) do not split into "
            f"{options.num_minibatches} minibatches",
        )
    policy = loading.resolve_architecture(config.model)
    total = config.data.max_prompt_len + options.sampling.max_new_tokens
    for key, model_cfg in (
        ("model", None),
        ("ppo.reward_model", config.ppo.reward_model),
        ("ppo.value_model", value_model_config(config)),
    ):
        architecture = policy if model_cfg is None else loading.resolve_architecture(model_cfg)
        if total > architecture.max_position_embeddings:
            raise OptionError(
                "ppo.sampling.max_new_tokens",
                f"data.max_prompt_len ({config.data.max_prompt_len}) + {options.sampling.max_new_tokens} new "
                f"tokens exceed {key}'s max_position_embeddings={architecture.max_position_embeddings}",
            )
        if model_cfg is not None and architecture.vocab_size < policy.vocab_size:
            raise OptionError(
                key,
                f"its vocabulary ({architecture.vocab_size}) is smaller than the policy's ({policy.vocab_size}); "
                "the reward and value models must share the policy's tokenizer",
            )


# ------------------------------------------------------------------------------------ trainer


@dataclasses.dataclass
class PPOTrainer:
    """Rollout, scoring and update for one PPO iteration as three jitted programs (module doc).

    ``rollout``, ``score`` and ``update`` are the jitted ``rl`` programs, public so that benchmarks
    can time each phase; ``train_step`` runs them in order.
    """

    options: RLOptions
    mesh: jax.sharding.Mesh
    models: forward.Models
    optimizers: Optimizers
    sampling: generation.SamplingConfig
    eval_sampling: generation.SamplingConfig
    initial_params: PyTree
    initial_value_params: PyTree
    frozen: dict  # {"reference": params, "reward": params}
    num_microbatches: int
    pad_token_id: int

    def __post_init__(self):
        o = self.options
        replicated = NamedSharding(self.mesh, P())
        self._replicated = replicated
        shardings_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
        rules = partitioning.LLAMA_RULES
        self.state_shardings = RLState(
            step=replicated,
            params=shardings_of(self.initial_params),
            opt_state=sharding.optimizer_state_shardings(self.optimizers.policy, self.initial_params, self.mesh, rules),
            value_params=shardings_of(self.initial_value_params),
            value_opt_state=sharding.optimizer_state_shardings(
                self.optimizers.value, self.initial_value_params, self.mesh, rules
            ),
            kl_coef=replicated,
        )
        self.rollout = jax.jit(
            functools.partial(rollout.rollout, policy=self.models.policy, samples_per_prompt=o.samples_per_prompt),
            static_argnames=("sampling",),
        )
        self.score = jax.jit(functools.partial(scoring.score, models=self.models, options=o))
        self.update = jax.jit(
            functools.partial(
                update,
                models=self.models,
                options=o,
                optimizers=self.optimizers,
                num_microbatches=self.num_microbatches,
            ),
            static_argnames=("train_policy",),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )
        self._eval = jax.jit(self._eval_impl, out_shardings=replicated)

    # ------------------------------------------------------------------------------------ state

    def init_state(self) -> RLState:
        rules = partitioning.LLAMA_RULES
        return RLState(
            step=jax.device_put(jnp.zeros((), jnp.int32), self._replicated),
            params=self.initial_params,
            opt_state=sharding.sharded_optimizer_init(
                self.optimizers.policy, self.initial_params, mesh=self.mesh, rules=rules
            ),
            value_params=self.initial_value_params,
            value_opt_state=sharding.sharded_optimizer_init(
                self.optimizers.value, self.initial_value_params, mesh=self.mesh, rules=rules
            ),
            kl_coef=jax.device_put(jnp.asarray(self.options.kl_coef, jnp.float32), self._replicated),
        )

    def abstract_state(self) -> RLState:
        params = sharding.abstract_tree(self.initial_params)
        value_params = sharding.abstract_tree(self.initial_value_params)
        scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
        state = RLState(
            step=scalar(jnp.int32),
            params=params,
            opt_state=jax.eval_shape(self.optimizers.policy.init, params),
            value_params=value_params,
            value_opt_state=jax.eval_shape(self.optimizers.value.init, value_params),
            kl_coef=scalar(jnp.float32),
        )
        return sharding.with_shardings(state, self.state_shardings)

    # ------------------------------------------------------------------------------- train step

    def train_step(self, state: RLState, batch: Mapping[str, jax.Array], rng: jax.Array, *, step: int) -> StepResult:
        """One iteration; ``step`` (iterations done before it, known on the host) picks the value warm-up."""
        train_policy = step + 1 > self.options.value_warmup_steps
        with jax.set_mesh(self.mesh):
            sampled = self.rollout(state.params, batch, jax.random.fold_in(rng, 0), sampling=self.sampling)
            scored = self.score(state.params, state.value_params, state.kl_coef, self.frozen, sampled)
            state, update_metrics = self.update(
                state,
                scored.experience,
                scored.metrics["kl_per_sequence"],
                jax.random.fold_in(rng, 1),
                train_policy=train_policy,
            )
        return StepResult(
            state=state,
            metrics={**scored.metrics, **update_metrics},
            skipped=update_metrics["skipped_updates"] > 0,
            num_tokens=jnp.sum(scored.experience.attention_mask, dtype=jnp.float32),
            samples=scored.samples,
        )

    # ------------------------------------------------------------------------------------- eval

    def _eval_impl(self, params, frozen, batch):
        sampled = rollout.rollout(
            params,
            batch,
            jax.random.key(0),
            policy=self.models.policy,
            sampling=self.eval_sampling,
            samples_per_prompt=self.options.samples_per_prompt,
        )
        seqs = join_prompt_and_response(
            sampled.prompt_ids, sampled.prompt_mask, sampled.response_ids, sampled.response_mask
        )
        mask = sampled.response_mask.astype(jnp.float32)
        judged = scoring.frozen_judgement(
            frozen, seqs, sampled.response_ids, models=self.models, chunk_size=self.options.logprob_chunk_size
        )
        kl = ops.kl_estimate(sampled.sampler_logprobs, judged.reference_logprobs, "k1") * mask
        rows = sampled.row_mask
        count = jnp.sum(rows)
        total = lambda x: (jnp.sum(x * rows), count)
        return {
            "score": total(judged.score),
            "score_sq": total(judged.score**2),
            "kl_per_sequence": total(jnp.sum(kl, axis=-1)),
            "response_length": total(jnp.sum(mask, axis=-1)),
            "eos_rate": total(sampled.finished.astype(jnp.float32)),
        }

    def eval_step(self, state: RLState, batch) -> MetricPairs:
        with jax.set_mesh(self.mesh):
            return self._eval(state.params, self.frozen, batch)

    def finalize_metrics(self, means: dict[str, float]) -> dict[str, float]:
        out = {k: v for k, v in means.items() if not k.endswith("_sq")}
        if "score_sq" in means:
            out["score_std"] = base.std_from_moments(means, "score")
        return out

    # ----------------------------------------------------------------------------------- export

    def export(self, state: RLState, directory: str) -> list[str]:
        """The policy to ``directory`` and the value model to ``<directory>_value`` (HF format)."""
        value_dir = value_export_dir(directory)
        pad = self.pad_token_id
        huggingface.save_hf(directory, self.models.policy, state.params, kind="causal_lm", pad_token_id=pad)
        huggingface.save_hf(value_dir, self.models.value, state.value_params, kind="value", pad_token_id=pad)
        return [directory, value_dir]


def make_trainer(
    config: ml_collections.ConfigDict,
    options: RLOptions,
    mesh: jax.sharding.Mesh,
    total_steps: int,
    *,
    inputs: RunInputs,
    resuming: bool = False,
) -> PPOTrainer:
    """Loads the four models named by the config and builds the PPO trainer.

    ``resuming``: the policy and value weights will come from the checkpoint, so only their shapes are
    built; the frozen reference and reward model are always read.
    """
    rng = jax.random.key(config.seed)
    policy_config, _, params = loading.load_model(config.model, "causal_lm", mesh=mesh, rng=rng, abstract=resuming)
    reference_cfg = reference_model_config(config, options)
    _, _, reference = loading.load_model(reference_cfg, "causal_lm", mesh=mesh, rng=rng)
    # The reward model and (by default) the value model start from the same weights: the value head
    # begins as the reward head, Tulu 2.5's and InstructGPT's choice.
    reward_rng = jax.random.fold_in(rng, 1)
    reward_config, _, reward = loading.load_model(
        loading.frozen_config(config.ppo.reward_model), "reward", mesh=mesh, rng=reward_rng
    )
    value_cfg = value_model_config(config)
    value_config, _, value = loading.load_model(value_cfg, "value", mesh=mesh, rng=reward_rng, abstract=resuming)
    logger.info(
        "PPO models: policy %s, reference %s, reward %s, value %s%s",
        config.model.init_from or f"random {config.model.preset}",
        reference_cfg.init_from or "the policy's random init",
        config.ppo.reward_model.init_from or f"random {config.ppo.reward_model.preset}",
        value_cfg.init_from or "the reward model's random init",
        " (policy and value restored from the checkpoint)" if resuming else "",
    )
    updates = options.updates_per_step
    policy_updates = max(total_steps - options.value_warmup_steps, 1) * updates
    value_updates = total_steps * updates
    optimizers = Optimizers(
        policy=optim.make_optimizer(config.optim, policy_updates),
        value=optim.make_optimizer(config.ppo.value_optim, value_updates),
        policy_schedule=optim.make_schedule(config.optim, policy_updates),
        value_schedule=optim.make_schedule(config.ppo.value_optim, value_updates),
    )
    pad_id = inputs.tokenizer.pad_id
    sampling = dataclasses.replace(
        options.sampling,
        stop_token_ids=tuple(
            dict.fromkeys(options.sampling.stop_token_ids + chat.stop_token_ids(inputs.chat_format, inputs.tokenizer))
        ),
        pad_token_id=pad_id,
    )
    return PPOTrainer(
        options=options,
        mesh=mesh,
        models=forward.Models(policy=policy_config, value=value_config, reward=reward_config),
        optimizers=optimizers,
        sampling=sampling,
        eval_sampling=dataclasses.replace(sampling, greedy=True) if options.eval_greedy else sampling,
        initial_params=params,
        initial_value_params=value,
        frozen={"reference": reference, "reward": reward},
        num_microbatches=config.train.grad_accum_steps,
        pad_token_id=pad_id,
    )


ALGORITHM = Algorithm(
    name="ppo",
    data_kind="prompt",
    model_kind="causal_lm",
    options_type=RLOptions,
    make_trainer=make_trainer,
    sections={
        "reward_model": loading.default_config,  # frozen scorer of (prompt, response)
        "value_model": loading.default_config,  # trained critic; init_from "": reward_model's weights
        "value_optim": optim.default_config,  # the critic's optimizer (the policy uses config.optim)
    },
    check_run=check_run,
    rows_per_update=rows_per_update,
    progress_bar_metrics=("score", "kl_per_sequence"),
)
