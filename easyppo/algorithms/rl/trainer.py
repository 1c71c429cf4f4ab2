"""One RL iteration from the programs of ``easyppo.algorithms.rl``, for PPO and the group family alike.

    rollout -> [dynamic sampling] -> judge (device) | host rewards (host, meanwhile) -> assemble -> update

The trainer jits each program with explicit shardings and runs them in order; what differs between
PPO and GRPO is only in the options (the estimator, whether a critic exists, which reward sources,
which KL terms), never in a second trainer. Models a run does not need are not loaded: no critic for
the group estimators, no reference when both KL coefficients are 0, no reward model when it is not a
reward source.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from easyppo.algorithms import base
from easyppo.algorithms.contract import MetricPairs, StepResult
from easyppo.algorithms.rl import dynamic_sampling, forward, rollout, scoring
from easyppo.algorithms.rl.host_rewards import HostRows, held_out_pairs, host_scores
from easyppo.algorithms.rl.options import RLOptions
from easyppo.algorithms.rl.update import FrozenBases, Optimizers, RLState, update
from easyppo.core import ops, sharding
from easyppo.models import generation, lora, partitioning
from easyppo.rewards.sources import RewardSources

PyTree = Any


def finalize_score_metrics(means: dict[str, float]) -> dict[str, float]:
    """Held-out means with the score's second moment turned into its standard deviation."""
    out = {k: v for k, v in means.items() if not k.endswith("_sq")}
    if "score_sq" in means:
        out["score_std"] = base.std_from_moments(means, "score")
    return out


def value_export_dir(policy_dir: str) -> str:
    """Where the value model is exported beside the policy (a sibling, so the policy dir stays a clean model)."""
    return policy_dir.rstrip("/") + "_value"


@dataclasses.dataclass
class RLTrainer:
    """The jitted RL programs and the order they run in (module doc).

    ``rollout``, ``judge``, ``assemble`` and ``update`` are public so that benchmarks can time each
    phase; ``train_step`` runs them in order.
    """

    options: RLOptions
    mesh: jax.sharding.Mesh
    models: forward.Models
    optimizers: Optimizers
    sampling: generation.SamplingConfig
    eval_sampling: generation.SamplingConfig
    initial_params: PyTree
    initial_value_params: PyTree | None
    frozen: dict  # {"reference": params | None, "reward": params | None}
    num_microbatches: int
    pad_token_id: int
    tokenizer: Any
    sources: RewardSources
    train_batcher: Any  # easyppo.data.batcher.ExampleBatcher of the prompts (answers, refills)
    eval_batcher: Any = None
    seed: int = 0
    bases: FrozenBases = FrozenBases()  # LoRA: the frozen bases the state's adapters complete
    exports: tuple[base.ExportSettings, base.ExportSettings] = (base.ExportSettings(), base.ExportSettings())

    def __post_init__(self):
        o = self.options
        self._replicated = NamedSharding(self.mesh, P())
        shardings_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
        rules = partitioning.LLAMA_RULES
        critic = self.initial_value_params is not None
        self.state_shardings = RLState(
            step=self._replicated,
            params=shardings_of(self.initial_params),
            opt_state=sharding.optimizer_state_shardings(self.optimizers.policy, self.initial_params, self.mesh, rules),
            value_params=shardings_of(self.initial_value_params) if critic else None,
            value_opt_state=(
                sharding.optimizer_state_shardings(self.optimizers.value, self.initial_value_params, self.mesh, rules)
                if critic
                else None
            ),
            kl_coef=self._replicated,
        )
        self.rollout = jax.jit(
            functools.partial(
                rollout.rollout,
                policy=self.models.policy,
                rollout_dtype=o.rollout_dtype,
                tempered_logprobs=o.logprob_temperature == "sampling",
            ),
            static_argnames=("sampling", "samples_per_prompt"),
        )
        self.judge = jax.jit(
            functools.partial(scoring.judge, models=self.models, options=o), static_argnames=("recompute_policy",)
        )
        self._last_mismatch: dict[str, jax.Array] = {}  # old_logprobs='sampler': the latest measurement
        self.assemble = jax.jit(functools.partial(scoring.assemble, options=o))
        self.score = jax.jit(  # judge + assemble
            functools.partial(scoring.score, models=self.models, options=o), static_argnames=("recompute_policy",)
        )
        self.update = jax.jit(
            functools.partial(
                update,
                models=self.models,
                options=o,
                optimizers=self.optimizers,
                num_microbatches=self.num_microbatches,
            ),
            static_argnames=("train_policy",),
            out_shardings=(self.state_shardings, self._replicated),
            donate_argnums=(0,),
        )
        reward_model = self.models.reward
        self._reward_model_score = jax.jit(
            lambda params, sampled: forward.sequence_scores(reward_model, params, scoring.sequences_of(sampled))
        )
        rows = sharding.batch_sharding(self.mesh)
        self._row_chunks = jax.jit(rollout.row_chunks, static_argnames=("size",), out_shardings=rows)
        self._concat_rows = jax.jit(rollout.concat_rows, out_shardings=rows)
        self._eval_judge = jax.jit(self._eval_judge_impl)
        self._eval_samples = 1 if not o.uses_critic and self.eval_sampling.greedy else o.samples_per_prompt

    # ------------------------------------------------------------------------------------ state

    def policy_params(self, state: RLState) -> PyTree:
        """The policy's whole parameter tree: with LoRA, the state's adapters on the frozen base."""
        return lora.merge(state.params, self.bases.policy)

    def value_params(self, state: RLState) -> PyTree:
        """The critic's whole parameter tree (None without a critic)."""
        return None if state.value_params is None else lora.merge(state.value_params, self.bases.value)

    def init_state(self) -> RLState:
        rules = partitioning.LLAMA_RULES
        init = lambda optimizer, params: sharding.sharded_optimizer_init(optimizer, params, mesh=self.mesh, rules=rules)
        critic = self.initial_value_params is not None
        return RLState(
            step=jax.device_put(jnp.zeros((), jnp.int32), self._replicated),
            params=self.initial_params,
            opt_state=init(self.optimizers.policy, self.initial_params),
            value_params=self.initial_value_params,
            value_opt_state=init(self.optimizers.value, self.initial_value_params) if critic else None,
            kl_coef=jax.device_put(jnp.asarray(self.options.kl_coef, jnp.float32), self._replicated),
        )

    def abstract_state(self) -> RLState:
        params = sharding.abstract_tree(self.initial_params)
        critic = self.initial_value_params is not None
        value_params = sharding.abstract_tree(self.initial_value_params) if critic else None
        scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
        state = RLState(
            step=scalar(jnp.int32),
            params=params,
            opt_state=jax.eval_shape(self.optimizers.policy.init, params),
            value_params=value_params,
            value_opt_state=jax.eval_shape(self.optimizers.value.init, value_params) if critic else None,
            kl_coef=scalar(jnp.float32),
        )
        return sharding.with_shardings(state, self.state_shardings)

    # ------------------------------------------------------------------------- chunked phases

    def sample(self, params, prompts, rng, *, sampling, samples_per_prompt: int) -> rollout.Rollout:
        """``rollout`` of ``prompts``, ``rollout_batch_size`` prompts at a time when that is set.

        Chunks cap the KV cache and the sampler's activations at one chunk's; each chunk is spread
        over every device and sampled with its own key (``fold_in(rng, chunk)``), and the results
        are concatenated in prompt order. Without chunks the rollout is the single program it was.
        """
        size = self.options.rollout_batch_size
        run = functools.partial(self.rollout, params, sampling=sampling, samples_per_prompt=samples_per_prompt)
        if not size or size >= prompts["prompt_input_ids"].shape[0]:
            return run(prompts, rng)
        chunks = self._row_chunks(prompts, size=size)
        return self._concat_rows([run(chunk, jax.random.fold_in(rng, i)) for i, chunk in enumerate(chunks)])

    def judge_rollout(self, state: RLState, sampled: rollout.Rollout, *, recompute_policy: bool) -> scoring.Judgement:
        """``judge`` of ``sampled``, in the chunks ``sample`` used (their scoring passes' activations
        are one chunk's)."""
        run = functools.partial(
            self.judge,
            self.policy_params(state),
            self.value_params(state),
            self.frozen,
            recompute_policy=recompute_policy,
        )
        size = self.options.rollout_batch_size * self.options.samples_per_prompt
        if not size or size >= sampled.row_mask.shape[0]:
            return run(sampled)
        return self._concat_rows([run(chunk) for chunk in self._row_chunks(sampled, size=size)])

    # ------------------------------------------------------------------------------- train step

    def train_step(self, state: RLState, batch: Mapping[str, jax.Array], rng: jax.Array, *, step: int) -> StepResult:
        """One iteration; ``step`` (iterations done before it, known on the host) picks the value warm-up."""
        o = self.options
        train_policy = step + 1 > o.value_warmup_steps
        with jax.set_mesh(self.mesh):
            sampled = self.sample(
                self.policy_params(state),
                batch,
                jax.random.fold_in(rng, 0),
                sampling=self.sampling,
                samples_per_prompt=o.samples_per_prompt,
            )
            recompute = o.old_logprobs == "recompute" or (
                o.mismatch_check_every > 0 and step % o.mismatch_check_every == 0
            )
            if o.dynamic_sampling:
                sampled, rewards, host_metrics = self._dynamic_sampling(state, batch, sampled, rng, step)
                judged = self.judge_rollout(state, sampled, recompute_policy=recompute)
            else:
                # Dispatched first: the device scores the rollout while the host computes rewards.
                judged = self.judge_rollout(state, sampled, recompute_policy=recompute)
                rewards, host_metrics = self._host_rewards(sampled, batch["example_index"], self.train_batcher)
            scored = self.assemble(judged, sampled, sharding.global_rows(rewards, self.mesh), state.kl_coef)
            if o.old_logprobs == "sampler":  # every iteration reports the latest measured mismatch
                if recompute:
                    self._last_mismatch = {k: scored.metrics[k] for k in scoring.MISMATCH_METRICS}
                scored = scored._replace(metrics={**scored.metrics, **self._last_mismatch})
            state, update_metrics = self.update(
                state,
                scored.experience,
                scored.metrics.get("kl_per_sequence", jnp.zeros(())),
                jax.random.fold_in(rng, 1),
                train_policy=train_policy,
                bases=self.bases,
            )
        return StepResult(
            state=state,
            metrics={**scored.metrics, **host_metrics, **update_metrics},
            skipped=update_metrics["skipped_updates"] > 0,
            num_tokens=jnp.sum(scored.experience.attention_mask, dtype=jnp.float32),
            samples=scored.samples,
        )

    def _host_rewards(self, sampled: rollout.Rollout, example_index: jax.Array, batcher) -> tuple[np.ndarray, dict]:
        if not self.sources.host:  # nothing to decode: the reward model scores on the device
            return np.zeros(sampled.row_mask.shape[0], np.float32), {}
        rows = HostRows(sampled, example_index, self.options.samples_per_prompt)
        return host_scores(self.sources, rows, tokenizer=self.tokenizer, answers_of=batcher.answers)

    def _selection_rewards(self, sampled: rollout.Rollout, rewards: np.ndarray) -> np.ndarray:
        """What dynamic sampling compares within a group: every reward source, the reward model included."""
        if self.frozen.get("reward") is None:
            return rewards
        score = np.asarray(
            multihost_utils.process_allgather(self._reward_model_score(self.frozen["reward"], sampled), tiled=True)
        )
        return rewards + np.float32(self.sources.reward_model_weight) * score

    def _dynamic_sampling(self, state: RLState, batch, first: rollout.Rollout, rng: jax.Array, step: int):
        o = self.options
        group = o.samples_per_prompt
        num_groups = first.row_mask.shape[0] // group
        kept, dropped, filler, rounds = [], [], [], []
        host_metrics: dict[str, float] = {}
        sampled_groups = 0
        for round_index in range(o.max_sampling_rounds):
            if round_index == 0:
                sampled, example_index = first, batch["example_index"]
            else:
                prompts = self._refill_batch(step, round_index, first.row_mask.shape[0] // group)
                example_index = prompts["example_index"]
                sampled = self.sample(
                    self.policy_params(state),
                    prompts,
                    jax.random.fold_in(rng, 1 + round_index),
                    sampling=self.sampling,
                    samples_per_prompt=group,
                )
            rows = HostRows(sampled, example_index, group)
            rewards, means = host_scores(
                self.sources, rows, tokenizer=self.tokenizer, answers_of=self.train_batcher.answers
            )
            if round_index == 0:
                host_metrics.update(means)  # the policy's rewards on the data batch itself
            informative = dynamic_sampling.informative_groups(
                self._selection_rewards(sampled, rewards), rows.real, group
            )
            real = rows.real.reshape(-1, group)[:, 0]
            sampled_groups += int(real.sum())
            kept += [(round_index, g) for g in np.flatnonzero(informative)]
            dropped += [(round_index, g) for g in np.flatnonzero(real & ~informative)]
            filler += [(round_index, g) for g in np.flatnonzero(~real)]
            host_rollout = jax.tree.map(np.asarray, multihost_utils.process_allgather(sampled, tiled=True))
            rounds.append((host_rollout, rewards))
            if len(kept) >= num_groups:
                break
        chosen, short = dynamic_sampling.select_groups(kept, dropped + filler, num_groups)
        # The groups that only complete a short batch are masked out: they count nowhere.
        keep = np.repeat([0.0 if i >= num_groups - short else 1.0 for i in range(num_groups)], group).astype(np.float32)

        def gather(values_of):  # values_of(round) -> [rows, ...] -> the chosen groups' rows, in order
            return np.concatenate([values_of(r)[g * group : (g + 1) * group] for r, g in chosen])

        fields = {
            field.name: gather(lambda r, n=field.name: getattr(rounds[r][0], n))
            for field in dataclasses.fields(rollout.Rollout)
        }
        fields["row_mask"] = fields["row_mask"] * keep
        fields["response_mask"] = (fields["response_mask"] * keep[:, None]).astype(np.int32)
        rewards = gather(lambda r: rounds[r][1]) * keep
        host_metrics.update(
            {
                "sampling_rounds": float(len(rounds)),
                "samples_per_kept_group": float(sampled_groups * group) / max(len(kept[:num_groups]), 1),
                "dropped_group_fraction": len(dropped) / max(sampled_groups, 1),
                "dynamic_sampling_short": float(short),
            }
        )
        return rollout.Rollout(**sharding.global_rows(fields, self.mesh)), rewards, host_metrics

    def _refill_batch(self, step: int, round_index: int, batch_size: int) -> dict[str, jax.Array]:
        """This process's share of the extra prompts of ``round_index``, assembled into a global batch."""
        positions = dynamic_sampling.refill_positions(
            len(self.train_batcher), batch_size, seed=self.seed, step=step, round_index=round_index
        )
        per_process = batch_size // jax.process_count()
        local = positions[jax.process_index() * per_process : (jax.process_index() + 1) * per_process]
        host_batch = self.train_batcher(local, np.ones(len(local), np.int32))
        return sharding.host_local_to_global(host_batch, self.mesh)

    # ------------------------------------------------------------------------------------- eval

    def _eval_judge_impl(self, frozen, sampled):
        seqs = scoring.sequences_of(sampled)
        mask = sampled.response_mask.astype(jnp.float32)
        out = {}
        if frozen.get("reward") is not None:
            out["reward_model"] = forward.sequence_scores(self.models.reward, frozen["reward"], seqs)
        if frozen.get("reference") is not None:
            reference = forward.response_logprobs(
                self.models.policy,
                frozen["reference"],
                seqs,
                sampled.response_ids,
                chunk_size=self.options.logprob_chunk_size,
            )
            out["kl"] = jnp.sum(ops.kl_estimate(sampled.sampler_logprobs, reference, "k1") * mask, axis=-1)
        return out

    def eval_step(self, state: RLState, batch) -> MetricPairs:
        """Held-out responses (greedy by default) scored by every reward source: sums and counts."""
        with jax.set_mesh(self.mesh):
            sampled = self.sample(
                self.policy_params(state),
                batch,
                jax.random.key(0),
                sampling=self.eval_sampling,
                samples_per_prompt=self._eval_samples,
            )
            judged = self._eval_judge(self.frozen, sampled)
            rows = HostRows(sampled, batch["example_index"], self._eval_samples)
            rewards, means = host_scores(
                self.sources,
                rows,
                tokenizer=self.tokenizer,
                answers_of=(self.eval_batcher or self.train_batcher).answers,
            )
        host = jax.tree.map(np.asarray, multihost_utils.process_allgather(judged, tiled=True))
        score = rewards + np.float32(self.sources.reward_model_weight) * host.get("reward_model", 0.0)
        return held_out_pairs(rows, score, means, **({"kl_per_sequence": host["kl"]} if "kl" in host else {}))

    def finalize_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return finalize_score_metrics(means)

    # ----------------------------------------------------------------------------------- export

    def export(self, state: RLState, directory: str) -> list[str]:
        """The policy to ``directory`` (and a critic to ``<directory>_value``), in HF form (a LoRA
        model as its ``model.lora.export`` says: ``base.export_model``)."""
        pad, (policy, value) = self.pad_token_id, self.exports
        params = self.policy_params(state)
        written = base.export_model(
            directory, self.models.policy, params, "causal_lm", pad_token_id=pad, settings=policy
        )
        if state.value_params is None:
            return written
        params, directory = self.value_params(state), value_export_dir(directory)
        return written + base.export_model(
            directory, self.models.value, params, "value", pad_token_id=pad, settings=value
        )
