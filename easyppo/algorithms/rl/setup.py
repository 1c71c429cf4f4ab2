"""Building an RL trainer from a run config: the checks that need the whole config, the models the
options call for (and no others), the optimizers, the sampler and the reward sources.

Shared by every RL algorithm (``easyppo.algorithms.ppo``, ``easyppo.algorithms.grpo``); the
algorithm's config section (``config.ppo`` / ``config.grpo``) holds its options and model sections.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple

import jax
import ml_collections

from easyppo.algorithms import base
from easyppo.algorithms.contract import RunInputs
from easyppo.algorithms.rl import forward
from easyppo.algorithms.rl.options import RLOptions
from easyppo.algorithms.rl.trainer import RLTrainer
from easyppo.algorithms.rl.update import FrozenBases, Optimizers
from easyppo.core import optim, sharding
from easyppo.core.options import OptionError
from easyppo.data import chat
from easyppo.models import generation
from easyppo.rewards.sources import RewardSources
from easyppo.weights import loading

logger = logging.getLogger(__name__)

PyTree = Any


def value_model_config(section: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The critic's ``model`` config: ``value_model``, or the reward model's if unset (PPO only)."""
    value = section.value_model
    if value.init_from:
        return value
    start = ml_collections.ConfigDict(section.reward_model.to_dict())
    for key in ("dtype", "param_dtype", "remat", "scan_layers", "lora"):
        start[key] = value[key]  # the trained copy keeps its own compute settings (and adapters)
    return start


def reward_sources(options: RLOptions, name: str) -> RewardSources:
    """The run's reward sources; a bad name, function or pattern fails naming ``<name>.rewards``."""
    return RewardSources.from_spec(
        options.rewards,
        format_pattern=options.reward_format_pattern,
        numeric_tolerance=options.reward_numeric_tolerance,
        key=f"{name}.rewards",
    )


def rows_per_update(config: ml_collections.ConfigDict, options: RLOptions) -> int:
    """Rows one optimizer step sees: a minibatch of the rollout."""
    return config.data.global_batch_size * options.samples_per_prompt // options.num_minibatches


def check_run(config: ml_collections.ConfigDict, options: RLOptions, *, name: str) -> None:
    """The checks that need more than the options: the rollout's split, lengths, vocabularies, rewards."""
    section = config[name]
    if options.uses_critic:
        optim.check_config(section.value_optim, section=f"{name}.value_optim")
    rows = config.data.global_batch_size * options.samples_per_prompt
    if rows % options.num_minibatches:
        raise OptionError(
            f"{name}.num_minibatches",
            f"the rollout's {rows} rows (data.global_batch_size x samples_per_prompt) do not split into "
            f"{options.num_minibatches} minibatches",
        )
    chunk = getattr(options, "rollout_batch_size", 0)  # online DPO samples its batch at once
    for key, prompts in (
        ("data.global_batch_size", config.data.global_batch_size),
        ("eval.batch_size", config.eval.batch_size),
    ):
        if chunk and prompts and prompts % chunk:
            raise OptionError(
                f"{name}.rollout_batch_size", f"{chunk} prompts at once do not split {key}={prompts} into equal chunks"
            )
    if not options.rewards.strip():
        raise OptionError(f"{name}.rewards", "is empty: name at least one reward source, e.g. 'math_verify'")
    reward_sources(options, name)  # imports user functions now, before anything loads
    policy = loading.resolve_architecture(config.model)
    total = config.data.max_prompt_len + options.sampling.max_new_tokens
    models = [("model", None)]
    if options.uses_reward_model:
        models.append((f"{name}.reward_model", section.reward_model))
    if options.uses_critic:
        models.append((f"{name}.value_model", value_model_config(section)))
    for key, model_cfg in models:
        architecture = policy if model_cfg is None else loading.resolve_architecture(model_cfg)
        if total > architecture.max_position_embeddings:
            raise OptionError(
                f"{name}.sampling.max_new_tokens",
                f"data.max_prompt_len ({config.data.max_prompt_len}) + {options.sampling.max_new_tokens} new "
                f"tokens exceed {key}'s max_position_embeddings={architecture.max_position_embeddings}",
            )
        if model_cfg is not None and architecture.vocab_size < policy.vocab_size:
            raise OptionError(
                key,
                f"its vocabulary ({architecture.vocab_size}) is smaller than the policy's ({policy.vocab_size}); "
                "the reward and value models must share the policy's tokenizer",
            )


def _check_answers(sources: RewardSources, data, key: str, name: str) -> None:
    """Answer-checking rewards need every prompt row to carry its ``answer``: refuse before compiling."""
    if data is None or not sources.needs_answers:
        return
    answers = data.batcher.answers(range(len(data.batcher)))
    missing = [i for i, answer in enumerate(answers) if answer is None]
    if missing:
        raise OptionError(
            f"{name}.rewards",
            f"{len(missing)} of {len(answers)} prompt rows of {key} have no 'answer' field, which "
            f"{', '.join(n for n in sources.names if n != 'format')} compares responses with",
        )


class LoadedModels(NamedTuple):
    models: forward.Models
    params: PyTree  # the policy's trained parameters (abstract when resuming without LoRA)
    value_params: PyTree | None  # the critic's; None without one
    frozen: dict  # {"reference": params | None, "reward": params | None}
    bases: FrozenBases = FrozenBases()  # LoRA's frozen bases of the policy and critic


def load_models(
    config: ml_collections.ConfigDict,
    options,
    mesh: jax.sharding.Mesh,
    *,
    resuming: bool,
    name: str,
    abstract: bool = False,
) -> LoadedModels:
    """The models the options call for, and no others (module doc).

    ``resuming``: the policy and critic weights will come from the checkpoint, so only their shapes
    are built (a LoRA model's frozen base is still read); the frozen reference and reward model are
    always read, except with ``abstract`` (planning), where no model reads any weights. A LoRA
    policy's reference is its base: no second model is loaded.
    """
    section = config[name]
    rng = jax.random.key(config.seed)
    policy_config, _, params, policy_base = base.load_trained_model(
        config, "causal_lm", mesh, resuming=resuming, abstract=abstract
    )
    resuming = resuming or abstract
    frozen, described = {"reference": None, "reward": None}, []
    if options.uses_reference and policy_base is not None and not options.reference_init_from:
        frozen["reference"] = policy_base  # the same weights with the adapters off: nothing more loaded
        described.append("reference = the policy's base (LoRA adapters off)")
    elif options.uses_reference:
        reference_cfg = loading.frozen_config(config.model, options.reference_init_from)
        _, _, frozen["reference"] = loading.load_model(
            reference_cfg, "causal_lm", mesh=mesh, rng=rng, abstract=abstract
        )
        described.append(f"reference {reference_cfg.init_from or 'the policy random init'}")
    # The reward model and (by default) PPO's critic start from the same weights: the value head
    # begins as the reward head, Tulu 2.5's and InstructGPT's choice.
    reward_rng = jax.random.fold_in(rng, 1)
    reward_config = value_config = value = value_base = None
    if options.uses_reward_model:
        reward_config, _, frozen["reward"] = loading.load_model(
            loading.frozen_config(section.reward_model), "reward", mesh=mesh, rng=reward_rng, abstract=abstract
        )
        described.append(f"reward model {section.reward_model.init_from or 'random ' + section.reward_model.preset}")
    if options.uses_critic:
        value_cfg = value_model_config(section)
        value_config, _, value, value_base = loading.load_trained(
            value_cfg, "value", mesh=mesh, rng=reward_rng, resuming=resuming, abstract=abstract
        )
        described.append(f"critic {value_cfg.init_from or 'the reward model random init'}")
    logger.info(
        "%s models: policy %s%s; reward sources %s%s",
        name,
        config.model.init_from or f"random {config.model.preset}",
        "".join(", " + d for d in described),
        options.rewards,
        " (trained weights restored from the checkpoint)" if resuming else "",
    )
    models = forward.Models(policy=policy_config, value=value_config, reward=reward_config)
    return LoadedModels(
        models=models,
        params=params,
        value_params=value,
        frozen=frozen,
        bases=FrozenBases(policy=policy_base, value=value_base),
    )


def run_sampling(options, inputs: RunInputs) -> generation.SamplingConfig:
    """The options' sampler, stopping also at the chat format's end-of-turn ids, padding with the run's pad id."""
    if inputs.chat_format is None:  # planning: stop ids change no shape
        return dataclasses.replace(options.sampling, pad_token_id=inputs.tokenizer.pad_id)
    return dataclasses.replace(
        options.sampling,
        stop_token_ids=tuple(
            dict.fromkeys(options.sampling.stop_token_ids + chat.stop_token_ids(inputs.chat_format, inputs.tokenizer))
        ),
        pad_token_id=inputs.tokenizer.pad_id,
    )


def check_answers(sources: RewardSources, inputs: RunInputs, name: str) -> None:
    """Answer-checking rewards need every prompt row to carry its ``answer``: refuse before compiling."""
    for key, data in (("data", inputs.train_data), ("eval", inputs.eval_data)):
        _check_answers(sources, data, key, name)


def make_trainer(
    config: ml_collections.ConfigDict,
    options: RLOptions,
    mesh: jax.sharding.Mesh,
    total_steps: int,
    *,
    inputs: RunInputs,
    resuming: bool = False,
    name: str,
) -> RLTrainer:
    """Loads the models the options need and builds the trainer."""
    section = config[name]
    ways = sharding.batch_parallelism(mesh)
    if options.rollout_batch_size % ways:  # before any model loads: each chunk spreads over the batch axes
        raise OptionError(
            f"{name}.rollout_batch_size",
            f"{options.rollout_batch_size} is not divisible by mesh.data * mesh.fsdp = {ways}",
        )
    sources = reward_sources(options, name)
    check_answers(sources, inputs, name)
    loaded = load_models(config, options, mesh, resuming=resuming, name=name, abstract=inputs.abstract)
    updates = options.updates_per_step
    policy_updates = max(total_steps - options.value_warmup_steps, 1) * updates
    value_updates = total_steps * updates
    critic = options.uses_critic
    optimizers = Optimizers(
        policy=optim.make_optimizer(config.optim, policy_updates),
        value=optim.make_optimizer(section.value_optim, value_updates) if critic else None,
        policy_schedule=optim.make_schedule(config.optim, policy_updates),
        value_schedule=optim.make_schedule(section.value_optim, value_updates) if critic else None,
    )
    sampling = run_sampling(options, inputs)
    return RLTrainer(
        options=options,
        mesh=mesh,
        models=loaded.models,
        optimizers=optimizers,
        sampling=sampling,
        eval_sampling=dataclasses.replace(sampling, greedy=True) if options.eval_greedy else sampling,
        initial_params=loaded.params,
        initial_value_params=loaded.value_params,
        frozen=loaded.frozen,
        bases=loaded.bases,
        exports=(
            base.ExportSettings.of(config.model),
            base.ExportSettings.of(value_model_config(section)) if critic else base.ExportSettings(),
        ),
        num_microbatches=config.train.grad_accum_steps,
        pad_token_id=inputs.tokenizer.pad_id,
        tokenizer=inputs.tokenizer,
        sources=sources,
        train_batcher=inputs.train_data.batcher if inputs.train_data is not None else None,
        eval_batcher=inputs.eval_data.batcher if inputs.eval_data is not None else None,
        seed=config.seed,
    )
