"""The planner's building blocks: chip table, targets, and reports read from compiled programs."""

from __future__ import annotations

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from easyppo.plan import chips, report, topology

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _matmul_report(devices, n=256):
    mesh = Mesh(np.array(devices).reshape(-1), ("fsdp",))
    x = jax.ShapeDtypeStruct((n, n), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
    compiled = jax.jit(lambda a, b: a @ b).lower(x, x).compile()
    return report.report_of("matmul", compiled)


def test_the_roofline_is_bound_by_whichever_of_compute_and_memory_is_slower():
    v5p = chips.chip_named("v5p:4x4x8")
    assert v5p.roofline_seconds(459e12, 0) == pytest.approx(1.0)
    assert v5p.roofline_seconds(0, 2765e9) == pytest.approx(1.0)
    assert v5p.roofline_seconds(459e12, 2 * 2765e9) == pytest.approx(2.0)


def test_an_unknown_generation_names_the_known_ones():
    with pytest.raises(ValueError, match="v3.*known: v4, v5e, v5p, v6e"):
        chips.chip_named("v3:8x8")


def test_the_local_target_is_this_machines_devices():
    target = topology.resolve_target("local")
    assert target.devices == tuple(jax.devices()) and target.chip is None and target.num_hosts == 1


def test_a_report_agrees_with_the_arithmetic_of_a_sharded_matmul():
    devices = jax.devices()
    n = 256
    result = _matmul_report(devices, n)
    shards = len(devices)
    assert result.argument_bytes == 2 * (n // shards) * n * 4  # each device holds its rows of both inputs
    assert result.flops == pytest.approx(2 * n * n * n / shards, rel=0.05)
    assert result.peak_bytes >= result.argument_bytes


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (the plan extra)")
@pytest.mark.parametrize("name, chips_count, hosts", [("v5p:2x2x2", 8, 2), ("v5e:4x4", 16, 4), ("v6e:4x4", 16, 4)])
def test_a_tpu_topology_compiles_on_this_cpu(name, chips_count, hosts):
    target = topology.resolve_target(name)
    assert (len(target.devices), target.num_hosts) == (chips_count, hosts)
    result = _matmul_report(target.devices, 1024)
    assert result.flops == pytest.approx(2 * 1024**3 / chips_count, rel=0.05)
    assert result.as_dict(target.chip)["fits"]


def _tiny(algorithm: str):
    from easyppo.cli.train import config_from_argv

    name, _, reference = algorithm.partition("/")
    extra = [f"--config.dpo.reference={reference}"] if reference else []
    argv = [
        "easyppo train",
        f"--config={name}:demo",
        "--config.data.global_batch_size=8",
        "--config.model.init_from=",
        *extra,
    ]
    return config_from_argv(argv)


@pytest.mark.parametrize("algorithm", ["sft", "rm", "dpo/on_the_fly", "dpo/precomputed"])
def test_a_gradient_train_step_is_planned_without_weights_or_data(algorithm):
    from easyppo.plan import programs

    target = topology.resolve_target("local")
    result = programs.gradient_train_step(_tiny(algorithm), target)
    assert result.flops > 0 and result.argument_bytes > 0 and result.peak_bytes >= result.argument_bytes


def test_the_plan_command_prints_a_table_and_writes_json(tmp_path, capsys):
    from easyppo.cli import main as cli_main

    out = tmp_path / "plan.json"
    argv = [
        "plan",
        "--config=sft:demo",
        "--config.model.init_from=",
        "--config.data.global_batch_size=8",
        f"--json={out}",
    ]
    assert cli_main.main(argv) == 0
    printed = capsys.readouterr().out
    assert "train_step" in printed and "peak GiB" in printed
    (row,) = json.loads(out.read_text())["programs"]
    assert row["name"] == "train_step" and row["peak_bytes"] > 0


def test_an_online_dpo_iteration_is_planned_program_by_program():
    from easyppo.cli.train import config_from_argv
    from easyppo.plan import programs

    argv = [
        "easyppo plan",
        "--config=online_dpo:demo",
        "--config.model.init_from=",
        "--config.online_dpo.reward_model.init_from=",
        "--config.online_dpo.reward_model.preset=tiny",
        "--config.data.global_batch_size=8",
    ]
    reports = programs.online_dpo_iteration(config_from_argv(argv), topology.resolve_target("local"))
    assert [r.name for r in reports] == ["rollout", "reward_model", "pairs", "update"]
    assert all(r.peak_bytes > 0 for r in reports)


@pytest.mark.parametrize("preset", ["ppo:demo", "grpo:demo"])
def test_an_rl_iteration_is_planned_program_by_program(preset):
    from easyppo.cli.train import config_from_argv
    from easyppo.plan import programs

    argv = ["easyppo plan", f"--config={preset}", "--config.model.init_from=", "--config.data.global_batch_size=8"]
    if preset.startswith("ppo"):
        argv += ["--config.ppo.reward_model.init_from=", "--config.ppo.reward_model.preset=tiny"]
    reports = programs.rl_iteration(config_from_argv(argv), topology.resolve_target("local"))
    assert [r.name for r in reports] == ["rollout", "judge", "assemble", "update"]
    assert all(r.flops > 0 and r.peak_bytes > 0 for r in reports)


@pytest.mark.parametrize("algorithm", ["sft", "dpo/on_the_fly"])
def test_the_plan_compiles_the_same_program_the_run_compiles(algorithm):
    """The abstract state and worst-case batch give the memory plan of the real step, byte for byte."""
    from easyppo.core import sharding
    from easyppo.plan import programs
    from easyppo.run.loop import trainer_for

    config = _tiny(algorithm)
    target = topology.resolve_target("local")
    planned = programs.gradient_train_step(config, target)

    mesh = sharding.make_mesh(config.mesh, devices=target.devices)
    trainer = trainer_for(config, mesh, total_steps=1)
    batch = jax.device_put(
        programs.worst_case_batch(config, config.data.global_batch_size), sharding.batch_sharding(mesh)
    )
    compiled = trainer.lower_train_step(trainer.init_state(), batch, jax.random.key(0)).compile()
    real = report.report_of("train_step", compiled)
    assert (planned.argument_bytes, planned.output_bytes, planned.temp_bytes, planned.alias_bytes) == (
        real.argument_bytes,
        real.output_bytes,
        real.temp_bytes,
        real.alias_bytes,
    )
    assert planned.flops == real.flops
