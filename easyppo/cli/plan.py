"""``easyppo plan``: compile a run's programs for a target and report memory, FLOPs and roofline time.

    easyppo plan --config=sft:tulu2_7b --topology=v5p:4x4x4 --config.model.init_from= \\
        --config.model.preset=llama2_7b
    easyppo plan --config=dpo:demo                      # this machine's own devices

No weights and no data are read: the model's architecture comes from ``model.init_from``'s
``config.json`` or, with ``init_from`` empty, from ``model.preset``. TPU topologies need libtpu
(the ``plan`` extra).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from easyppo.cli import errors, logs
from easyppo.cli.train import config_from_argv
from easyppo.plan import programs, topology
from easyppo.run import config as run_config

USAGE = """usage: easyppo plan --config=ALGORITHM:PRESET [--topology=local|GEN:SHAPE] [--json=FILE] [--config.KEY=VALUE ...]

Compiles the run's programs for the target (default: this machine's devices) without reading weights
or data, and prints per program the per-device memory against the chip's HBM, FLOPs and a roofline
time. Supported: sft, rm, dpo, ppo, grpo, online_dpo.
"""

GRADIENT_ALGORITHMS = ("sft", "rm", "dpo")
RL_ALGORITHMS = ("ppo", "grpo", "online_dpo")


def _pop(argv: list[str], flag: str, default: str) -> str:
    values = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"{flag}=")]
    argv[:] = [arg for arg in argv if not arg.startswith(f"{flag}=")]
    return values[-1] if values else default


def table(rows: list[dict], target: topology.Target) -> str:
    gib = 1 << 30
    lines = [f"target {target.name}: {len(target.devices)} devices on {target.num_hosts} host(s)"]
    header = f"{'program':<12} {'args GiB':>9} {'temp GiB':>9} {'peak GiB':>9} {'HBM GiB':>8} {'fits':>5} {'TFLOP':>8} {'time ms':>8}"
    lines.append(header)
    for row in rows:
        hbm = f"{row['hbm_bytes'] / gib:8.1f}" if "hbm_bytes" in row else f"{'-':>8}"
        fits = f"{'yes' if row['fits'] else 'NO':>5}" if "fits" in row else f"{'-':>5}"
        time_ms = f"{row['roofline_s'] * 1e3:8.1f}" if "roofline_s" in row else f"{'-':>8}"
        lines.append(
            f"{row['name']:<12} {row['argument_bytes'] / gib:9.2f} {row['temp_bytes'] / gib:9.2f} "
            f"{row['peak_bytes'] / gib:9.2f} {hbm} {fits} {row['flops'] / 1e12:8.2f} {time_ms}"
        )
    lines.append(
        "note: XLA's cost analysis counts a loop body once, so FLOPs and time of scanned layers "
        "(model.scan_layers) and of the sampler's decode loop are undercounted; memory is exact"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``easyppo plan``; ``argv`` excludes the program name. Returns the exit code."""
    argv, verbose = errors.pop_verbose(list(sys.argv[1:] if argv is None else argv))
    if not argv or any(arg in ("-h", "--help") for arg in argv):
        print(USAGE)
        return 0
    target_name, json_path = _pop(argv, "--topology", "local"), _pop(argv, "--json", "")
    logs.configure(verbose)
    with errors.reporting(verbose) as outcome:
        config = config_from_argv(["easyppo plan", *argv])
        if config.algorithm not in GRADIENT_ALGORITHMS + RL_ALGORITHMS:
            supported = ", ".join(GRADIENT_ALGORITHMS + RL_ALGORITHMS)
            raise run_config.ConfigError(
                "algorithm", f"planning {config.algorithm} is not built yet (so far: {supported})"
            )
        target = topology.resolve_target(target_name)
        run_config.validate(config, num_devices=len(target.devices), process_count=target.num_hosts)
        if config.algorithm == "online_dpo":
            reports = programs.online_dpo_iteration(config, target)
        elif config.algorithm in RL_ALGORITHMS:
            reports = programs.rl_iteration(config, target)
        else:
            reports = [programs.gradient_train_step(config, target)]
        rows = [programs.describe(report, target) for report in reports]
        print(table(rows, target))
        if json_path:
            with open(json_path, "w", encoding="utf-8") as f:
                json.dump({"target": target.name, "programs": rows}, f, indent=2)
    return outcome.status
