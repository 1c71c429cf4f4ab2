"""Specification: every pod preset is planned for the TPU slices it is documented for, and fits there.

The full-size plans take minutes each on 2 cores, so benchmarks/pod_plans.py makes them and commits
its results (benchmarks/results/pod_plans.json, with the date and versions). These tests hold the
registry, the presets and those results together: a new pod preset without a slice, a slice whose
config does not validate there, or a committed plan that does not fit (or is missing) fails here.
Compiling the presets themselves for their slices is tests/test_plan.py's TPU section and the script.
"""

from __future__ import annotations

import importlib
import json
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


def test_the_committed_plans_cover_every_pod_slice_and_each_fits():
    results = json.loads(pathlib.Path(pod_plans.RESULTS).read_text())
    assert {"jax", "jaxlib", "libtpu", "easyppo"} <= set(results["meta"]["versions"])
    for row in pod_plans.rows():
        if not row.workload.startswith("preset "):
            continue
        result = results["results"].get(row.key)
        assert result is not None, f"{row.key}: not planned; run python -m benchmarks.pod_plans"
        assert "error" not in result, f"{row.key}: {result.get('error')}"
        assert result["plan"]["fits"] is True, (
            f"{row.key}: does not fit ({result['plan']['peak_bytes'] / 2**30:.1f} GiB)"
        )
        assert result["plan"]["target"] == row.topology
