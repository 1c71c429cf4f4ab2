"""Specification of the planner (``easyppo plan``): a run's programs compiled for a target without
weights or data, their memory as XLA plans it, their work counted analytically, a roofline time, and
variants suggested when the run does not fit.

What is measured here, on this CPU: the planned memory of each program equals the memory of the
program the real run compiles, byte for byte; the analytic FLOPs agree with XLA's own count within
2% wherever XLA can count (programs without loops); with scanned layers XLA counts one layer,
which is why the plan counts FLOPs itself. Tests that compile for TPU topologies need libtpu (the
``plan`` extra) and are skipped without it.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from easyppo.cli.train import config_from_argv
from easyppo.plan import architectures, chips, flops, planner, programs, report, topology, work

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install 'easyppo[plan]')")
GIB = 1 << 30

# An architecture large enough that matmuls dominate XLA's count (norms, softmax and the optimizer
# are a fraction of a per cent of it), without scanned layers, so that XLA counts every layer.
COUNTABLE = [
    "--config.model.init_from=",
    "--config.model.preset=tiny",
    "--config.model.scan_layers=False",
    "--config.model.hidden_size=256",
    "--config.model.intermediate_size=768",
    "--config.model.num_attention_heads=4",
    "--config.model.num_key_value_heads=4",
    "--config.model.num_hidden_layers=4",
    "--config.model.vocab_size=512",
    "--config.model.max_position_embeddings=512",
]


def _config(preset: str, *overrides: str) -> ml_collections.ConfigDict:
    argv = ["easyppo plan", f"--config={preset}", "--config.model.init_from=", "--config.data.global_batch_size=8"]
    algorithm = preset.split(":")[0]
    if algorithm in ("ppo", "online_dpo"):
        argv += [f"--config.{algorithm}.reward_model.init_from=", f"--config.{algorithm}.reward_model.preset=tiny"]
    return config_from_argv([*argv, *overrides])


def _local() -> topology.Target:
    return topology.resolve_target("local")


# ----------------------------------------------------------------------------------- chips, targets


def test_the_roofline_is_bound_by_whichever_of_compute_and_memory_is_slower():
    v5p = chips.chip_named("v5p:4x4x8")
    assert v5p.roofline_seconds(459e12, 0) == pytest.approx(1.0)
    assert v5p.roofline_seconds(0, 2765e9) == pytest.approx(1.0)
    assert v5p.roofline_seconds(459e12, 2 * 2765e9) == pytest.approx(2.0)


def test_a_memory_budget_without_a_chip_gives_no_time():
    budget = chips.with_memory(None, 3 * GIB)
    assert budget.hbm_bytes == 3 * GIB and budget.roofline_seconds(1e12, 1e9) is None
    assert chips.with_memory(chips.chip_named("v4:2x2x2"), GIB).peak_bf16_flops == 275e12


def test_an_unknown_generation_names_the_known_ones():
    with pytest.raises(ValueError, match="v2.*known: v3, v4, v5e, v5p, v6e"):
        chips.chip_named("v2:8x8")


def test_the_local_target_is_this_machines_devices():
    target = _local()
    assert target.devices == tuple(jax.devices()) and target.chip is None and target.num_hosts == 1


def _matmul_report(devices, n=256):
    mesh = Mesh(np.array(devices).reshape(-1), ("fsdp",))
    x = jax.ShapeDtypeStruct((n, n), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
    compiled = jax.jit(lambda a, b: a @ b).lower(x, x).compile()
    return report.report_of("matmul", compiled)


def test_a_report_holds_the_memory_and_count_xla_gives_for_a_sharded_matmul():
    devices = jax.devices()
    n = 256
    result = _matmul_report(devices, n)
    assert result.argument_bytes == 2 * (n // len(devices)) * n * 4  # each device holds its rows of both
    assert result.xla_flops == pytest.approx(2 * n * n * n / len(devices), rel=0.05)
    assert result.peak_bytes >= result.argument_bytes


@needs_libtpu
@pytest.mark.parametrize("name, chips_count, hosts", [("v5p:2x2x2", 8, 2), ("v5e:4x4", 16, 4), ("v6e:4x4", 16, 4)])
def test_a_tpu_topology_compiles_on_this_cpu(name, chips_count, hosts):
    target = topology.resolve_target(name)
    assert (len(target.devices), target.num_hosts) == (chips_count, hosts)
    result = _matmul_report(target.devices, 1024)
    assert result.xla_flops == pytest.approx(2 * 1024**3 / chips_count, rel=0.05)
    assert result.fits(target.chip)


@needs_libtpu
def test_a_mesh_axis_smaller_than_the_tori_axes_is_still_laid_out():
    """tensor=2 on a 4x4x4 v5p slice: jax.make_mesh finds no layout over whole torus axes."""
    from easyppo.core import sharding

    target = topology.resolve_target("v5p:4x4x4")
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=2)), devices=target.devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 32, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in target.devices)


# ------------------------------------------------------------------------------------ architectures


@pytest.fixture
def offline_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    architectures._hub_unreachable.cache_clear()
    yield
    architectures._hub_unreachable.cache_clear()


def test_a_preset_checkpoint_is_planned_from_its_architecture_alone_when_the_hub_is_unreachable(offline_hub, tmp_path):
    config = config_from_argv(["easyppo plan", "--config=ppo:tulu25_13b_uf_mean"])
    planned = architectures.without_weights(config, tmp_path)
    for key, preset in (("model", "tulu2_13b"), ("ppo.reward_model", "tulu2_70b")):
        section = planned.ppo.reward_model if key != "model" else planned.model
        stored = json.loads((pathlib.Path(section.init_from) / "config.json").read_text())
        assert stored == json.loads(json.dumps(flops.llama.get_preset(preset).to_hf_dict())), key
    assert config.model.init_from == "allenai/tulu-2-13b"  # the caller's config is left alone


def test_an_unknown_hub_checkpoint_is_refused_naming_the_key_when_the_hub_is_unreachable(offline_hub, tmp_path):
    config = _config("sft:demo", "--config.model.init_from=some-org/some-model")
    with pytest.raises(Exception, match=r"model\.init_from.*some-org/some-model.*HF_HUB_OFFLINE.*preset"):
        architectures.without_weights(config, tmp_path)


def test_local_weight_sources_are_read_as_they_are(tmp_path):
    config = _config("sft:demo", f"--config.model.init_from={tmp_path}")
    assert architectures.without_weights(config, tmp_path / "scratch").model.init_from == str(tmp_path)


# ------------------------------------------------------------------------------- work against XLA


@pytest.mark.parametrize("preset", ["sft:demo", "rm:demo", "dpo:demo"])
def test_model_flops_agree_with_xlas_count_of_programs_without_loops(preset):
    config = _config(preset, *COUNTABLE, "--config.data.max_seq_len=256", "--config.data.global_batch_size=32")
    plan = planner.plan_run(config, _local())
    for program in plan.programs:  # XLA counts per device
        assert program.work.flops / plan.num_devices == pytest.approx(program.xla_flops, rel=0.02), program.name


def test_model_flops_of_an_rl_iterations_forward_and_update_programs_agree_with_xla():
    config = _config("grpo:demo", *COUNTABLE, "--config.grpo.ppo_epochs=1", "--config.grpo.num_minibatches=1")
    plan = planner.plan_run(config, _local())
    counted = {p.name: (p.work.flops / plan.num_devices, p.xla_flops) for p in plan.programs}  # XLA: per device
    for name in ("judge", "update"):
        assert counted[name][0] == pytest.approx(counted[name][1], rel=0.02), name
    # The decode loop's body is counted once by XLA: far less than the prefill and every decoded token.
    assert counted["rollout"][1] < 0.75 * counted["rollout"][0]


def test_xla_counts_a_scanned_layer_once_which_is_why_the_plan_counts_flops_itself():
    unrolled = planner.plan_run(_config("sft:demo", *COUNTABLE), _local()).programs[0]
    scanned = planner.plan_run(_config("sft:demo", *COUNTABLE, "--config.model.scan_layers=True"), _local()).programs[0]
    assert scanned.work.flops == unrolled.work.flops
    assert scanned.xla_flops < 0.5 * unrolled.xla_flops  # 4 layers counted as about 1


def test_the_benchmarks_count_with_the_planners_formulas():
    import argparse

    from benchmarks import canonical_flops

    config = flops.llama.get_preset("llama2_7b")
    args = argparse.Namespace(batch_pairs=4, prompt_len=64, response_len=192, reference="on_the_fly")
    rows, seq = 8, 256
    expected = flops.forward_backward(config, rows=rows, seq_len=seq, head_positions=192, head="lm")
    expected += flops.forward(config, rows=rows, seq_len=seq, head_positions=192, head="lm")
    assert canonical_flops.dpo_step(config, args) == expected


def test_remat_full_adds_the_trunks_forward_pass_to_a_training_pass():
    config = flops.llama.get_preset("llama2_7b")
    plain = flops.forward_backward(config, rows=2, seq_len=128, head_positions=128, head="lm")
    full = flops.forward_backward(config, rows=2, seq_len=128, head_positions=128, head="lm", remat="full")
    trunk = 2 * 2 * 128 * flops.matmul_params(config, "lm")["blocks"] + flops.attention(config, 2, 128, 128)
    assert full - plain == pytest.approx(trunk)


def test_a_decoded_token_streams_the_weights_and_the_whole_cache():
    config = flops.llama.get_preset("llama2_7b", dtype="bfloat16")
    streamed = flops.decode_bytes(config, rows=4, prompt_len=100, new_tokens=28)
    assert streamed["weights"] == 28 * flops.weight_bytes(config, "lm")
    # 32 layers x (keys + values) x 32 KV heads x 128 x 2 bytes = 512 KiB per token of context.
    assert streamed["kv_cache"] == 28 * 4 * 128 * 512 * 1024


# --------------------------------------------------------------------------- memory against the run


@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
def test_the_planned_memory_is_the_memory_of_the_step_the_run_compiles(algorithm):
    """The abstract state and worst-case batch give the memory plan of the real step, byte for byte."""
    from easyppo.core import sharding
    from easyppo.run.loop import trainer_for

    config = _config(f"{algorithm}:demo", *(["--config.dpo.reference=on_the_fly"] if algorithm == "dpo" else []))
    target = _local()
    planned = programs.gradient_programs(config, target)[0]

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
    assert planned.xla_flops == real.xla_flops


def test_the_planned_rollout_and_update_are_the_programs_a_real_ppo_run_compiles():
    from easyppo.core import sharding
    from easyppo.run.loop import trainer_for

    config = _config("ppo:demo")
    target = _local()
    planned = {p.name: p for p in programs.rl_iteration(config, target)}

    mesh = sharding.make_mesh(config.mesh, devices=target.devices)
    trainer = trainer_for(config, mesh, total_steps=1)
    state = trainer.init_state()
    batch = jax.device_put(
        programs.worst_case_batch(config, config.data.global_batch_size), sharding.batch_sharding(mesh)
    )
    options = trainer.options
    with jax.set_mesh(mesh):
        rollout = trainer.rollout.lower(
            state.params,
            batch,
            jax.random.key(0),
            sampling=trainer.sampling,
            samples_per_prompt=options.samples_per_prompt,
        ).compile()
        sampled = trainer.rollout(
            state.params,
            batch,
            jax.random.key(0),
            sampling=trainer.sampling,
            samples_per_prompt=options.samples_per_prompt,
        )
        judged = trainer.judge(state.params, state.value_params, trainer.frozen, sampled, recompute_policy=True)
        rows = sampled.row_mask.shape[0]
        scored = trainer.assemble(
            judged, sampled, jax.device_put(np.zeros(rows, np.float32), sharding.batch_sharding(mesh)), state.kl_coef
        )
        update = trainer.update.lower(
            state, scored.experience, jnp.float32(0), jax.random.key(1), train_policy=True
        ).compile()
    for name, compiled in (("rollout", rollout), ("update", update)):
        real = report.report_of(name, compiled)
        assert (planned[name].argument_bytes, planned[name].temp_bytes, planned[name].output_bytes) == (
            real.argument_bytes,
            real.temp_bytes,
            real.output_bytes,
        ), name


# --------------------------------------------------------------------------------------- run plans


@pytest.mark.parametrize("preset", ["ppo:demo", "grpo:demo"])
def test_an_rl_iteration_is_planned_program_by_program(preset):
    plan = planner.plan_run(_config(preset), _local())
    assert [p.name for p in plan.programs] == ["rollout", "judge", "assemble", "update"]
    assert all(p.peak_bytes > 0 for p in plan.programs)
    assert all(p.work.flops > 0 for p in plan.programs if p.name != "assemble")
    config = _config(preset)
    section = config[config.algorithm]
    width = config.data.max_prompt_len + section.sampling.max_new_tokens
    assert plan.tokens_per_iteration == 8 * section.samples_per_prompt * width


def test_an_online_dpo_iteration_is_planned_program_by_program():
    plan = planner.plan_run(_config("online_dpo:demo"), _local())
    assert [p.name for p in plan.programs] == ["rollout", "reward_model", "pairs", "update"]
    assert all(p.peak_bytes > 0 for p in plan.programs)


def test_a_precomputed_dpo_reference_is_planned_but_not_counted_in_the_iteration():
    plan = planner.plan_run(_config("dpo:demo", "--config.dpo.reference=precomputed"), _local())
    assert [(p.name, p.per_iteration) for p in plan.programs] == [("train_step", True), ("reference_pass", False)]
    v4 = chips.chip_named("v4:2x2x2")
    timed = planner.RunPlan(**{**plan.__dict__, "chip": v4})
    assert timed.iteration_seconds == pytest.approx(plan.programs[0].roofline_seconds(v4, plan.num_devices))
    assert timed.tokens_per_iteration == 2 * 8 * _config("dpo:demo").data.max_seq_len  # both responses of 8 pairs
    assert timed.tokens_per_second == pytest.approx(timed.tokens_per_iteration / timed.iteration_seconds)


def test_a_run_fits_when_every_program_fits():
    plan = planner.plan_run(_config("grpo:demo"), _local())
    largest = max(p.peak_bytes for p in plan.programs)
    just_enough = planner.RunPlan(**{**plan.__dict__, "chip": chips.with_memory(None, largest)})
    one_byte_short = planner.RunPlan(**{**plan.__dict__, "chip": chips.with_memory(None, largest - 1)})
    assert (just_enough.fits, one_byte_short.fits, plan.fits) == (True, False, None)


def test_the_work_of_a_training_pass_splits_weights_by_tensor_and_optimizer_state_by_both_axes():
    config = flops.llama.get_preset("llama2_7b", dtype="bfloat16")
    mesh = work.MeshShape(data=1, fsdp=16, tensor=4)
    result = work.training_pass(config, mesh, rows=4, seq_len=64, head_positions=64, head="lm", microbatches=2)
    weights = 2 * 2 * flops.weight_bytes(config, "lm") / 4  # 2 microbatches x forward and backward
    optimizer = work.OPTIMIZER_BYTES_PER_PARAM * config.num_params() / 64
    assert result.bytes_per_device == pytest.approx(weights + optimizer)


# ------------------------------------------------------------------------------------- suggestions


def test_a_run_that_does_not_fit_gets_the_cheapest_variant_that_does():
    config = _config("sft:demo", "--config.data.global_batch_size=16")
    base = planner.plan_run(config, _local())
    budget = topology.with_chip(_local(), chips.with_memory(None, int(base.peak_bytes * 0.8)))
    suggestions = planner.suggest(config, budget)
    assert suggestions, "accumulating gradients over microbatches fits in 80% of the memory"
    best = suggestions[0]
    assert best.plan.fits and best.plan.peak_bytes <= 0.8 * base.peak_bytes
    assert best.plan.peak_bytes == min(s.plan.peak_bytes for s in suggestions)  # no chip speed: least memory
    assert best.flags.startswith("--config.")
    rerun = planner.plan_run(
        config_from_argv(
            [
                "easyppo plan",
                "--config=sft:demo",
                "--config.model.init_from=",
                "--config.data.global_batch_size=16",
                *best.flags.split(),
            ]
        ),
        budget,
    )
    assert rerun.peak_bytes == best.plan.peak_bytes  # the printed flags reproduce the suggestion


def test_variants_the_validation_refuses_are_not_compiled(monkeypatch):
    compiled = []
    real_compile = planner._compile_programs

    def compile_and_record(config, target):
        reports = real_compile(config, target)  # raises first when the model does not split over the mesh
        compiled.append(config)
        return reports

    monkeypatch.setattr(planner, "_compile_programs", compile_and_record)
    # 16 rows on 8 devices: 2 microbatches of 8 divide, 4 or more do not. Nothing fits in 1 byte, so
    # every variant that validates is compiled.
    config = _config("sft:demo", "--config.data.global_batch_size=16")
    planner.suggest(config, topology.with_chip(_local(), chips.with_memory(None, 1)))
    tried = {(c.mesh.tensor, c.train.grad_accum_steps) for c in compiled}
    assert (1, 2) in tried  # on the full fsdp mesh, 2 microbatches of 8 rows
    # Every compiled variant's microbatch splits over its mesh's data x fsdp (8 devices / tensor).
    assert all((16 // accumulation) % (8 // tensor) == 0 for tensor, accumulation in tried), tried
    assert (1, 4) not in tried and len(compiled) <= planner.MAX_VARIANTS


# ---------------------------------------------------------------------------------------------- CLI


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
    assert "train_step" in printed and "peak GiB" in printed and "fits: unknown" in printed
    written = json.loads(out.read_text())
    (row,) = written["plan"]["programs"]
    assert row["name"] == "train_step" and row["peak_bytes"] > 0 and row["model_flops"] > 0
    assert written["suggestions"] == []


def test_the_plan_command_suggests_a_variant_under_a_memory_budget(tmp_path, capsys):
    from easyppo.cli import main as cli_main

    out = tmp_path / "plan.json"
    argv = ["plan", "--config=sft:demo", "--config.model.init_from=", "--config.data.global_batch_size=16"]
    assert cli_main.main([*argv, "--json=" + str(tmp_path / "base.json")]) == 0
    peak = json.loads((tmp_path / "base.json").read_text())["plan"]["peak_bytes"]
    capsys.readouterr()
    assert cli_main.main([*argv, f"--hbm_gib={0.8 * peak / GIB}", f"--json={out}"]) == 0
    printed = capsys.readouterr().out
    assert "fits: NO" in printed and "suggestion: --config." in printed and "fits: yes" in printed
    written = json.loads(out.read_text())
    assert written["plan"]["fits"] is False and written["suggestions"][0]["plan"]["fits"] is True


def test_a_bad_memory_budget_is_a_one_line_error(capsys):
    from easyppo.cli import main as cli_main

    assert cli_main.main(["plan", "--config=sft:demo", "--config.model.init_from=", "--hbm_gib=lots"]) == 2
    assert capsys.readouterr().err.strip() == "error: --hbm_gib='lots' is not a number"


def test_an_algorithm_the_planner_does_not_know_is_refused_naming_the_key(tmp_path):
    config = _config("sft:demo")
    config.algorithm = "simpo_magic"
    with pytest.raises(Exception, match="algorithm.*simpo_magic"):
        planner.plannable(config, tmp_path)


def test_a_batch_that_does_not_divide_over_the_target_gets_a_mesh_that_does(tmp_path, capsys):
    from easyppo.cli import main as cli_main

    out = tmp_path / "plan.json"
    argv = ["plan", "--config=sft:demo", "--config.model.init_from=", "--config.data.global_batch_size=12"]
    assert cli_main.main([*argv, "--hbm_gib=1", f"--json={out}"]) == 0  # 12 rows on 8 devices
    printed = capsys.readouterr().out
    assert "does not divide over local" in printed and "suggestion: --config.mesh.data=1" in printed
    written = json.loads(out.read_text())
    assert written["plan"] is None and "data.global_batch_size" in written["error"]
    assert written["suggestions"][0]["plan"]["fits"] is True
    assert cli_main.main([*argv, "--hbm_gib=1", "--no_suggest"]) == 2  # asked not to search: the error
    assert "config.data.global_batch_size: 12 is not divisible" in capsys.readouterr().err


def test_a_rollout_in_chunks_is_planned_per_chunk_and_its_work_counts_every_chunk():
    batch = "--config.data.global_batch_size=16"  # 2 chunks of 8 prompts, each spread over the 8 devices
    whole = {p.name: p for p in planner.plan_run(_config("grpo:demo", batch), _local()).programs}
    chunked = _config("grpo:demo", batch, "--config.grpo.rollout_batch_size=8")
    chunked = {p.name: p for p in planner.plan_run(chunked, _local()).programs}
    for name in ("rollout", "judge"):
        assert chunked[name].peak_bytes < whole[name].peak_bytes, name  # one chunk's cache and activations
        assert chunked[name].work.flops == pytest.approx(whole[name].work.flops), name  # the same tokens
        assert chunked[name].work.bytes_per_device > whole[name].work.bytes_per_device, name  # weights read twice
    assert chunked["assemble"].argument_bytes == whole["assemble"].argument_bytes  # the whole rollout again


def test_a_program_the_tpu_compiler_refuses_is_reported_with_what_it_said_it_needs():
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
        "(119.91G) exceeds available HBM (95.74G)."
    )
    refused = report.refused_report("train_step", message, work.Work(1e15, 1e9))
    assert refused.peak_bytes == int(119.91 * GIB) and refused.error.startswith("RESOURCE_EXHAUSTED")
    v5p = chips.chip_named("v5p:4x4x4")
    assert not refused.fits(v5p) and refused.roofline_seconds(v5p, 64) > 0  # its time is still known
    assert not report.refused_report("update", "not compiled: ...").fits(chips.with_memory(None, GIB))
