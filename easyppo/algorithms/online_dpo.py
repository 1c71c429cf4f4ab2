"""Online DPO: sample responses from the current policy, rank them, and take a DPO step on the pairs
(``algorithm="online_dpo"``, options in ``config.online_dpo``).

Each iteration:

1. **rollout** (``rl.rollout``): ``samples_per_prompt`` >= 2 responses per prompt from the policy;
2. **judge**: every response is scored by the reward sources (``easyppo.rewards``: the reward model
   on the device, verifiable functions on the host, in a weighted sum), after the missing-EOS
   penalty; each prompt's best response becomes *chosen* and its worst *rejected*. A prompt whose
   responses all score the same gives no pair: it is skipped and counted (``tie_fraction``);
3. **update**: one optimizer step of the DPO family's loss (``easyppo.algorithms.dpo_losses``, the
   same ``loss``, ``beta``, ... as offline DPO) on the pairs, against the frozen reference (the
   policy's initial weights or ``reference_init_from``; none for SimPO), with gradient accumulation.

This is the seed's online DPO recipe (Guo et al. 2024, "Direct language model alignment from online
AI feedback", arXiv:2402.04792, with a reward model as the judge) built from the RL programs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from easyppo.algorithms import base
from easyppo.algorithms.contract import Algorithm, MetricPairs, RunInputs, StepResult
from easyppo.algorithms.dpo_losses import LossSettings
from easyppo.algorithms.online_dpo_pairs import loss_fn, pair_batch, pair_logprobs, pick_pairs
from easyppo.algorithms.rl import forward, losses, rollout, scoring, setup
from easyppo.algorithms.rl.host_rewards import HostRows, held_out_pairs, host_scores
from easyppo.algorithms.rl.options import MISSING_EOS_MODES, ROLLOUT_DTYPES
from easyppo.algorithms.rl.trainer import finalize_score_metrics
from easyppo.core import grad_accum, optim, sharding
from easyppo.core.options import option, require, require_finite
from easyppo.models import generation, lora, partitioning
from easyppo.rewards.sources import REWARD_MODEL, RewardSources, parse_reward_spec
from easyppo.weights import loading

PyTree = Any


@dataclasses.dataclass(frozen=True)
class OnlineDPOOptions(LossSettings):
    """The DPO loss (``LossSettings``) plus how pairs are sampled and judged."""

    samples_per_prompt: int = option(2, "responses sampled per prompt; the best and the worst make the pair")
    sampling: generation.SamplingConfig = option(
        generation.SamplingConfig(temperature=0.7, max_new_tokens=128), "temperature, top-p/k, max_new_tokens, stop ids"
    )
    rollout_dtype: str = option("", f"compute dtype of the sampler, one of {ROLLOUT_DTYPES}; '': the policy's")
    reference_init_from: str = option("", "frozen reference weights; '': the policy's own model.init_from")
    rewards: str = option(REWARD_MODEL, "reward sources 'name[=weight],...' that rank the samples (easyppo.rewards)")
    reward_format_pattern: str = option("", "regular expression the 'format' reward searches a response for")
    reward_numeric_tolerance: float = option(1e-6, "relative tolerance of the 'numeric' reward")
    missing_eos_penalty: float | None = option(None, "score of a response without a stop token; None: no penalty")
    missing_eos_mode: str = option("replace", f"one of {MISSING_EOS_MODES}: score := penalty, or score += penalty")
    eval_greedy: bool = option(True, "greedy held-out responses (deterministic); False: the training sampler")
    logprob_chunk_size: int = option(256, "sequence positions per chunk of the vocabulary projection")

    def __post_init__(self):
        super().__post_init__()
        require(
            self.samples_per_prompt >= 2,
            "samples_per_prompt",
            f"a pair needs >= 2 samples, got {self.samples_per_prompt}",
        )
        require(
            self.rollout_dtype in ROLLOUT_DTYPES,
            "rollout_dtype",
            f"{self.rollout_dtype!r} is not one of {ROLLOUT_DTYPES}",
        )
        require(
            self.missing_eos_mode in MISSING_EOS_MODES,
            "missing_eos_mode",
            f"{self.missing_eos_mode!r} is not one of {MISSING_EOS_MODES}",
        )
        require(self.logprob_chunk_size >= 1, "logprob_chunk_size", f"must be >= 1, got {self.logprob_chunk_size}")
        require_finite(self.reward_numeric_tolerance, "reward_numeric_tolerance")
        if self.missing_eos_penalty is not None:
            require_finite(self.missing_eos_penalty, "missing_eos_penalty")
        parse_reward_spec(self.rewards, key="rewards")

    # What the shared RL set-up asks of any options (easyppo.algorithms.rl.setup).
    uses_critic = False
    num_minibatches = 1
    updates_per_step = 1

    @property
    def uses_reward_model(self) -> bool:
        return REWARD_MODEL in parse_reward_spec(self.rewards)


@flax.struct.dataclass
class OnlineDPOState:
    step: jax.Array
    params: PyTree
    opt_state: PyTree


@dataclasses.dataclass
class OnlineDPOTrainer:
    """Rollout, judgement and a DPO step for one online-DPO iteration (module doc)."""

    options: OnlineDPOOptions
    mesh: jax.sharding.Mesh
    models: forward.Models
    optimizer: Any
    schedule: Any
    sampling: generation.SamplingConfig
    eval_sampling: generation.SamplingConfig
    initial_params: PyTree
    frozen: dict  # {"reference": params | None, "reward": params | None}
    num_microbatches: int
    pad_token_id: int
    tokenizer: Any
    sources: RewardSources
    train_batcher: Any
    eval_batcher: Any = None
    base_params: PyTree = None  # LoRA: the frozen base the state's adapters complete (None: no LoRA)
    exports: base.ExportSettings = base.ExportSettings()

    def __post_init__(self):
        o = self.options
        self._replicated = NamedSharding(self.mesh, P())
        rules = partitioning.LLAMA_RULES
        self.state_shardings = OnlineDPOState(
            step=self._replicated,
            params=jax.tree.map(lambda x: x.sharding, self.initial_params),
            opt_state=sharding.optimizer_state_shardings(self.optimizer, self.initial_params, self.mesh, rules),
        )
        self.rollout = jax.jit(
            functools.partial(rollout.rollout, policy=self.models.policy, rollout_dtype=o.rollout_dtype),
            static_argnames=("sampling", "samples_per_prompt"),
        )
        self.reward_model_scores = jax.jit(self._reward_model_scores_impl)
        self.pairs = jax.jit(self._pairs_impl)
        self.update = jax.jit(
            self._update_impl, out_shardings=(self.state_shardings, self._replicated), donate_argnums=(0,)
        )
        self._eval_samples = 1 if self.eval_sampling.greedy else o.samples_per_prompt

    def init_state(self) -> OnlineDPOState:
        return OnlineDPOState(
            step=jax.device_put(jnp.zeros((), jnp.int32), self._replicated),
            params=self.initial_params,
            opt_state=sharding.sharded_optimizer_init(
                self.optimizer, self.initial_params, mesh=self.mesh, rules=partitioning.LLAMA_RULES
            ),
        )

    def abstract_state(self) -> OnlineDPOState:
        params = sharding.abstract_tree(self.initial_params)
        state = OnlineDPOState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=params,
            opt_state=jax.eval_shape(self.optimizer.init, params),
        )
        return sharding.with_shardings(state, self.state_shardings)

    # -------------------------------------------------------------------------------- programs

    def _reward_model_scores_impl(self, reward_params, sampled):
        return forward.sequence_scores(self.models.reward, reward_params, scoring.sequences_of(sampled))

    def _pairs_impl(self, frozen, sampled, chosen, rejected, pair_mask):
        pairs = pair_batch(sampled, chosen, rejected, pair_mask)
        if self.options.uses_reference:
            pairs["reference_logps"] = pair_logprobs(
                self.models.policy,
                frozen["reference"],
                pairs,
                chunk_size=self.options.logprob_chunk_size,
                average=self.options.averages_logprobs,
            )
        return jax.tree.map(lambda x: sharding.constrain(x, P(sharding.BATCH_AXES)), pairs)

    def policy_params(self, state: OnlineDPOState) -> PyTree:
        """The policy's whole parameter tree: with LoRA, the state's adapters on the frozen base."""
        return lora.merge(state.params, self.base_params)

    def _update_impl(self, state: OnlineDPOState, pairs: dict, rng: jax.Array, base_params: PyTree):
        policy, o = self.models.policy, self.options
        loss = lambda params, batch, key: loss_fn(lora.merge(params, base_params), batch, key, policy=policy, options=o)
        step = grad_accum.gradient_update(
            loss, self.optimizer, state.params, state.opt_state, pairs, rng, self.num_microbatches
        )
        metrics = {k: v for k, v in step.metrics.items() if k != "loss"}
        metrics.update(
            dpo_loss=step.metrics["loss"],
            grad_norm=step.grad_norm,
            learning_rate=self.schedule(state.step),
            skipped_updates=(~step.finite).astype(jnp.float32),
        )
        return OnlineDPOState(step=state.step + 1, params=step.params, opt_state=step.opt_state), metrics

    # ---------------------------------------------------------------------------- the iteration

    def _judge(self, sampled, example_index, batcher, samples_per_prompt: int):
        """Every response's score on the host (reward sources, then the missing-EOS penalty)."""
        rows = HostRows(sampled, example_index, samples_per_prompt)
        host, means = host_scores(self.sources, rows, tokenizer=self.tokenizer, answers_of=batcher.answers)
        raw = host
        if self.frozen.get("reward") is not None:
            rm = self.reward_model_scores(self.frozen["reward"], sampled)
            raw = raw + np.float32(self.sources.reward_model_weight) * np.asarray(
                multihost_utils.process_allgather(rm, tiled=True)
            )
        finished = rows.arrays["finished"].astype(bool)
        o = self.options
        penalised = np.asarray(
            losses.apply_missing_eos_penalty(raw, finished, o.missing_eos_penalty, o.missing_eos_mode)
        )
        return rows, raw, penalised, means

    def train_step(self, state, batch: Mapping[str, jax.Array], rng: jax.Array, *, step: int) -> StepResult:
        del step
        group = self.options.samples_per_prompt
        with jax.set_mesh(self.mesh):
            sampled = self.rollout(
                self.policy_params(state),
                batch,
                jax.random.fold_in(rng, 0),
                sampling=self.sampling,
                samples_per_prompt=group,
            )
            rows, raw, score, means = self._judge(sampled, batch["example_index"], self.train_batcher, group)
            chosen, rejected, pair_mask = pick_pairs(score, rows.real, group)
            placed = sharding.global_rows((chosen, rejected, pair_mask), self.mesh)
            pairs = self.pairs(self.frozen, sampled, *placed)
            state, metrics = self.update(state, pairs, jax.random.fold_in(rng, 1), self.base_params)
        real_groups = rows.real.reshape(-1, group)[:, 0]
        kept = pair_mask > 0
        host_metrics = {
            **means,
            "score": float(raw[rows.real].mean()) if rows.real.any() else 0.0,
            "tie_fraction": float(1.0 - kept.sum() / max(real_groups.sum(), 1)),
            "score_chosen": float(score[chosen[kept]].mean()) if kept.any() else 0.0,
            "score_rejected": float(score[rejected[kept]].mean()) if kept.any() else 0.0,
            "response_length": float(rows.arrays["response_mask"][rows.real].sum(-1).mean())
            if rows.real.any()
            else 0.0,
        }
        return StepResult(
            state=state,
            metrics={**metrics, **host_metrics},
            skipped=metrics["skipped_updates"] > 0,
            num_tokens=jnp.sum(pairs["attention_mask"], dtype=jnp.float32),
            samples=None,
        )

    def eval_step(self, state, batch) -> MetricPairs:
        """Held-out responses scored by the reward sources: sums and counts."""
        with jax.set_mesh(self.mesh):
            sampled = self.rollout(
                self.policy_params(state),
                batch,
                jax.random.key(0),
                sampling=self.eval_sampling,
                samples_per_prompt=self._eval_samples,
            )
            rows, raw, _, means = self._judge(
                sampled, batch["example_index"], self.eval_batcher or self.train_batcher, self._eval_samples
            )
        return held_out_pairs(rows, raw, means)

    def finalize_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return finalize_score_metrics(means)

    def export(self, state, directory: str) -> list[str]:
        return base.export_model(
            directory,
            self.models.policy,
            self.policy_params(state),
            "causal_lm",
            pad_token_id=self.pad_token_id,
            settings=self.exports,
        )


def make_trainer(
    config: ml_collections.ConfigDict,
    options: OnlineDPOOptions,
    mesh: jax.sharding.Mesh,
    total_steps: int,
    *,
    inputs: RunInputs,
    resuming: bool = False,
) -> OnlineDPOTrainer:
    sources = setup.reward_sources(options, "online_dpo")
    setup.check_answers(sources, inputs, "online_dpo")
    loaded = setup.load_models(config, options, mesh, resuming=resuming, name="online_dpo", abstract=inputs.abstract)
    sampling = setup.run_sampling(options, inputs)
    return OnlineDPOTrainer(
        options=options,
        mesh=mesh,
        models=loaded.models,
        optimizer=optim.make_optimizer(config.optim, total_steps),
        schedule=optim.make_schedule(config.optim, total_steps),
        sampling=sampling,
        eval_sampling=dataclasses.replace(sampling, greedy=True) if options.eval_greedy else sampling,
        initial_params=loaded.params,
        frozen=loaded.frozen,
        num_microbatches=config.train.grad_accum_steps,
        pad_token_id=inputs.tokenizer.pad_id,
        tokenizer=inputs.tokenizer,
        sources=sources,
        train_batcher=inputs.train_data.batcher if inputs.train_data is not None else None,
        eval_batcher=inputs.eval_data.batcher if inputs.eval_data is not None else None,
        base_params=loaded.bases.policy,
        exports=base.ExportSettings.of(config.model),
    )


def rows_per_update(config: ml_collections.ConfigDict, options: OnlineDPOOptions) -> int:
    """Pairs one optimizer step sees: one per prompt of the batch."""
    return config.data.global_batch_size


ALGORITHM = Algorithm(
    name="online_dpo",
    data_kind="prompt",
    model_kind="causal_lm",
    options_type=OnlineDPOOptions,
    make_trainer=make_trainer,
    sections={"reward_model": loading.default_config},  # the judge, when 'reward_model' is a reward source
    check_run=functools.partial(setup.check_run, name="online_dpo"),
    rows_per_update=rows_per_update,
    progress_bar_metrics=("score", "tie_fraction"),
)
