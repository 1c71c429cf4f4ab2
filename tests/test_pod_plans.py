"""Specification: every pod preset is planned for the TPU slices it is documented for, and fits there.

The full-size plans take minutes each on 2 cores, so benchmarks/pod_plans.py makes them and commits
its results (benchmarks/results/pod_plans.json, with the date and versions). These tests hold the
registry, the presets and those results together: a new pod preset without a slice, a slice whose
config does not validate there, or a committed plan that does not fit (or is missing) fails here.
Compiling the presets themselves for their slices is tests/test_plan.py's TPU section and the script.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pathlib

import pytest

from benchmarks import pod_plans
from easyppo.cli.train import config_from_argv
from easyppo.configs.pod_slices import POD_SLICES
from easyppo.plan import architectures, chips
from easyppo.run import config as run_config

ALGORITHMS = ("sft", "rm", "dpo", "ppo", "grpo", "online_dpo")


def _pod_presets() -> list[str]:
    found = []
    for algorithm in ALGORITHMS:
        module = importlib.import_module(f"easyppo.configs.{algorithm}")
        found += [f"{algorithm}:{preset}" for preset in module.PRESETS if preset != "demo"]
    return found


def _chips(topology: str) -> int:
    """Chips of a libtpu topology name: the product of its shape (``v4:4x4x2`` -> 32)."""
    count = 1
    for size in topology.split(":", 1)[1].split("x"):
        count *= int(size)
    return count


def test_every_pod_preset_names_the_slices_it_is_documented_for():
    assert sorted(POD_SLICES) == sorted(_pod_presets())
    for preset, slices in POD_SLICES.items():
        assert slices, preset
        for pod in slices:
            chips.chip_named(pod.topology)  # a known generation


@pytest.mark.parametrize("preset", sorted(POD_SLICES))
def test_every_pod_slice_passes_the_runs_validation(preset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    architectures._hub_unreachable.cache_clear()
    for pod in POD_SLICES[preset]:
        config = config_from_argv(["easyppo plan", f"--config={preset}", *pod.flags()])
        planned = architectures.without_weights(config, tmp_path)
        hosts = max(1, _chips(pod.topology) // chips.chip_named(pod.topology).chips_per_host)
        run_config.validate(planned, num_devices=_chips(pod.topology), process_count=hosts)
    architectures._hub_unreachable.cache_clear()


def test_the_committed_plans_cover_every_pod_slice_and_each_fits_unless_said_otherwise():
    """A slice whose preset is known not to fit (``does_not_fit``) must still not fit: when it starts
    to, the registry and the docs are out of date."""
    results = json.loads(pathlib.Path(pod_plans.RESULTS).read_text())
    assert {"jax", "jaxlib", "libtpu", "easyppo"} <= set(results["meta"]["versions"])
    for preset, slices in POD_SLICES.items():
        for pod in slices:
            key = pod_plans.Row("", preset, pod.topology, tuple(pod.flags())).key
            result = results["results"].get(key)
            assert result is not None, f"{key}: not planned; run python -m benchmarks.pod_plans"
            plan = result.get("plan")
            assert plan is not None, f"{key}: {result.get('error')}"
            assert plan["target"] == pod.topology
            peak = plan["peak_bytes"] / 2**30
            assert plan["fits"] is not bool(pod.does_not_fit), f"{key}: fits {plan['fits']} at {peak:.1f} GiB"


COMPILED_IN_CI = ("dpo:tulu25_13b_uf_mean",)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install 'easyppo[plan]')")
@pytest.mark.parametrize("preset", sorted(POD_SLICES))
def test_every_pod_preset_compiles_for_its_slice_at_full_width(preset, tmp_path, monkeypatch):
    """The TPU compiler partitions every program of the preset on its slice, at the models' full width.

    Two layers stand for all of them (every layer is sharded alike), so this checks what can fail on
    a pod at start-up: a sharding rule that does not partition, a mesh the slice cannot lay out, a
    collective the compiler rejects. Memory at full depth is the committed plans' part. The TPU
    compiler takes half a minute (DPO) to five minutes (PPO's four programs) per preset on 2 cores,
    so CI compiles one gradient preset, on a slice with tensor parallelism; the rest run with
    EASYPPO_TEST_POD_PRESETS=all (and, at full depth, in benchmarks/pod_plans.py).
    """
    from easyppo.plan import planner, topology

    if preset not in COMPILED_IN_CI and os.environ.get("EASYPPO_TEST_POD_PRESETS") != "all":
        pytest.skip("compiled by benchmarks/pod_plans.py (minutes each); EASYPPO_TEST_POD_PRESETS=all compiles it here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    architectures._hub_unreachable.cache_clear()
    pod = POD_SLICES[preset][-1]
    planned = architectures.without_weights(
        config_from_argv(["easyppo plan", f"--config={preset}", *pod.flags()]), tmp_path
    )
    architectures._hub_unreachable.cache_clear()
    for stored in tmp_path.glob("*/config.json"):
        architecture = json.loads(stored.read_text())
        stored.write_text(json.dumps(architecture | {"num_hidden_layers": 2}))
    plan = planner.plan_prepared(planned, topology.resolve_target(pod.topology))
    assert [p.error for p in plan.programs] == [""] * len(plan.programs)
    assert plan.num_devices == _chips(pod.topology)
