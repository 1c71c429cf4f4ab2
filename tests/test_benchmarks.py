"""The train-step benchmark: its CLI report, and the FLOP and timing arithmetic behind MFU."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks/ is not an installed package; `python -m pytest` from elsewhere

from benchmarks import common, train_step
from easyppo.core import sharding
from easyppo.models import llama

TINY = dict(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64, vocab=128, seq_len=16, batch=8)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One CLI run of both algorithms at a tiny size, on the 8-device mesh conftest sets up."""
    json_out = tmp_path_factory.mktemp("bench") / "report.json"
    flags = [f"--{name}={value}" for name, value in TINY.items()]
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "train_step.py"),
        "--algorithm=sft,rm",
        *flags,
        "--rounds=2",
        "--steps=1",
        "--peak_size=128",
        "--peak_repeats=2",
        f"--json_out={json_out}",
    ]
    # Share the test suite's persistent compilation cache, so reruns skip most of the compile.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    stdout_report = json.loads(done.stdout)
    assert json.loads(json_out.read_text()) == stdout_report
    return stdout_report


def test_cli_reports_one_run_per_algorithm(report):
    assert [run["setting"]["algorithm"] for run in report["runs"]] == ["sft", "rm"]


@pytest.mark.parametrize(
    "field",
    ["tokens_per_s", "flops_per_token", "achieved_flops_per_s", "compile_s", "first_step_s", "lower_s", "loss"],
)
def test_cli_reports_positive_throughput_figures(report, field):
    for run in report["runs"]:
        assert run[field] > 0, (run["setting"], field)


def test_cli_reports_step_time_median_within_min_max(report):
    for run in report["runs"]:
        step = run["step_time"]
        assert 0 < step["min_s"] <= step["median_s"] <= step["max_s"]
        assert step["repeats"] == 2  # 2 rounds of 1 step


def test_cli_reports_mfu_per_round_against_both_peaks(report):
    for run in report["runs"]:
        assert len(run["rounds"]) == 2
        for round_ in run["rounds"]:
            for precision in ("float32", "bfloat16"):
                peak = round_["peak_flops_per_s"][precision]
                achieved = run["flops_per_step"]["total"] / round_["step_time_median_s"]
                assert peak > 0
                assert round_["mfu"][precision] == pytest.approx(achieved / peak)
        for precision, mfu in run["mfu"].items():
            assert mfu == pytest.approx(np.median([r["mfu"][precision] for r in run["rounds"]]))


def test_cli_reports_best_mfu_as_fastest_step_against_best_peak(report):
    measurements = report["peak_matmul"]["measurements"]
    for run in report["runs"]:
        for precision, mfu in run["mfu_best"].items():
            best_peak = max(m[precision] for m in measurements)
            assert mfu == pytest.approx(run["flops_per_step"]["total"] / run["step_time"]["min_s"] / best_peak)


def test_cli_reports_the_peak_before_the_first_round_and_after_each(report):
    measurements = report["peak_matmul"]["measurements"]
    assert len(measurements) == 3
    assert all(m["float32"] > 0 and m["bfloat16"] > 0 for m in measurements)


def test_cli_reports_compiled_memory_plan(report):
    for run in report["runs"]:
        memory = run["memory"]
        assert memory["argument_bytes"] > 0 and memory["peak_bytes"] >= memory["argument_bytes"]


def test_cli_counts_both_sequences_of_a_preference_pair(report):
    sft_run, rm_run = report["runs"]
    assert sft_run["tokens_per_step"] == TINY["batch"] * TINY["seq_len"]
    assert rm_run["tokens_per_step"] == 2 * TINY["batch"] * TINY["seq_len"]


def test_cli_runs_on_the_whole_device_mesh(report):
    assert report["mesh"] == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}


def test_cli_rejects_an_unknown_algorithm_by_flag(capsys):
    with pytest.raises(SystemExit):
        train_step.parse_args(["--algorithm=sft,ppo"])
    assert "--algorithm 'ppo'" in capsys.readouterr().err


def test_batch_that_does_not_split_over_the_mesh_fails_naming_the_flag():
    args = train_step.parse_args([f"--{name}={value}" for name, value in TINY.items()] + ["--batch=3"])
    setting = train_step.settings_from_args(args)[0]
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    with pytest.raises(ValueError, match="--batch=3 is not divisible"):
        train_step.CompiledStep(args, setting, mesh)


def test_default_intermediate_size_is_llamas():
    assert train_step.default_intermediate_size(4096) == 11008  # Llama 2 7B
    assert train_step.default_intermediate_size(5120) == 13824  # Llama 2 13B


# ----------------------------------------------------------------------------------------- FLOPs

CONFIG = llama.LlamaConfig(
    vocab_size=100,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
)


def _kernel_sizes(kind: str) -> int:
    """Elements of every Dense kernel in the real model's parameter tree (the weights tokens multiply)."""
    shapes = jax.eval_shape(lambda: llama.init_params(CONFIG, kind, jax.random.key(0)))
    return sum(
        int(np.prod(leaf.shape))
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
        if jax.tree_util.keystr(path).endswith("['kernel']")
    )


@pytest.mark.parametrize("kind, head", [("causal_lm", "lm"), ("reward", "score")])
def test_dense_flops_are_six_per_kernel_weight_per_token(kind, head):
    rows, seq_len = 3, 7
    flops = common.llama_train_step_flops(CONFIG, rows=rows, seq_len=seq_len, head=head)
    assert flops.blocks + flops.head == 6 * _kernel_sizes(kind) * rows * seq_len


def test_attention_flops_count_both_attention_matmuls_forward_and_backward():
    rows, seq_len = 3, 7
    head_dim = CONFIG.hidden_size // CONFIG.num_attention_heads
    # Per head: [T, hd] @ [hd, T] scores and [T, T] @ [T, hd] values, 2 * T * hd * T FLOPs each;
    # the backward pass doubles the forward.
    forward = 2 * (2 * seq_len * head_dim * seq_len) * CONFIG.num_attention_heads * CONFIG.num_hidden_layers
    flops = common.llama_train_step_flops(CONFIG, rows=rows, seq_len=seq_len, head="lm")
    assert flops.attention == 3 * forward * rows
    assert flops.total == flops.blocks + flops.head + flops.attention


def test_score_head_costs_one_column_per_token():
    flops = common.llama_train_step_flops(CONFIG, rows=2, seq_len=5, head="score")
    assert flops.head == 6 * CONFIG.hidden_size * 2 * 5


def test_unknown_head_is_rejected_by_name():
    with pytest.raises(ValueError, match="head='value'"):
        common.llama_train_step_flops(CONFIG, rows=1, seq_len=1, head="value")


# ---------------------------------------------------------------------------------------- timing


def test_timing_summary_is_median_min_max_of_the_samples():
    timing = common.Timing.from_samples([0.3, 0.1, 0.5, 0.2])
    assert (timing.median, timing.min, timing.max, timing.repeats) == (0.25, 0.1, 0.5, 4)
    assert timing.spread == pytest.approx((0.5 - 0.1) / 0.25)


def test_interleaved_rounds_are_compared_with_the_better_peak_around_them():
    timing = common.InterleavedTiming(
        samples=[[[2.0, 4.0], [1.0]]],
        peaks=[{"float32": 10.0}, {"float32": 20.0}, {"float32": 5.0}],
    )
    assert timing.round_peaks() == [{"float32": 20.0}, {"float32": 20.0}]
    rounds = timing.mfu_by_round(0, flops_per_call=30.0)
    assert [r["step_time_median_s"] for r in rounds] == [3.0, 1.0]
    assert [r["mfu"]["float32"] for r in rounds] == [30.0 / 3.0 / 20.0, 30.0 / 1.0 / 20.0]
    assert timing.timing(0).repeats == 3
    assert timing.best_peak() == {"float32": 20.0}


def test_interleaved_timing_runs_every_workload_in_every_round_between_peaks():
    calls = []
    timing = common.time_interleaved(
        [lambda: calls.append("a"), lambda: calls.append("b")],
        rounds=2,
        repeats=2,
        measure_peak=lambda: calls.append("peak") or {"float32": 1.0},
    )
    assert calls == ["peak", "a", "a", "b", "b", "peak", "a", "a", "b", "b", "peak"]
    assert [len(rounds) for rounds in timing.samples] == [2, 2]


def test_timing_needs_samples():
    with pytest.raises(ValueError, match="no samples"):
        common.Timing.from_samples([])


def test_matmul_peak_rejects_unknown_precision():
    with pytest.raises(ValueError, match="float16"):
        common.matmul_peak("float16", size=8, repeats=1)


def test_compiled_memory_peak_is_arguments_plus_outputs_minus_aliases_plus_temporaries():
    # A donated [64, 32] float32 input updated in place: 8 KiB in, 8 KiB out, the same 8 KiB aliased.
    compiled = jax.jit(lambda x: jnp.tanh(x) * 2, donate_argnums=0).lower(jnp.ones((64, 32))).compile()
    memory = common.compiled_memory(compiled)
    size = 64 * 32 * 4
    assert (memory["argument_bytes"], memory["output_bytes"], memory["alias_bytes"]) == (size, size, size)
    assert memory["peak_bytes"] == size + memory["temp_bytes"]


# ----------------------------------------------------------------------------------- PPO iteration

from benchmarks import ppo_iteration

PPO_TINY = dict(
    hidden_size=32,
    num_layers=1,
    heads=4,
    kv_heads=2,
    intermediate_size=64,
    vocab_size=128,
    prompts=2,
    prompt_len=4,
    new_tokens=3,
    samples_per_prompt=2,
    num_minibatches=2,
)


@pytest.mark.slow  # compiling the update program (two models' gradient steps in a scan) takes ~15 s
def test_ppo_iteration_cli_reports_three_timed_phases_that_add_up_to_the_iteration(capsys):
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in PPO_TINY.items()]
    ppo_iteration.main([*flags, "--repeats=2", "--peak-size=64", "--peak-repeats=1"])
    report = json.loads(capsys.readouterr().out)

    phases = report["phases"]
    assert list(phases) == ["rollout", "scoring", "update"]
    for name, phase in phases.items():
        for field in ("median_s", "min_s", "max_s"):
            assert phase["time"][field] > 0, (name, field)
        for field in ("compile_s", "first_call_s", "tokens_per_s", "flops_per_s"):
            assert phase[field] > 0, (name, field)
        assert set(phase["mfu"]) == {"float32", "bfloat16"}
    # Each iteration is timed around its three phases, so the phases fill it but for host gaps.
    iteration = report["iteration"]["time"]["median_s"]
    phase_sum = sum(phase["time"]["median_s"] for phase in phases.values())
    assert phase_sum == pytest.approx(iteration, rel=0.1)
    for phase in phases.values():
        assert phase["share"] == pytest.approx(phase["time"]["median_s"] / phase_sum)
    # Stop tokens are off: every one of prompts x samples rows generated every token.
    rows = PPO_TINY["prompts"] * PPO_TINY["samples_per_prompt"]
    assert phases["rollout"]["tokens"] == rows * PPO_TINY["new_tokens"]
    assert report["rollout_metrics"]["response_length"] == PPO_TINY["new_tokens"]
    assert report["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}


def test_grpo_iteration_cli_splits_grpo_into_four_phases_beside_ppos_three(capsys):
    from benchmarks import grpo_iteration

    flags = ["--hidden=64", "--layers=1", "--prompts=8", "--samples=2", "--new-tokens=4", "--repeats=1"]
    report = grpo_iteration.main(flags)
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))
    grpo, ppo = report["runs"]
    assert list(grpo["phases_s"]) == ["rollout", "reward", "scoring", "update"]
    assert list(ppo["phases_s"]) == ["rollout", "scoring", "update"]
    for run in (grpo, ppo):
        assert run["iteration_s"] == pytest.approx(sum(run["phases_s"].values()))
        assert run["tokens_per_s"] == pytest.approx(8 * 2 * (40 + 4) / run["iteration_s"])
    assert report["grpo_vs_ppo_tokens_per_s"] == pytest.approx(grpo["tokens_per_s"] / ppo["tokens_per_s"])


def test_logprob_grad_cli_checks_agreement_and_reports_both_variants(capsys):
    from benchmarks import logprob_grad

    report = logprob_grad.main(["--rows=2", "--seq_len=8", "--hidden=16", "--vocab=64", "--chunk=4", "--repeats=1"])
    assert json.loads(capsys.readouterr().out)["speedup"] == pytest.approx(report["speedup"])
    assert [run["variant"] for run in report["runs"]] == ["autodiff", "custom_vjp"]
    assert report["speedup"] == pytest.approx(report["runs"][0]["median_s"] / report["runs"][1]["median_s"])


TINY_CANONICAL = [
    "--vocab-size=512",
    "--hidden-size=64",
    "--intermediate-size=128",
    "--num-layers=1",
    "--prompt-len=8",
    "--response-len=8",
    "--warmup-steps=1",
    "--measure-steps=2",
    "--batch-pairs=8",  # the tests' 8 emulated devices each take a row
]


@pytest.mark.parametrize("workload", ["dpo", "dpo --reference precomputed", "rm", "ppo"])
def test_canonical_cli_prints_the_peers_harness_row(capsys, workload):
    """The fields ../shared/peers/make_table.py reads, for every workload run_all.sh asks for."""
    from benchmarks import canonical

    row = canonical.main([f"--workload={workload.split()[0]}", *workload.split()[1:], *TINY_CANONICAL])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(row))
    assert row["library"] == "easyppo" and row["workload"] == workload.split()[0]
    assert row["peak_rss_mib"] > 0 and row["versions"]["easyppo"]
    if row["workload"] == "ppo":
        for key in ("iter_time_median_s", "gen_time_median_s", "score_time_median_s", "update_time_median_s"):
            assert row[key] > 0
        assert row["gen_tokens_per_s"] == pytest.approx(8 * 8 / row["gen_time_median_s"])
    else:
        assert row["tokens_per_s"] == pytest.approx(2 * 8 * 16 / row["step_time_median_s"])
        assert row["step_times"]["n"] == 2 and len(row["losses"]) == 3
        assert row["variant"] == ("precomputed reference" if "precomputed" in workload else "canonical")
    assert row["matmul_peak_flops"] > 0 and 0 < row["mfu"] < 1
    assert row["mfu"] == pytest.approx(
        (row["model_flops"]["total"] if row["workload"] == "ppo" else row["model_flops"])
        / row.get("step_time_median_s", row.get("iter_time_median_s"))
        / row["matmul_peak_flops"]
    )


def test_canonical_flops_follow_the_train_step_formula_and_count_only_the_passes_run():
    from benchmarks import canonical, canonical_flops

    args = canonical.parse_args(["--workload=dpo", "--reference=precomputed"])
    config = canonical.architecture(args)
    rows, seq_len = 2 * args.batch_pairs, args.prompt_len + args.response_len
    full = common.llama_train_step_flops(config, rows=rows, seq_len=seq_len, head="lm")
    head_per_position = full.head / seq_len
    # The LM head counts at the response positions only; the trunk and attention are the train step's.
    assert canonical_flops.dpo_step(config, args) == pytest.approx(
        full.blocks + full.attention + head_per_position * args.response_len
    )
    on_the_fly = canonical.parse_args(["--workload=dpo"])
    assert canonical_flops.dpo_step(config, on_the_fly) == pytest.approx(canonical_flops.dpo_step(config, args) * 4 / 3)
    ppo = canonical.parse_args(["--workload=ppo"])
    reused = canonical.parse_args(["--workload=ppo", "--old-logprobs=sampler"])
    recompute, sampler = canonical_flops.ppo_iteration(config, ppo), canonical_flops.ppo_iteration(config, reused)
    assert recompute["total"] == pytest.approx(sum(recompute[k] for k in ("generation", "scoring", "update")))
    assert sampler["scoring"] < recompute["scoring"] and sampler["update"] == recompute["update"]
