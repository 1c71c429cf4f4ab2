"""Plan a run: compile its programs for a target and, when it does not fit, find a variant that does.

``plan_run`` is what ``easyppo plan`` prints: the run's config is checked by the same validation as
training (``run.config.validate``, for the target's device and host counts), its hub-named weights are
replaced by their architectures (``easyppo.plan.architectures``), and every program is compiled.

``suggest`` tries a small, bounded set of changes (at most ``MAX_VARIANTS`` compiles), each a config
override a user can pass as is: remat ``full`` (keep only each layer's input); gradient accumulation
of 2, 4, 8 or 16 microbatches (fewer rows per forward pass); for RL, 2 or 4 times the update
minibatches and a rollout in 2 to 16 chunks of prompts (``rollout_batch_size``: the KV cache and the
scoring passes of one chunk at a time); and the mesh's tensor-parallel size (weights and activations
split by heads instead of rows), each mesh alone and then with more microbatches. Each of these is a
ladder that stops at its first rung that fits. If no single change fits, remat ``full`` is combined
with each. Variants the validation refuses (a batch that does not divide, heads that do not split)
are skipped without compiling. The one that fits with the shortest predicted iteration (then the
smallest peak; without a chip's figures, the smallest peak) is the suggestion.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import tempfile
from typing import Any

import ml_collections

from easyppo.core import sharding
from easyppo.plan import architectures, programs
from easyppo.plan.report import RunPlan
from easyppo.plan.topology import Target
from easyppo.run import config as run_config

logger = logging.getLogger(__name__)

GRADIENT_ALGORITHMS = ("sft", "rm", "dpo")
RL_ALGORITHMS = ("ppo", "grpo", "online_dpo")
SUPPORTED = GRADIENT_ALGORITHMS + RL_ALGORITHMS
TENSOR_SIZES = (1, 2, 4, 8)
ACCUMULATION_FACTORS = (2, 4, 8, 16)
MAX_VARIANTS = 12  # compiles per suggestion: each costs seconds (tiny models) to minutes (70B)


def _compile_programs(config: ml_collections.ConfigDict, target: Target) -> list:
    if config.algorithm == "online_dpo":
        return programs.online_dpo_iteration(config, target)
    if config.algorithm in RL_ALGORITHMS:
        return programs.rl_iteration(config, target)
    return programs.gradient_programs(config, target)


def _tokens_per_iteration(config: ml_collections.ConfigDict) -> int:
    batch = config.data.global_batch_size
    if config.algorithm == "sft":
        return batch * config.data.max_seq_len
    if config.algorithm in ("rm", "dpo"):
        return 2 * batch * config.data.max_seq_len
    section = config[config.algorithm]
    return batch * section.samples_per_prompt * (config.data.max_prompt_len + section.sampling.max_new_tokens)


def _settings(config: ml_collections.ConfigDict, target: Target) -> dict[str, Any]:
    data, fsdp, tensor = sharding.resolve_mesh_shape(config.mesh, len(target.devices))
    settings = {
        "mesh": f"data={data} fsdp={fsdp} tensor={tensor}",
        "grad_accum_steps": config.train.grad_accum_steps,
        "remat": config.model.remat,
    }
    if config.algorithm in ("ppo", "grpo"):
        settings["num_minibatches"] = config[config.algorithm].num_minibatches
    return settings


def plannable(config: ml_collections.ConfigDict, scratch: pathlib.Path) -> ml_collections.ConfigDict:
    """``config`` with hub-named weights replaced by their architectures, refused if not plannable."""
    if config.algorithm not in SUPPORTED:
        raise run_config.ConfigError(
            "algorithm", f"planning {config.algorithm} is not built (known: {', '.join(SUPPORTED)})"
        )
    return architectures.without_weights(config, scratch)


def plan_run(config: ml_collections.ConfigDict, target: Target) -> RunPlan:
    """Validates ``config`` for ``target`` and compiles every program of one iteration (module doc)."""
    with tempfile.TemporaryDirectory(prefix="easyppo-plan-") as scratch:
        return plan_prepared(plannable(config, pathlib.Path(scratch)), target)


def plan_prepared(planned: ml_collections.ConfigDict, target: Target) -> RunPlan:
    """``plan_run`` of a config that already went through ``plannable``."""
    run_config.validate(planned, num_devices=len(target.devices), process_count=target.num_hosts)
    reports = _compile_programs(planned, target)
    return RunPlan(
        target=target.name,
        num_devices=len(target.devices),
        num_hosts=target.num_hosts,
        chip=target.chip,
        programs=tuple(reports),
        tokens_per_iteration=_tokens_per_iteration(planned),
        settings=_settings(planned, target),
    )


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """A variant of the run: its overrides (``--config.KEY=VALUE``) and its plan."""

    overrides: dict[str, Any]
    plan: RunPlan

    @property
    def flags(self) -> str:
        return " ".join(f"--config.{key}={value}" for key, value in self.overrides.items())


def _with(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    changed = ml_collections.ConfigDict(config.to_dict())
    changed.update_from_flattened_dict(overrides)
    return changed


def _remat_full(config: ml_collections.ConfigDict) -> dict[str, Any]:
    remat = {"model.remat": "full"}
    if config.algorithm == "ppo" and "value_model" in config.ppo:
        remat["ppo.value_model.remat"] = "full"
    return remat


def _ladders(config: ml_collections.ConfigDict, base: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Lists of variants (each on top of ``base``), each list ordered from least to most memory saved:
    a list is tried until one of its variants fits, since the next would save memory it does not need."""
    accumulation = config.train.grad_accum_steps
    more_microbatches = [{"train.grad_accum_steps": accumulation * factor} for factor in ACCUMULATION_FACTORS]
    ladders = [[{**base, **step} for step in more_microbatches]]
    if config.algorithm in ("ppo", "grpo"):
        section = config[config.algorithm]
        ladders.append([{**base, f"{config.algorithm}.num_minibatches": section.num_minibatches * f} for f in (2, 4)])
        chunk = section.rollout_batch_size or config.data.global_batch_size
        ladders.append(
            [{**base, f"{config.algorithm}.rollout_batch_size": chunk // f} for f in (2, 4, 8, 16) if chunk % f == 0]
        )
    # Another tensor size changes how many rows each chip holds, so accumulation may then divide
    # where it did not (and be needed where it was not): each mesh is its own ladder.
    for tensor in TENSOR_SIZES:
        if tensor != config.mesh.tensor:
            mesh = {**base, "mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": tensor}
            ladders.append([mesh] + [{**mesh, **step} for step in more_microbatches])
    return ladders


def _rounds(config: ml_collections.ConfigDict) -> list[list[list[dict[str, Any]]]]:
    """Round 1: remat ``full``, then each single change; round 2 (only if round 1 found nothing):
    remat ``full`` combined with each."""
    if config.model.remat == "full":
        return [_ladders(config, {})]
    remat = _remat_full(config)
    return [[[remat], *_ladders(config, {})], _ladders(config, remat)]


def _cost(plan: RunPlan) -> float:
    return plan.iteration_seconds if plan.iteration_seconds is not None else float(plan.peak_bytes)


def suggest(config: ml_collections.ConfigDict, target: Target, *, max_variants: int = MAX_VARIANTS) -> list[Suggestion]:
    """The variants that fit, cheapest first; an empty list if none of the first ``max_variants``
    valid variants does. Stops at the first round (single changes, then combinations) that has a fit."""
    with tempfile.TemporaryDirectory(prefix="easyppo-plan-") as scratch:
        planned = plannable(config, pathlib.Path(scratch))
        fitting = _fitting_variants(planned, target, max_variants)
    # Equal times (compute-bound variants) go to the one with the most memory to spare.
    return sorted(fitting, key=lambda s: (_cost(s.plan), s.plan.peak_bytes))


def _fitting_variants(config: ml_collections.ConfigDict, target: Target, max_variants: int) -> list[Suggestion]:
    fitting: list[Suggestion] = []
    tried = 0
    for ladders in _rounds(config):
        for ladder in ladders:
            for overrides in ladder:
                if tried >= max_variants:
                    return fitting
                plan = _plan_variant(config, overrides, target)
                if plan is None:
                    continue
                tried += 1
                if plan.fits:
                    fitting.append(Suggestion(overrides, plan))
                    break  # the rest of this ladder saves memory that is not needed
        if fitting:
            break  # a change of this round fits: the next round's combinations would only cost more
    return fitting


def _plan_variant(config: ml_collections.ConfigDict, overrides: dict[str, Any], target: Target) -> RunPlan | None:
    """The variant's plan, or None when the run's validation (or the model's fit to the mesh) refuses it."""
    try:
        plan = plan_prepared(_with(config, overrides), target)  # validation first, then the compiles
    except ValueError as e:  # ConfigError is one; the model's fit to the mesh is checked while loading
        logger.debug("variant %s skipped: %s", overrides, e)
        return None
    logger.info("variant %s: peak %.2f GiB, fits %s", overrides, plan.peak_bytes / 2**30, plan.fits)
    return plan
