"""Specification: a run killed with SIGKILL at a random moment (during a step, a checkpoint save or the
export) and started again ends bit for bit where an uninterrupted run ends: parameters, optimizer
state and the Hugging Face export."""

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers.runs import small_demo_data, tiny_config
from safetensors.numpy import load_file

from easyppo.core import sharding
from easyppo.run import config as run_config
from easyppo.run import loop
from easyppo.weights import run_checkpoint

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 12

small_data = pytest.fixture(scope="module", name="small_data")(small_demo_data)


def _config(out: pathlib.Path, data: dict):
    config = tiny_config("sft", out, data, num_steps=STEPS, export_hf_dir=str(out / "hf"))
    config.checkpoint.save_every_steps, config.checkpoint.async_save = 2, True
    return config


def _config_file(tmp_path: pathlib.Path, out: pathlib.Path, data: dict) -> pathlib.Path:
    path = tmp_path / f"{out.name}_config.py"
    path.write_text(
        "import pathlib, sys\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from test_kill_resume import _config\n"
        "def get_config(arg=None):\n"
        f"    return _config(pathlib.Path({str(out)!r}), {data!r})\n"
    )
    return path


def _state(out: pathlib.Path, data: dict):
    """The final checkpoint's whole train state (parameters and optimizer state), on the host."""
    config = _config(out, data)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    trainer = loop.trainer_for(run_config.resolve_paths(config), mesh, STEPS, resuming=True)
    reader = run_checkpoint.default_config()
    reader.directory = str(out / "checkpoints")
    with run_checkpoint.Checkpointer(reader, read_only=True) as checkpointer:
        restored = checkpointer.restore(trainer.abstract_state())
    return int(restored.metadata["step"]), jax.device_get(restored.state)


def _run(command, env):
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one device, as a user's laptop would have


def _command(tmp_path, out, data):
    return [sys.executable, "-m", "easyppo.train", f"--config={_config_file(tmp_path, out, data)}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_data):
    root = tmp_path_factory.mktemp("whole")
    _run(_command(root, root / "run", small_data), ENV)
    return root / "run"


@pytest.mark.slow
# Measured on this 2-core CPU, these seeds kill during the export, while step 2, step 8 and step
# 10 are being saved (an Orbax tmp directory left behind): the windows a kill is most likely to hurt.
@pytest.mark.parametrize("seed", [0, 1, 3, 4])
def test_a_run_killed_at_a_random_moment_resumes_bit_for_bit(tmp_path, small_data, uninterrupted, seed):
    out = tmp_path / "killed"
    command = _command(tmp_path, out, small_data)
    # Once the first step is logged the run takes a few seconds more: kill somewhere in that window,
    # which covers steps, asynchronous checkpoint saves and the export.
    delay = random.Random(seed).uniform(0.0, 2.5)
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "logs" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _run(command, ENV)

    (step, state), (expected_step, expected) = _state(out, small_data), _state(uninterrupted, small_data)
    assert step == expected_step == STEPS
    jax.tree.map(np.testing.assert_array_equal, state, expected)
    exported, reference = (
        load_file(str(out / "hf" / "model.safetensors")),
        load_file(str(uninterrupted / "hf" / "model.safetensors")),
    )
    assert exported.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(exported[name], reference[name], err_msg=name)
