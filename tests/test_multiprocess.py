"""Specification: a run split over several JAX processes computes what one process computes.

On a pod every host runs ``python -m easyppo.train`` with the same config; each feeds its share of the
global batch (``sharding.host_local_to_global``), only process 0 writes metrics and all of them write
the checkpoint. Here a cluster of two CPU processes with two devices each (connected through
``jax.distributed`` with gloo collectives, as ``easyppo.run.distributed`` sets up from
``JAX_COORDINATOR_ADDRESS``) trains the same tiny run as one process with four devices. The mesh is
the same (fsdp=4) and so is the global batch, so the per-step losses and the final parameters must
agree up to the order in which the collectives add floating-point numbers.

Both topologies run at the same time (about 30 s for SFT and 55 s for PPO on 2 free cores); every child
process is killed when one fails or the time runs out, so a hung collective fails the test instead
of hanging it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import jax
import numpy as np
import pytest
from helpers.demo_data import DEMO_DATA, first_rows

from easyppo.models import llama
from easyppo.weights import run_directory

REPO = pathlib.Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
RUN_TIMEOUT_S = 300  # healthy runs end in 1-2 minutes even on a busy machine; this catches a hung collective

pytestmark = pytest.mark.slow


@dataclasses.dataclass(frozen=True)
class Topology:
    processes: int
    devices_per_process: int

    @property
    def name(self) -> str:
        return f"{self.processes}x{self.devices_per_process}"


TWO_HOSTS = Topology(processes=2, devices_per_process=2)
ONE_HOST = Topology(processes=1, devices_per_process=4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_environment(topology: Topology) -> dict[str, str]:
    """The environment of every process of a run: ``topology.devices_per_process`` CPU devices each.

    Synchronous CPU dispatch, as in conftest.py: several small collective programs in flight on
    emulated devices can wait on one another forever.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EASYPPO_", "JAX_COORDINATOR"))}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={topology.devices_per_process}",
        JAX_CPU_ENABLE_ASYNC_DISPATCH="false",
        PYTHONPATH=str(REPO),
    )
    if topology.processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", EASYPPO_NUM_PROCESSES=str(topology.processes))
    return env


def process_environment(env: dict[str, str], topology: Topology, index: int) -> dict[str, str]:
    return dict(env, EASYPPO_PROCESS_ID=str(index)) if topology.processes > 1 else env


def run_trainings(config_files: dict[Topology, pathlib.Path], log_dir: pathlib.Path) -> dict[Topology, list[str]]:
    """Runs ``python -m easyppo.train`` on every process of every topology at once; returns the outputs.

    The runs share the machine's cores instead of taking turns: most of a run is single-threaded
    (imports, XLA compilation). Output goes to files, not pipes, so a chatty process never blocks
    on a full pipe while the others wait for it in a collective. As soon as one process fails (or
    the time runs out) all are killed: the other processes of its run would wait for it forever.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: dict[tuple[Topology, int], subprocess.Popen] = {}
    try:
        for topology, config_file in config_files.items():
            env = child_environment(topology)
            for i in range(topology.processes):
                with (log_dir / f"{topology.name}_process_{i}.log").open("w") as out:
                    procs[topology, i] = subprocess.Popen(
                        [sys.executable, "-m", "easyppo.train", f"--config={config_file}"],
                        cwd=REPO,
                        env=process_environment(env, topology, i),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while running := [p for p in procs.values() if p.poll() is None]:
            if any(p.returncode for p in procs.values()) or time.monotonic() > deadline:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                running[0].wait(timeout=1)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = {key: (log_dir / f"{key[0].name}_process_{key[1]}.log").read_text() for key in procs}
    failed = [(topology, i) for (topology, i), p in procs.items() if p.returncode != 0]
    # Every failure is shown: the first process to fail is the cause, its peers only lost a partner.
    assert not failed, "\n\n".join(
        f"{topology.name} run, process {i} ended with status {procs[topology, i].returncode}:\n"
        + outputs[topology, i][-2000:]
        for topology, i in failed
    )
    return {topology: [outputs[topology, i] for i in range(topology.processes)] for topology in config_files}


def write_config_file(path: pathlib.Path, body: str) -> pathlib.Path:
    """A ``--config`` file whose ``get_config`` runs ``body`` (Python statements ending in a return).

    The body may use ``tiny_config`` (tests/test_train.py), ``tiny_ppo_config``
    (tests/helpers/ppo_runs.py), ``os`` and ``pathlib``. Every process of a run evaluates it.
    """
    path.write_text(
        "import os\n"
        "import pathlib\n"
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from test_train import tiny_config\n"
        "from helpers.ppo_runs import tiny_ppo_config\n"
        "\n"
        "def get_config(arg=None):\n" + textwrap.indent(textwrap.dedent(body).strip() + "\n", "    ")
    )
    return path


def assert_ran_as(outputs: list[str], topology: Topology) -> None:
    """Each process reported its place in the cluster (easyppo.run.distributed's start-up line)."""
    devices = topology.processes * topology.devices_per_process
    for i, output in enumerate(outputs):
        expected = f"process {i} of {topology.processes}, {topology.devices_per_process} local cpu devices of {devices}"
        assert expected in output, output[-3000:]


def metric_rows(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def per_step(rows: list[dict], name: str) -> dict[int, float]:
    return {row["step"]: row[name] for row in rows if name in row}


def checkpointed_params(run_dir: pathlib.Path, kinds: dict[str, str]) -> dict:
    """Named parameter trees of the latest checkpoint (``{"params": "causal_lm"}``), on one device here."""
    model_config = llama.get_preset("tiny", pad_token_id=3)  # the position count changes no shape
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(kind: str):
        abstract = jax.eval_shape(lambda: llama.init_params(model_config, kind, jax.random.key(0)))
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)

    return run_directory.restore_subtree(run_dir / "checkpoints", {name: target(kind) for name, kind in kinds.items()})


def assert_trees_close(actual, expected, *, rtol: float, atol: float) -> None:
    jax.tree.map(
        lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol), actual, expected
    )


def train_on_both_topologies(
    tmp_path: pathlib.Path, config_body: Callable[[pathlib.Path], str]
) -> dict[Topology, pathlib.Path]:
    """Trains the config that ``config_body(run_dir)`` builds as two processes of two devices and as
    one process of four (at the same time); returns each run's output directory."""
    run_dirs = {topology: tmp_path / topology.name for topology in (TWO_HOSTS, ONE_HOST)}
    config_files = {
        topology: write_config_file(tmp_path / f"config_{topology.name}.py", config_body(run_dir))
        for topology, run_dir in run_dirs.items()
    }
    for topology, outputs in run_trainings(config_files, tmp_path / "logs").items():
        assert_ran_as(outputs, topology)
    return run_dirs


# Float32 sums taken in another order differ in the last bits; a host that trained on the wrong rows,
# or skipped a step, is off by far more: an Adam step moves a parameter by about the learning rate (1e-3).
LOSS_RTOL = 1e-6
PARAMS_RTOL, PARAMS_ATOL = 1e-5, 1e-6
# PPO's KL is a small difference of log-probabilities near -log(vocab) = -6.2, summed over 8 tokens:
# its rounding error is absolute, a few float32 ulps of those (4.8e-7 each), not relative to the KL.
KL_ATOL = 1e-6


# --------------------------------------------------------------------------------------------- SFT


def test_sft_on_two_processes_matches_one_process_with_the_same_devices(tmp_path):
    data = {
        "sft": first_rows(DEMO_DATA / "sft_train.jsonl", tmp_path / "sft.jsonl", 40),
        "cache": str(tmp_path / "cache"),  # shared by every process: its entries are written atomically
    }
    runs = train_on_both_topologies(
        tmp_path, lambda run_dir: f"return tiny_config('sft', pathlib.Path({str(run_dir)!r}), {data!r}, num_steps=4)"
    )

    two_hosts, one_host = (per_step(metric_rows(runs[t]), "loss") for t in (TWO_HOSTS, ONE_HOST))
    assert sorted(two_hosts) == sorted(one_host) == [1, 2, 3, 4]
    np.testing.assert_allclose([two_hosts[s] for s in range(1, 5)], [one_host[s] for s in range(1, 5)], rtol=LOSS_RTOL)
    assert one_host[4] < one_host[1]  # the steps did train
    assert_trees_close(
        *(checkpointed_params(runs[t], {"params": "causal_lm"}) for t in (TWO_HOSTS, ONE_HOST)),
        rtol=PARAMS_RTOL,
        atol=PARAMS_ATOL,
    )


# --------------------------------------------------------------------------------------------- PPO


def test_ppo_on_two_processes_matches_one_process_with_the_same_devices(tmp_path):
    """Rollouts too: sampling, reward and KL run on a batch of prompts that each host fed its share of."""
    cache = str(tmp_path / "cache")
    runs = train_on_both_topologies(
        tmp_path,
        lambda run_dir: (
            f"""
        # tiny_ppo_config writes its prompts file beside the run: one file per process of each
        # topology (both topologies run at once and each has a process 0), so that no process reads
        # the file while another rewrites it.
        inputs = pathlib.Path({str(run_dir) + "_inputs"!r}) / f"process_{{os.environ.get('EASYPPO_PROCESS_ID', '0')}}"
        config = tiny_ppo_config(inputs, prompts=16, cache_dir={cache!r})
        config.output_dir = {str(run_dir)!r}
        config.train.num_steps = 2  # step 1's KL is 0: the policy still is the reference
        return config
        """
        ),
    )

    two_hosts, one_host = (metric_rows(runs[t]) for t in (TWO_HOSTS, ONE_HOST))
    for name, tolerance in (("score", {"rtol": LOSS_RTOL}), ("kl_per_sequence", {"rtol": 0, "atol": KL_ATOL})):
        two, one = per_step(two_hosts, name), per_step(one_host, name)
        assert sorted(two) == sorted(one) == [1, 2], name
        np.testing.assert_allclose([two[1], two[2]], [one[1], one[2]], err_msg=name, **tolerance)
    assert per_step(one_host, "kl_per_sequence")[2] > 100 * KL_ATOL  # the policy did move from the reference
    trees = {"params": "causal_lm", "value_params": "value"}
    assert_trees_close(
        *(checkpointed_params(runs[t], trees) for t in (TWO_HOSTS, ONE_HOST)), rtol=PARAMS_RTOL, atol=PARAMS_ATOL
    )
