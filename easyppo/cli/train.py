"""``easyppo train``: run (or resume) a training run from a preset and dotted overrides.

    easyppo train --config=ppo:demo --config.ppo.kl_coef=0.02
    easyppo train --config=path/to/my_presets.py:big --config.output_dir=gs://bucket/run

``--config`` names a preset as ``ALGORITHM:PRESET`` (the presets installed with the package, in
``easyppo/configs/``) or as ``FILE.py[:PRESET]`` (any file with a ``get_config(preset)``, such as a
checkout's ``configs/ppo.py``). ``--config.a.b=value`` changes one key; an unknown key fails with the
closest existing one.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from easyppo import configs as presets_package
from easyppo.cli import errors, logs
from easyppo.run import config as run_config
from easyppo.run import config_help, distributed
from easyppo.run.loop import train

USAGE = """usage: easyppo train --config=ALGORITHM:PRESET | --config=FILE.py[:PRESET] [--config.KEY=VALUE ...] [--verbose]

Runs (or resumes, from the latest checkpoint in its output directory) one training run.

  --config=ALGORITHM:PRESET   an installed preset, e.g. --config=ppo:demo
  --config=FILE.py[:PRESET]   a config file with get_config(preset), e.g. --config=configs/dpo.py:demo
  --config.KEY=VALUE          override one key, e.g. --config.optim.learning_rate=1e-6
  --list_keys                 list every key of the config with its value and what it means; run nothing
  --print_config              print the resolved config (after overrides); run nothing
  --verbose                   show the traceback of an error instead of its one-line summary

installed presets:
{presets}
"""


def installed_presets() -> dict[str, tuple[str, ...]]:
    """``{algorithm: preset names}`` of the preset modules shipped in ``easyppo.configs``."""
    found = {}
    for info in pkgutil.iter_modules(presets_package.__path__):
        module = importlib.import_module(f"{presets_package.__name__}.{info.name}")
        if hasattr(module, "PRESETS") and hasattr(module, "get_config"):
            found[info.name] = tuple(module.PRESETS)
    return found


def resolve_config_reference(reference: str) -> str:
    """``ALGORITHM:PRESET`` -> the installed preset file's ``path:PRESET``; a file path passes through."""
    name, _, preset = reference.partition(":")
    if os.sep in name or name.endswith(".py") or os.path.exists(name):
        return reference
    presets = installed_presets()
    if name not in presets:
        raise run_config.ConfigError(
            "config",
            f"{reference!r} is neither a config file nor ALGORITHM:PRESET with ALGORITHM one of {sorted(presets)}",
        )
    if preset and preset not in presets[name]:
        raise run_config.ConfigError("config", f"{name} has no preset {preset!r}; choose one of {list(presets[name])}")
    path = importlib.import_module(f"{presets_package.__name__}.{name}").__file__
    return f"{path}:{preset}" if preset else path


def config_from_argv(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """Parses ``--config=...`` and ``--config.a.b=value`` overrides (``argv[0]`` is the program name).

    Unknown keys fail with a ``ConfigError`` naming the key and the closest existing one; values of
    the wrong type fail naming the flag.
    """
    argv = [_resolved(arg) for arg in argv]
    base_args = [argv[0]] + [a for a in argv[1:] if not a.startswith("--config.")]
    base = _parse_config_flags(base_args)
    overrides = [a[len("--config.") :].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    run_config.check_override_keys(base, overrides)
    return _parse_config_flags(argv)


def _resolved(arg: str) -> str:
    if arg.startswith("--config="):
        return "--config=" + resolve_config_reference(arg[len("--config=") :])
    return arg


def _parse_config_flags(argv: list[str]) -> ml_collections.ConfigDict:
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        "config",
        None,
        "Run config, e.g. ppo:demo or configs/rm.py:demo",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=argv,
    )
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        raise run_config.ConfigError("config", str(e)) from None
    if len(rest) > 1:
        raise run_config.ConfigError("config", f"unexpected arguments {rest[1:]}")
    if holder.value is None:
        raise run_config.ConfigError("config", "pass --config=ALGORITHM:PRESET or --config=FILE.py[:PRESET]")
    return holder.value


def usage() -> str:
    lines = [f"  {name}: {', '.join(presets)}" for name, presets in sorted(installed_presets().items())]
    return USAGE.format(presets="\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``easyppo train``; ``argv`` excludes the program name. Returns the exit code."""
    argv, verbose = errors.pop_verbose(list(sys.argv[1:] if argv is None else argv))
    if not argv or any(arg in ("-h", "--help") for arg in argv):
        print(usage())
        return 0
    show = {flag for flag in ("--list_keys", "--print_config") if flag in argv}
    argv = [arg for arg in argv if arg not in show]
    logs.configure(verbose)
    with errors.reporting(verbose) as outcome:
        config = config_from_argv(["easyppo train", *argv])  # reads the config; touches no device
        if show:
            print(config_help.list_keys(config) if "--list_keys" in show else config)
            return outcome.status
        distributed.initialize()  # EASYPPO_DISTRIBUTED (auto | always | never); before any other JAX call
        result = train(config)
        print(summary(config.algorithm, result))
    return outcome.status


def summary(algorithm: str, result) -> str:
    """What a finished (or stopped) run prints: status, last metrics, data counts, where things went."""
    lines = [f"{algorithm}: {result.status} at step {result.step}/{result.total_steps}"]
    for name, metrics in (("train", result.train_metrics), ("eval", result.eval_metrics)):
        if metrics:
            lines.append(f"  {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    if result.data_stats:
        stats = result.data_stats
        lines.append(
            f"  data: {stats['rows_used']} of {stats['rows_read']} rows used; {stats['rows_bad']} bad (skipped), "
            f"{stats['rows_truncated']} truncated, {stats['rows_dropped']} dropped as too long"
        )
    lines.append(f"  checkpoints: {result.checkpoint_dir}")
    if result.export_dir:
        lines.append(f"  Hugging Face export: {result.export_dir}")
    return "\n".join(lines)
