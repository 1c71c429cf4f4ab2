"""``easyppo plan``: compile a run's programs for a target and report memory, work and predicted time.

    easyppo plan --config=ppo:tulu25_13b_uf_mean --topology=v5p:4x4x8
    easyppo plan --config=dpo:demo                      # this machine's own devices

No weights and no data are read: each model's architecture comes from its checkpoint's
``config.json`` alone (for a hub name, fetched alone, or known offline for the presets' checkpoints;
``easyppo.plan.architectures``). TPU topologies need libtpu (the ``plan`` extra).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import jax

from easyppo.cli import errors, logs
from easyppo.cli.train import config_from_argv
from easyppo.plan import chips, planner, topology
from easyppo.plan.report import RunPlan
from easyppo.run import config as run_config

USAGE = f"""usage: easyppo plan --config=ALGORITHM:PRESET [--topology=local|GEN:SHAPE] [--hbm_gib=N]
                    [--no_suggest] [--json=FILE] [--config.KEY=VALUE ...]

Compiles every program of one iteration for the target (default: this machine's devices) without
reading weights or data, and prints per program the per-device memory against the chip's HBM and
the roofline time from its model FLOPs and streamed bytes; per run, the iteration time, tokens/s
and whether it fits. When it does not fit, or its batch does not divide over the target, it tries a
bounded set of changes (remat, gradient accumulation, tensor parallelism, and for PPO and GRPO
update minibatches and a rollout in chunks) and prints the cheapest that fits.

  --topology   local, or a TPU slice such as v5p:4x4x8, v4:4x4x4, v5e:8x8, v6e:8x16 ({topology.INSTALL_HINT})
  --hbm_gib    plan against this much memory per device instead of the chip's
  --no_suggest do not try variants when the run does not fit or divide
  --json       also write the plan (and any suggestion) as JSON to FILE
Supported algorithms: {", ".join(planner.SUPPORTED)}.
"""

GIB = 1 << 30
# Config keys whose refusal on a slice a variant (another mesh, more accumulation) may cure.
SHAPE_KEYS = ("data.global_batch_size", "eval.batch_size", "mesh")
LIBTPU_HOST_ENV = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # without it libtpu refuses a second process (a lockfile)
}


def _pop(argv: list[str], flag: str, default: str) -> str:
    values = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"{flag}=")]
    argv[:] = [arg for arg in argv if not arg.startswith(f"{flag}=")]
    return values[-1] if values else default


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def table(plan: RunPlan) -> str:
    """The plan as a table: a row per program, then the run's totals."""
    chip = plan.chip
    lines = [
        f"target {plan.target}: {plan.num_devices} devices on {plan.num_hosts} host(s)"
        + (f", {chip.name} with {chip.hbm_bytes / GIB:.2f} GiB each" if chip else ""),
        "settings: " + ", ".join(f"{key} {value}" for key, value in plan.settings.items()),
        f"{'program':<15} {'args GiB':>9} {'out GiB':>8} {'temp GiB':>9} {'donated':>8} {'peak GiB':>9} "
        f"{'margin GiB':>10} {'TFLOP':>10} {'GB/dev':>8} {'time':>10}",
    ]
    for program in plan.programs:
        row = program.as_dict(chip, plan.num_devices)
        margin = f"{row['margin_bytes'] / GIB:10.2f}" if "margin_bytes" in row else f"{'-':>10}"
        name = program.name + ("" if program.per_iteration else "*")
        lines.append(
            f"{name:<15} {program.argument_bytes / GIB:9.2f} {program.output_bytes / GIB:8.2f} "
            f"{program.temp_bytes / GIB:9.2f} {program.alias_bytes / GIB:8.2f} {program.peak_bytes / GIB:9.2f} {margin} "
            f"{program.work.flops / 1e12:10.2f} {program.work.bytes_per_device / 1e9:8.2f} "
            f"{_seconds(row.get('roofline_s')):>10}"
        )
    for program in plan.programs:
        if program.error:
            lines.append(f"  {program.name}: {program.error}")
    fits = {None: "unknown (no chip: pass --topology or --hbm_gib)", True: "yes", False: "NO"}[plan.fits]
    tokens_per_s = f"{plan.tokens_per_second:,.0f}" if plan.tokens_per_second else "-"
    lines += [
        f"fits: {fits}; peak {plan.peak_bytes / GIB:.2f} GiB per device",
        f"iteration: {_seconds(plan.iteration_seconds)} (roofline), {plan.tokens_per_iteration:,} tokens, "
        f"{tokens_per_s} tokens/s",
    ]
    if any(not program.per_iteration for program in plan.programs):
        lines.append("* runs once per pass over the data, before training: not in the iteration time")
    lines.append(
        "peak = args + out + temp - donated (a donated argument's buffer holds an output); time is a lower "
        "bound: per program the larger of model FLOPs at the chip's peak and streamed bytes (GB/dev) at its "
        "bandwidth; collectives and host work are not counted"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``easyppo plan``; ``argv`` excludes the program name. Returns the exit code."""
    argv, verbose = errors.pop_verbose(list(sys.argv[1:] if argv is None else argv))
    if not argv or any(arg in ("-h", "--help") for arg in argv):
        print(USAGE)
        return 0
    target_name, json_path = _pop(argv, "--topology", "local"), _pop(argv, "--json", "")
    hbm_gib = _pop(argv, "--hbm_gib", "")
    no_suggest = "--no_suggest" in argv
    argv = [arg for arg in argv if arg != "--no_suggest"]
    logs.configure(verbose)
    if target_name != "local":
        # Compiling for a described topology opens no TPU: tell libtpu about this host instead of
        # letting it query a metadata server that is not there (slow, five lines of warnings), let
        # several planners load it at once, and keep JAX itself on the CPU. The described topology
        # does not depend on any of these.
        for name, value in LIBTPU_HOST_ENV.items():
            os.environ.setdefault(name, value)
        if "JAX_PLATFORMS" not in os.environ:
            jax.config.update("jax_platforms", "cpu")
    with errors.reporting(verbose) as outcome:
        config = config_from_argv(["easyppo plan", *argv])
        target = topology.resolve_target(target_name)
        if hbm_gib:
            try:
                budget = int(float(hbm_gib) * GIB)
            except ValueError:
                raise errors.UsageError(f"--hbm_gib={hbm_gib!r} is not a number") from None
            target = topology.with_chip(target, chips.with_memory(target.chip, budget))
        result = {"plan": None, "suggestions": []}
        refusal: run_config.ConfigError | None = None
        try:
            plan = planner.plan_run(config, target)
        except run_config.ConfigError as e:
            if no_suggest or e.key not in SHAPE_KEYS:
                raise
            # The batch or mesh does not divide on this slice: a variant may (a mesh, accumulation).
            print(f"error: {errors.one_line(e)}\nthe run does not divide over {target.name}; trying variants ...")
            result["error"] = errors.one_line(e)
            plan, refusal = None, e
        if plan is not None:
            print(table(plan))
            result["plan"] = plan.as_dict()
        if (plan is None or plan.fits is False) and not no_suggest:
            if plan is not None:
                print("\ndoes not fit; trying variants ...", flush=True)
            suggestions = planner.suggest(config, target)
            if suggestions:
                best = suggestions[0]
                print(f"suggestion: {best.flags}\n{table(best.plan)}")
            elif refusal is not None:
                raise run_config.ConfigError(refusal.key, f"{refusal.message}; and no variant tried divides and fits")
            else:
                print("no variant tried fits: a larger slice (more chips) or a chip with more memory is needed")
            result["suggestions"] = [{"overrides": s.overrides, "plan": s.plan.as_dict()} for s in suggestions]
        if json_path:
            with open(json_path, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
    return outcome.status
